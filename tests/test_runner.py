"""The one path through the runners: resolved options recorded, hooks declared, clean layering."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import fedselect.runner.simulate as simulate
from fedselect.algorithms.base import FedAvgClient
from fedselect.algorithms.server import FedAvgServer
from fedselect.registry import get_algorithm
from fedselect.tracking import load_runs

from .conftest import REPO
from .test_resume import tiny_config, tiny_data

PACKAGE = REPO / "plugin" / "fedselect"


def test_run_params_and_record_hold_every_resolved_option(tmp_path, monkeypatch):
    data = tiny_data()
    monkeypatch.setattr(simulate, "load_data", lambda config: data)
    # the user sets only p: every other option must still be recorded, with its default
    config = tiny_config(tmp_path, "fedselect", {"p": 0.5, "gradltn_iterations": 1}, rounds=1, checkpoint_every=0)
    record = simulate.run_experiment(config, progress=False)
    defaults = dataclasses.asdict(get_algorithm("fedselect").options_cls(p=0.5, gradltn_iterations=1))
    assert record["algo_options"] == defaults
    (run,) = load_runs(record["tracking_uri"], experiment="resume")
    for name in defaults:
        assert f"algo.{name}" in run["params"], name
    assert run["params"]["algo.search_every"] == str(defaults["search_every"])
    # only what shaped a simulated run: no deploy section, no unset keys outside the options
    assert not [k for k in run["params"] if k.startswith("deploy.")]
    assert not [k for k, v in run["params"].items() if v == "None" and not k.startswith("algo.")]
    # MLflow's Source and Git Commit fields
    assert run["tags"]["mlflow.source.name"] == "fedselect"


def test_every_builtin_algorithm_declares_its_options_on_the_client():
    from fedselect.registry import BUILTIN_MODULES

    for module in BUILTIN_MODULES:
        spec = get_algorithm(module.rsplit(".", 1)[1])
        assert issubclass(spec.client_cls, FedAvgClient) and issubclass(spec.server_cls, FedAvgServer)
        assert spec.options_cls is spec.client_cls.Options, module


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("lower", ["algorithms", "core", "data", "models"])
def test_lower_layers_never_import_the_runners(lower):
    for path in sorted((PACKAGE / lower).rglob("*.py")):
        upward = {m for m in _imports(path) if m.startswith(("fedselect.runner", "fedselect.fedml_runtime",
                                                             "fedselect.cli", "fedselect.tracking"))}
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"


def test_only_the_bridge_imports_fedml_below_the_runtimes():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("fedml_runtime/", "runner/")) or rel == "fedml_bridge.py":
            continue
        fedml = {m for m in _imports(path) if m == "fedml" or m.startswith("fedml.")}
        assert not fedml, f"{rel} imports {sorted(fedml)}: take FedML from fedselect.fedml_bridge"


def test_runners_do_not_probe_algorithms_with_hasattr():
    for folder in ("runner", "fedml_runtime"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Name) and n.func.id == "hasattr"]
            assert not calls, f"{path.relative_to(REPO)} asks hasattr: declare a hook on the base classes"


def test_record_totals_are_the_metrics_the_algorithm_declares():
    from fedselect.fedml_runtime.simulation import RoundResult
    from fedselect.runner.record import RoundLogger

    totaled = get_algorithm("layersel").client_cls.totaled_metrics
    assert totaled == ("train_sample_passes", "compute_backward")
    logger = RoundLogger(tracker=None, num_clients=2, defer=True, totaled=totaled)  # deferred: nothing logged
    for round_idx in range(2):
        logger(RoundResult(round_idx, [0, 1], 0.5, 10, 10, client_metrics={
            0: {"train_sample_passes": 40.0, "compute_backward": 1.5},
            1: {"train_sample_passes": 20.0, "compute_backward": 0.5}}))
    assert logger.work_totals() == {"train_sample_passes_total": 120.0, "compute_backward_total": 4.0}
    fedavg_totals = get_algorithm("fedavg").client_cls.totaled_metrics
    plain = RoundLogger(tracker=None, num_clients=1, defer=True, totaled=fedavg_totals)
    assert plain.work_totals() == {"train_sample_passes_total": 0.0}


def test_the_documented_new_algorithm_runs():
    """docs/ARCHITECTURE.md's example algorithm registers, validates its option and trains a round."""
    import re
    import textwrap

    from .test_algorithms import make_run, run_flow

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    exec(textwrap.dedent(re.search(r"```python\n(.*?)```", text, re.S).group(1)), {})  # noqa: S102
    _, clients, args, model, init, _, trainers, server, flow = make_run("topk_fedper", rounds=1,
                                                                        algo={"personal_groups": 2})
    run_flow(flow, args, model, clients)
    assert trainers[0].options.personal_groups == 2
    from fedselect.models import layer_groups

    expected = {n for g in layer_groups(model)[-2:] for n in g.param_names}
    assert set(trainers[0].personal_mask) == expected
    # personal entries never leave the clients: the server still holds their initial values
    assert all(torch.equal(server.get_model_params()[n], init[n]) for n in expected)


def test_plugin_on_run_check_config_and_algorithms(tmp_path, capsys):
    """`--plugin` imports a module that registers an algorithm before anything reads the config."""
    import sys

    from fedselect.cli import main

    module = tmp_path / "my_fedavg_plugin.py"
    module.write_text("from fedselect.algorithms.base import FedAvgClient, FedAvgServer\n"
                      "from fedselect.registry import register\n"
                      "register('my_fedavg', client=FedAvgClient, server=FedAvgServer, summary='FedAvg, renamed')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["algorithms", "--plugin", "my_fedavg_plugin"]) == 0
        assert "my_fedavg" in capsys.readouterr().out.split()
        config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
        assert main(["check-config", "--config", str(config), "--set", "algorithm=my_fedavg",
                     "--plugin", "my_fedavg_plugin"]) == 0
        assert "algorithm: my_fedavg" in capsys.readouterr().out
        from fedselect.cli import build_parser

        ns = build_parser().parse_args(["run", "--config", str(config), "--plugin", "my_fedavg_plugin"])
        assert ns.plugin == ["my_fedavg_plugin"]
    finally:
        sys.path.remove(str(tmp_path))
