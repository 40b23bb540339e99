"""bench/topk_methods.py runs tiny on the CPU: every selection method timed, the same entries chosen."""

from __future__ import annotations

import json

from .conftest import load_bench


def test_topk_methods_bench_runs_tiny(tmp_path):
    bench = load_bench("topk_methods.py", "bench_topk_methods")
    out = tmp_path / "topk.json"
    report = bench.main(["--device", "cpu", "--model", "cnn", "--repeat", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["results"]) == {"per_tensor", "radix", "segmented"}
    for figures in report["results"].values():
        assert figures["same_entries"] and figures["best_ms"] > 0
    assert report["entries"] > 0 and report["tensors"] > 1
