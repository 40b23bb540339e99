"""bench/client_batching.py runs tiny on the CPU: both modes timed and counted, the same training."""

from __future__ import annotations

import json

from .conftest import load_bench


def test_client_batching_bench_runs_tiny(tmp_path):
    bench = load_bench("client_batching.py", "bench_client_batching")
    out = tmp_path / "cb.json"
    assert bench.main(["--device", "cpu", "--model", "cnn", "--image-size", "16", "--clients", "3", "--samples", "12",
                       "--epochs", "1", "--batch", "6", "--repeat", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["client_steps"] == 6
    for mode in ("one_after_another", "batched"):
        figures = report["results"][mode]
        assert figures["wall_ms_per_client_step"] > 0 and figures["compute_ops_per_client_step"] > 0
    # one batched step dispatches fewer operators than its clients' steps one after another
    assert (report["results"]["batched"]["compute_ops_per_client_step"]
            < report["results"]["one_after_another"]["compute_ops_per_client_step"])
    assert report["largest_parameter_difference"] < 1e-5
