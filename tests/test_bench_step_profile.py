"""bench/step_profile.py runs on CPU (tiny) and reports each spec's step figures."""

from __future__ import annotations

import importlib.util
import json

from .conftest import REPO


def test_step_profile_runs_tiny_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_profile", REPO / "bench" / "step_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "step.json"
    assert module.main(["--device", "cpu", "--model", "cnn", "--batch", "4", "--steps", "2", "--top", "3",
                        "--specs", "whole,masked", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert [r["spec"] for r in figures["results"]] == ["whole", "masked"]
    for r in figures["results"]:
        assert r["steps"] == 2 and r["wall_ms_per_step"] > 0 and r["kernel_ms_per_step"] is None
        assert len(r["top_host_ops"]) == 3
    assert "wall ms/step" in capsys.readouterr().out
