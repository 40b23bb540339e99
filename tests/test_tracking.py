"""Tracking: flattening, a full MLflow round trip, failed runs, run records, and parallel writers.

The parallel test starts several processes at the same instant against a fresh sqlite file,
the situation of Snakemake running training jobs side by side on a first run.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import pytest

from fedselect.tracking import (
    RUN_RECORD_KEYS,
    RunTracker,
    default_tracking_uri,
    flatten,
    load_runs,
    metric_history,
    prepare_store,
    read_run_record,
    write_run_record,
)
from fedselect.tracking import store as tracking

PARALLEL_WORKERS = 4
PARALLEL_ROUNDS = 30
PARALLEL_METRICS = 5


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the single-process tests (each uses its own experiment): migrating a fresh
    sqlite file costs about a second, more on a busy disk."""
    return f"sqlite:///{(tmp_path_factory.mktemp('store') / 'mlflow.db').as_posix()}"


@pytest.fixture
def fresh_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return default_tracking_uri(tmp_path)


def _record(**overrides: object) -> dict:
    record: dict = {key: 0 for key in RUN_RECORD_KEYS}
    record.update(per_client_acc=[0.5, 0.75], mlflow_run_id="abc", tracking_uri="sqlite:///x.db", **overrides)
    return record


# ------------------------------------------------------------------------------- pure helpers


def test_flatten_nests_with_dots_and_encodes_lists_and_none():
    flat = flatten({"a": {"b": 1, "c": {"d": True}}, "lst": [1, "x", None], "none": None, "f": 0.5,
                    "empty": {}, "tup": (1, 2)})
    assert flat == {"a.b": 1, "a.c.d": True, "lst": '[1, "x", null]', "none": "None", "f": 0.5,
                    "empty": "{}", "tup": "[1, 2]"}
    assert flatten({"a": {"b": 1}}, prefix="cfg", sep="/") == {"cfg/a/b": 1}


def test_flatten_rejects_colliding_keys():
    with pytest.raises(ValueError, match="a.b"):
        flatten({"a.b": 1, "a": {"b": 2}})


def test_default_uri_is_absolute_sqlite_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("results")
    assert uri == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').as_posix()}"
    assert tracking.sqlite_path(uri) == tmp_path / "results" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri("results") == "http://tracking.example:5000"
    assert tracking.sqlite_path("http://tracking.example:5000") is None
    assert tracking.sqlite_path("sqlite://") is None


def test_retry_backs_off_on_locked_and_not_on_other_errors(monkeypatch: pytest.MonkeyPatch):
    sleeps: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.with_retry("flaky", flaky) == "ok"
    assert calls["n"] == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.3

    def broken() -> None:
        raise RuntimeError("no such table: runs")

    sleeps.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        tracking.with_retry("broken", broken)
    assert sleeps == []

    def always_locked() -> None:
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="locked"):
        tracking.with_retry("locked", always_locked, attempts=3)
    assert len(sleeps) == 2


def test_run_record_round_trip_is_sorted_json(tmp_path: Path):
    path = tmp_path / "runs" / "fedavg-seed0.json"
    record = _record(final_mean_acc=0.8, extra={"b": 1, "a": 2})
    write_run_record(path, record)
    text = path.read_text()
    assert json.loads(text) == record and text.index('"algorithm"') < text.index('"wall_seconds"')
    assert '\n  "algorithm"' in text  # indent 2
    assert read_run_record(path) == record
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_run_record_missing_keys_and_bad_files_are_named(tmp_path: Path):
    record = _record()
    del record["seed"], record["bytes_up"]
    with pytest.raises(ValueError, match="seed, bytes_up"):
        write_run_record(tmp_path / "r.json", record)
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_run_record(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_run_record(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"algorithm": "fedavg"}))
    with pytest.raises(ValueError, match=r"partial.json.*dataset"):
        read_run_record(tmp_path / "partial.json")


# ------------------------------------------------------------------------------ MLflow round trip


def test_run_logs_params_metrics_artifacts_and_reads_them_back(fresh_uri: str, tmp_path: Path):
    uri = fresh_uri
    source = tmp_path / "plot.txt"
    source.write_text("a plot")
    prepare_store(uri)
    with RunTracker(tracking_uri=uri, experiment="study", run_name="fedavg-seed0",
                    tags={"algorithm": "fedavg", "seed": "0"}) as tracker:
        tracker.log_params({"train": {"lr": 0.01, "rounds": 3}, "algo": {"layers": ["fc"]}, "note": None,
                            "long": "x" * 7000})
        for step in range(3):
            tracker.log_metrics({"mean_acc": 0.1 * step, "train_loss": 1.0 / (step + 1)}, step=step)
        tracker.log_metrics({"odd_nan": math.nan, "odd_inf": math.inf}, step=3)
        tracker.set_tags({"partition": "p1"})
        tracker.log_artifact(source)
        tracker.log_artifact(source, artifact_path="plots")
        tracker.log_dict({"a": [1, 2]}, "summary.json")
        tracker.log_dict({"a": 1}, "cfg/config.yaml")
        tracker.log_text("c,d\n", "per_client.csv")
        run_id = tracker.run_id

    runs = load_runs(uri, experiment="study")
    assert [r["run_id"] for r in runs] == [run_id]
    run = runs[0]
    assert run["status"] == "FINISHED" and run["run_name"] == "fedavg-seed0"
    assert run["params"]["train.lr"] == "0.01" and run["params"]["algo.layers"] == '["fc"]'
    assert run["params"]["note"] == "None"
    assert len(run["params"]["long"]) == 6000 and run["params"]["long"].endswith("chars]")
    assert run["tags"]["algorithm"] == "fedavg" and run["tags"]["partition"] == "p1"
    assert run["metrics"]["mean_acc"] == pytest.approx(0.2)
    assert math.isnan(run["metrics"]["odd_nan"]) and run["metrics"]["odd_inf"] == math.inf
    history = metric_history(uri, run_id, "train_loss")
    assert [step for step, _ in history] == [0, 1, 2]
    assert [value for _, value in history] == pytest.approx([1.0, 0.5, 1 / 3])

    artifacts = Path(run["artifact_uri"].removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "mlartifacts")
    assert (artifacts / "plot.txt").read_text() == "a plot" and (artifacts / "plots" / "plot.txt").exists()
    assert json.loads((artifacts / "summary.json").read_text()) == {"a": [1, 2]}
    assert (artifacts / "cfg" / "config.yaml").read_text() == "a: 1\n"
    assert (artifacts / "per_client.csv").read_text() == "c,d\n"

    assert load_runs(uri, tags={"algorithm": "fedavg"})[0]["run_id"] == run_id
    assert load_runs(uri, tags={"algorithm": "local"}) == []
    assert load_runs(uri, run_ids=[run_id])[0]["run_id"] == run_id
    with pytest.raises(ValueError, match="nosuch"):
        load_runs(uri, experiment="nosuch")


