"""bench/cpu_kernels.py runs tiny and finds every kernel's bits equal to the PyTorch path's."""

from __future__ import annotations

import json

import pytest

from fedselect.core import cpu_kernels

from .conftest import load_bench


@pytest.mark.skipif(not cpu_kernels.NUMBA_FOUND, reason="numba is not installed")
def test_cpu_kernels_bench_runs_tiny_and_finds_the_same_bits(tmp_path, capsys):
    module = load_bench("cpu_kernels.py", "cpu_kernels_bench")
    out = tmp_path / "kernels.json"
    # above 65536 entries, so that the top-k takes the kernel too
    assert module.main(["--entries", "70000", "--repeat", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(r["same_bits"] and r["kernel_ms"] > 0 for r in rows)
    assert "same bits" in capsys.readouterr().out
