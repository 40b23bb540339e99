"""bench/step_profile.py runs on CPU (tiny) and reports each spec's step figures."""

from __future__ import annotations

import json

from .conftest import load_bench


def test_step_profile_runs_tiny_on_cpu(tmp_path, capsys):
    module = load_bench("step_profile.py", "step_profile")
    out = tmp_path / "step.json"
    assert module.main(["--device", "cpu", "--model", "cnn", "--batch", "4", "--steps", "2", "--top", "3",
                        "--specs", "whole,masked", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert [r["spec"] for r in figures["results"]] == ["whole", "masked"]
    for r in figures["results"]:
        assert r["steps"] == 2 and r["wall_ms_per_step"] > 0 and r["kernel_ms_per_step"] is None
        assert len(r["top_host_ops"]) == 3
    assert "wall ms/step" in capsys.readouterr().out


def test_graphs_need_cuda_and_the_difference_report_names_the_worst_tensor(monkeypatch):
    import argparse

    import pytest
    import torch

    from fedselect import engine
    from fedselect.models import build_model

    module = load_bench("step_profile.py", "step_profile")
    with pytest.raises(SystemExit) as exc:
        module.main(["--device", "cpu", "--model", "cnn", "--graphs", "both"])
    assert exc.value.code == 2
    # with the graphed forward replaced by the model itself, graphed and eager epochs agree exactly
    monkeypatch.setattr(engine, "graphed_forward", lambda model: model)
    model = build_model("cnn", 10, image_size=16)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diff = module.graphed_difference(model, "masked", x, y, argparse.Namespace(batch=4, augment=True))
    assert diff["max_abs"] == 0.0 and diff["max_relative"] == 0.0 and diff["max_relative_tensor"] in before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # state restored
