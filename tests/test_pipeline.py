"""End to end through the real stack: CLI -> FedMLRunner -> MLflow (sqlite) -> run record; Snakemake."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedselect.config import load_config
from fedselect.study import load_study
from fedselect.tracking import load_runs, metric_history

from .conftest import REPO

pytestmark = pytest.mark.integration
SMOKE = REPO / "configs" / "smoke.yaml"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedselect")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})


def test_algorithms_command_lists_one_per_line():
    out = cli("algorithms")
    assert out.returncode == 0, out.stderr
    assert {"fedavg", "local", "fedselect"} <= set(out.stdout.split())


def test_help_explains_data_root():
    out = cli("--help")
    assert out.returncode == 0 and "FEDSELECT_DATA_ROOT" in out.stdout and "run" in out.stdout


def test_bad_config_fails_early_naming_the_key(tmp_path):
    out = cli("run", "--config", str(SMOKE), "--set", "train.lrr=1")
    assert out.returncode == 2 and "train.lrr" in out.stderr


def test_missing_data_offline_is_a_clear_error(tmp_path):
    out = cli("run", "--config", str(SMOKE), "--set", f"data.root={tmp_path}", "--set", "data.download=false",
              "--set", f"tracking.results_dir={tmp_path / 'r'}")
    assert out.returncode != 0
    assert str(tmp_path) in out.stderr


def test_run_end_to_end_logs_to_mlflow_and_is_deterministic(tmp_path, data_root):
    from fedselect.runner.simulate import run_experiment

    records = []
    for i in range(2):
        config = load_config(SMOKE, [f"tracking.results_dir={tmp_path / 'results'}", f"data.root={data_root}",
                                     "device=cpu", "algorithm=fedselect", "algo.gradltn_iterations=2",
                                     "algo.gradltn_epochs=1"])
        records.append(run_experiment(config, record_path=tmp_path / f"rec{i}.json", progress=False))
    first, second = records
    assert first["per_client_acc"] == second["per_client_acc"]
    assert first["bytes_up"] == second["bytes_up"] and first["bytes_up"] > 0
    saved = json.loads((tmp_path / "rec0.json").read_text())
    for key in ("algorithm", "dataset", "seed", "rounds", "final_mean_acc", "best_mean_acc", "per_client_acc",
                "bytes_up", "bytes_down", "wall_seconds", "mlflow_run_id", "tracking_uri"):
        assert key in saved, key
    assert len(saved["per_client_acc"]) == 4
    runs = load_runs(saved["tracking_uri"], experiment="smoke")
    assert {r["run_id"] for r in runs} == {first["mlflow_run_id"], second["mlflow_run_id"]}
    run = next(r for r in runs if r["run_id"] == first["mlflow_run_id"])
    assert run["status"] == "FINISHED" and run["params"]["train.rounds"] == "2"
    assert [step for step, _ in metric_history(saved["tracking_uri"], first["mlflow_run_id"], "acc/mean")] == [0, 1]
    assert "personal_fraction_mean" in run["metrics"]
    assert 0.0 < saved["mask_iou_model_mean"] <= 1.0


def test_cli_partition_writes_summary_and_plot(tmp_path, data_root):
    out = cli("partition", "--config", str(SMOKE), "--set", f"data.root={data_root}", "--out", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "p.summary.json").read_text())
    assert summary["num_clients"] == 4
    assert (tmp_path / "p.png").stat().st_size > 0


def test_snakemake_study_end_to_end(tmp_path, data_root):
    study = {
        "study": "tiny", "seeds": [0],
        "base": {"device": "cpu", "data": {"dataset": "cifar10", "root": str(data_root),
                                           "partition": {"kind": "pathological", "num_clients": 2,
                                                         "classes_per_client": 2, "train_per_class": 8,
                                                         "test_per_class": 10}},
                 "model": {"name": "cnn"}, "train": {"rounds": 1, "local_epochs": 1}},
        "runs": {"fedavg": {"algorithm": "fedavg"}, "local": {"algorithm": "local"}},
    }
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(study))
    results = tmp_path / "results"
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [str(snakemake), "all", "--cores", "2", "--config", f"study_file={study_file}", f"results_dir={results}"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (results / "tiny" / "summary.md").read_text()
    assert "fedavg" in table and "local" in table
    records = [json.loads(p.read_text()) for p in sorted((results / "tiny" / "runs").glob("*.json"))]
    assert [r["algorithm"] for r in records] == ["fedavg", "local"]
    assert records[0]["partition_key"] == records[1]["partition_key"]
    # a second invocation has nothing left to do
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_bare_snakemake_targets_the_study(tmp_path):
    """A bare `snakemake` (no target) from the repository root plans the whole default study."""
    snakemake = Path(sys.executable).with_name("snakemake")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(snakemake), "-n", "--config", f"results_dir={tmp_path}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Nothing to be done" not in log
    study = load_study(REPO / "configs" / "default.yaml")
    train_jobs = len(study.run_names()) * len(study.seeds)
    assert re.search(rf"^train\s+{train_jobs}$", log, re.MULTILINE), log[-3000:]
    assert re.search(r"^report\s+1$", log, re.MULTILINE)