def test_raising_body_ends_failed_and_keeps_earlier_metrics(shared_uri: str):
    uri = shared_uri
    with pytest.raises(RuntimeError, match="diverged"), \
            RunTracker(tracking_uri=uri, experiment="study", run_name="boom") as tracker:
        for step in range(2):
            tracker.log_metrics({"mean_acc": 0.5 + step}, step=step)
        raise RuntimeError("loss diverged at round 2")
    (run,) = load_runs(uri, run_ids=[tracker.run_id])
    assert run["status"] == "FAILED"
    assert run["tags"]["error"] == "RuntimeError: loss diverged at round 2"
    assert metric_history(uri, tracker.run_id, "mean_acc") == [(0, 0.5), (1, 1.5)]


def test_keyboard_interrupt_ends_killed(shared_uri: str):
    uri = shared_uri
    with pytest.raises(KeyboardInterrupt), \
            RunTracker(tracking_uri=uri, experiment="study", run_name="ctrl-c") as tracker:
        tracker.log_metrics({"mean_acc": 0.5}, step=0)
        raise KeyboardInterrupt
    (run,) = load_runs(uri, run_ids=[tracker.run_id])
    assert run["status"] == "KILLED" and run["metrics"] == {"mean_acc": 0.5}


def test_two_trackers_coexist_in_one_process(shared_uri: str):
    uri = shared_uri
    with RunTracker(tracking_uri=uri, experiment="a", run_name="one") as one, \
            RunTracker(tracking_uri=uri, experiment="b", run_name="two") as two:
        one.log_metrics({"m": 1.0}, step=0)
        two.log_metrics({"m": 2.0}, step=0)
    assert one.experiment_id != two.experiment_id
    assert [r["metrics"]["m"] for r in load_runs(uri, experiment="a")] == [1.0]
    assert [r["metrics"]["m"] for r in load_runs(uri, experiment="b")] == [2.0]
    with pytest.raises(RuntimeError, match="not active"):
        one.log_metrics({"m": 3.0}, step=1)


def test_reading_a_missing_store_does_not_create_one(tmp_path: Path):
    uri = default_tracking_uri(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent"):
        load_runs(uri)
    assert not (tmp_path / "absent").exists()


# ---------------------------------------------------------------------------------- parallel


def _parallel_worker(uri: str, index: int, barrier: mp.synchronize.Barrier) -> None:
    """One "training job": waits for the others, then creates the store/experiment and logs."""
    from fedselect.tracking import RunTracker

    barrier.wait(timeout=120)
    with RunTracker(tracking_uri=uri, experiment="parallel-study", run_name=f"job{index}",
                    tags={"job": str(index)}) as tracker:
        tracker.log_params({"job": index, "nested": {"rounds": PARALLEL_ROUNDS}})
        for step in range(PARALLEL_ROUNDS):
            metrics = {f"m{k}": float(index * 1000 + step * 10 + k) for k in range(PARALLEL_METRICS)}
            tracker.log_metrics(metrics, step=step)


def test_parallel_processes_on_a_fresh_sqlite_store_lose_nothing(fresh_uri: str):
    uri = fresh_uri
    ctx = mp.get_context("spawn")
    # all workers hit the still-missing database at the same moment, after their slow imports
    barrier = ctx.Barrier(PARALLEL_WORKERS)
    procs = [ctx.Process(target=_parallel_worker, args=(uri, i, barrier)) for i in range(PARALLEL_WORKERS)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=180)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
    assert [proc.exitcode for proc in procs] == [0] * PARALLEL_WORKERS

    runs = load_runs(uri, experiment="parallel-study")
    assert sorted(r["run_name"] for r in runs) == [f"job{i}" for i in range(PARALLEL_WORKERS)]
    assert {r["status"] for r in runs} == {"FINISHED"}
    assert len({r["experiment_id"] for r in runs}) == 1
    for run in runs:
        index = int(run["tags"]["job"])
        assert run["params"]["job"] == str(index)
        for k in range(PARALLEL_METRICS):
            expected = [(step, float(index * 1000 + step * 10 + k)) for step in range(PARALLEL_ROUNDS)]
            assert metric_history(uri, run["run_id"], f"m{k}") == expected
