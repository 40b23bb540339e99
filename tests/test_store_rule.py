"""One store rule: a run on default tracking settings logs where `fedselect compare` reads by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedselect.cli import main
from fedselect.config import TrackingConfig, load_config, load_config_dict
from fedselect.study import load_study, run_config
from fedselect.tracking import run_tracking_uri, sqlite_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_smoke_config_and_every_study_run_log_to_compares_default_store() -> None:
    default = run_tracking_uri(TrackingConfig())
    assert run_tracking_uri(load_config(REPO / "configs" / "smoke.yaml").tracking) == default
    schema = REPO / "workflows" / "schemas" / "study.schema.json"
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "study" not in (yaml.safe_load(path.read_text()) or {}):  # a run config (smoke, reference)
            assert run_tracking_uri(load_config(path).tracking) == default, path.name
            continue
        study = load_study(path, schema)
        for run in study.run_names():
            config = load_config_dict(run_config(study, run, study.seeds[0]))
            assert run_tracking_uri(config.tracking) == default, (path.name, run)


def test_compare_reads_that_store_by_default(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--experiment", "nothing-here"]) == 2
    err = capsys.readouterr().err
    expected = sqlite_path(run_tracking_uri(TrackingConfig()))
    assert expected == tmp_path.resolve() / "results" / "mlflow.db"
    assert str(expected) in err


def test_a_run_left_running_by_a_killed_job_is_marked_killed_when_the_job_reruns(tmp_path) -> None:
    from fedselect.tracking import RunTracker, load_runs

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    killed = RunTracker(tracking_uri=uri, experiment="study", run_name="fedavg-seed0").__enter__()
    # the process dies here: no __exit__, the run stays RUNNING
    other = RunTracker(tracking_uri=uri, experiment="study", run_name="fedrep-seed0").__enter__()
    with RunTracker(tracking_uri=uri, experiment="study", run_name="fedavg-seed0") as rerun:
        rerun.log_metrics({"mean_acc": 0.5}, step=0)
    runs = {r["run_id"]: r for r in load_runs(uri, experiment="study")}
    assert runs[killed.run_id]["status"] == "KILLED"
    assert runs[killed.run_id]["tags"]["superseded_by"] == rerun.run_id
    assert runs[rerun.run_id]["status"] == "FINISHED"
    assert runs[other.run_id]["status"] == "RUNNING"  # another job's run is not touched
