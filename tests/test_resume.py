"""Checkpoint and resume: a run interrupted after round k and restarted ends exactly as one never interrupted.

Runs go through ``run_experiment`` (real FedMLRunner, real MLflow on sqlite in tmp_path) on a tiny
synthetic image set; one integration test kills a real ``fedselect run`` process with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import fedselect.runner.record as record_module
import fedselect.runner.simulate as run_module
from fedselect.config import load_config_dict
from fedselect.core.masks import pack_mask
from fedselect.data import ImageData
from fedselect.engine import EvalResult
from fedselect.fedml_runtime.simulation import SimulationFlow
from fedselect.registry import available_algorithms
from fedselect.runner.checkpoint import (
    CheckpointError,
    RunCheckpointer,
    checkpoint_path,
    read_checkpoint,
    write_checkpoint,
)
from fedselect.runner.checkpoint_codec import decode, encode
from fedselect.tracking import load_runs, metric_history

from .conftest import REPO

ROUNDS = 5
EVERY = 2


def run_experiment(config, **kwargs):
    """The real run_experiment, looked up at call time (the fixture patches its data loading)."""
    return run_module.run_experiment(config, **kwargs)


class Interrupted(Exception):
    """Stands in for a crash or a kill in the middle of a run."""


def tiny_data() -> ImageData:
    """3 classes of 16x16 images whose label is the bright channel (learnable in a few steps)."""
    gen = torch.Generator().manual_seed(11)

    def split(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(3).repeat_interleave(per_class)
        x = torch.randint(0, 60, (len(y), 3, 16, 16), generator=gen, dtype=torch.uint8)
        x[torch.arange(len(y)), y] += 150
        return x, y

    (train_x, train_y), (test_x, test_y) = split(20), split(10)
    return ImageData("tiny", train_x, train_y, test_x, test_y, ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3,
                     "synthetic")


def tiny_config(results: Path, algorithm: str, algo: dict | None = None, **train):
    return load_config_dict({
        "algorithm": algorithm, "seed": 3, "device": "cpu", "algo": algo or {},
        "data": {"dataset": "imagefolder:tiny", "partition": {"kind": "pathological", "num_clients": 3,
                                                              "classes_per_client": 2,
                                                  "train_per_class": 6, "test_per_class": 5}},
        "model": {"name": "cnn"},
        "train": {"rounds": ROUNDS, "local_epochs": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.5,
                  "participation": 0.67, "checkpoint_every": EVERY, **train},
        "tracking": {"experiment": "resume", "results_dir": str(results)},
    })


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite file with its schema in place (creating one takes seconds; copying it, none)."""
    from fedselect.tracking import prepare_store

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    prepare_store(f"sqlite:///{db.as_posix()}")
    return db


@pytest.fixture
def tiny(monkeypatch, empty_store, tmp_path):
    """run_experiment on the synthetic set, one thread, each results folder with its own MLflow
    store; returns the final states of every run that finished, in order."""
    data = tiny_data()
    monkeypatch.setattr(run_module, "load_data", lambda config: data)
    for name in ("whole", "resumed", "."):
        (tmp_path / name).mkdir(exist_ok=True)
        shutil.copy(empty_store, tmp_path / name / "mlflow.db")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; the result does not depend on it
    finals: list[dict] = []
    original = SimulationFlow.run

    def run_and_keep_state(self):
        out = original(self)
        finals.append({"model": plain_vars({"state": self.server.model.state_dict()}),
                       "server": plain_vars(vars(self.server)),
                       "clients": [plain_vars(vars(c)) for c in self.clients]})
        return out

    monkeypatch.setattr(SimulationFlow, "run", run_and_keep_state)
    yield finals
    torch.set_num_threads(threads)


def plain_vars(attrs: dict) -> dict:
    """Every attribute that can be checkpointed (so: all state, not the module, data or context)."""
    out = {}
    for name, value in attrs.items():
        if name in ("model", "data", "ctx", "args"):
            continue
        try:
            out[name] = encode(value, name)
        except TypeError:
            continue
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same(a, b, where="state"):
    """Bit-for-bit equality of encoded states (tensors: same dtype, shape and bytes; NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {b!r:.200}"
        for key in a:
            if not str(key).endswith("_seconds"):  # timings (the solver's) differ between any two runs
                assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def interrupt_at(monkeypatch, round_idx: int) -> None:
    """The next run stops with :class:`Interrupted` as it starts round ``round_idx`` (once)."""
    original = SimulationFlow.run_round
    armed = [True]

    def run_round(self, idx):
        if armed[0] and idx == round_idx:
            armed[0] = False
            raise Interrupted(f"interrupted at round {idx}")
        return original(self, idx)

    monkeypatch.setattr(SimulationFlow, "run_round", run_round)


def histories(record: dict) -> dict[str, list[tuple[int, float]]]:
    uri, run_id = record["tracking_uri"], record["mlflow_run_id"]
    (run,) = load_runs(uri, run_ids=[run_id])
    return {key: metric_history(uri, run_id, key) for key in sorted(run["metrics"])}


# record entries that differ between two runs of the same training by design
RUN_SPECIFIC = {"wall_seconds", "mlflow_run_id", "tracking_uri", "resumed_at_rounds"}


def assert_same_run(whole: dict, resumed: dict, rounds: int = ROUNDS) -> None:
    """Same record (but ids and times), and the same MLflow metrics: one point per round and key."""
    assert_same({k: v for k, v in whole.items() if k not in RUN_SPECIFIC},
                {k: v for k, v in resumed.items() if k not in RUN_SPECIFIC}, "record")
    expected, found = histories(whole), histories(resumed)
    assert list(expected) == list(found)
    for key in expected:
        steps = [step for step, _ in found[key]]
        assert len(steps) == len(set(steps)), f"metric {key} has a round twice: {steps}"
        if not key.endswith("_seconds"):  # wall clock and solver time differ between any two runs
            assert_same(expected[key], found[key], f"metric {key}")
    assert [s for s, _ in found["train_loss"]] == list(range(rounds))


CASES = {
    "fedavg": ("fedavg", {}),
    "fedselect": ("fedselect", {"gradltn_iterations": 2, "gradltn_epochs": 1}),
    "fedselect_grow": ("fedselect", {"mask_search": "grow"}),
    "ditto": ("ditto", {}),
    "lotteryfl": ("lotteryfl", {"acc_threshold": 0.0, "prune_rate": 0.3}),
    "fedbabu": ("fedbabu", {"finetune_epochs": 1}),
    "layersel": ("layersel", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_run_resumes_to_the_same_end(tmp_path, tiny, monkeypatch, case):
    algorithm, algo = CASES[case]
    if algorithm not in available_algorithms():
        pytest.skip(f"{algorithm} is not registered here")
    whole = run_experiment(tiny_config(tmp_path / "whole", algorithm, algo), progress=False)

    config = tiny_config(tmp_path / "resumed", algorithm, algo)
    record_path = tmp_path / "resumed.json"
    interrupt_at(monkeypatch, 3)  # checkpoints after rounds 1 and 3: round 2 is done but lost
    with pytest.raises(Interrupted):
        run_experiment(config, record_path=record_path, progress=False)
    path = checkpoint_path(config, f"{algorithm}-imagefolder:tiny-seed3")
    assert read_checkpoint(path)["round"] == 1 and not record_path.exists()

    resumed = run_experiment(config, record_path=record_path, progress=False)
    assert not path.exists(), "a finished run's checkpoint is deleted once its record is written"
    assert resumed["resumed_at_rounds"] == [2]
    assert json.loads(record_path.read_text())["final_mean_acc"] == whole["final_mean_acc"]
    assert_same_run(whole, resumed)
    # the final state of every client and of the server, bit for bit
    whole_state, resumed_state = tiny
    assert_same(whole_state, resumed_state, case)
    (run,) = load_runs(resumed["tracking_uri"], experiment="resume")
    assert run["run_id"] == resumed["mlflow_run_id"] and run["status"] == "FINISHED"
    assert "error" not in run["tags"] and run["tags"]["resumed_at_rounds"] == "2"


def test_kill_while_logging_after_a_checkpoint_loses_and_doubles_nothing(tmp_path, tiny, monkeypatch):
    whole = run_experiment(tiny_config(tmp_path / "whole", "fedavg"), progress=False)
    config = tiny_config(tmp_path / "resumed", "fedavg")
    # the checkpoint after round 3 is written; its rounds 2 and 3 go to MLflow: die between the two
    original = record_module.RunTracker.log_metrics
    armed = [True]

    def log_metrics(self, metrics, step, **kwargs):
        if armed[0] and step == 3:
            armed[0] = False
            raise Interrupted("killed while logging round 3")
        return original(self, metrics, step, **kwargs)

    monkeypatch.setattr(record_module.RunTracker, "log_metrics", log_metrics)
    with pytest.raises(Interrupted):
        run_experiment(config, progress=False)
    assert read_checkpoint(checkpoint_path(config, "fedavg-imagefolder:tiny-seed3"))["round"] == 3
    resumed = run_experiment(config, progress=False)
    assert resumed["resumed_at_rounds"] == [4]
    assert_same_run(whole, resumed)


def test_kill_after_the_last_round_finishes_without_training_again(tmp_path, tiny, monkeypatch):
    whole = run_experiment(tiny_config(tmp_path / "whole", "fedselect", {"gradltn_iterations": 2}), progress=False)
    config = tiny_config(tmp_path / "resumed", "fedselect", {"gradltn_iterations": 2})
    original = record_module.per_client_csv
    armed = [True]

    def per_client_csv(*args):
        if armed[0]:
            armed[0] = False
            raise Interrupted("killed while writing the artifacts")
        return original(*args)

    monkeypatch.setattr(record_module, "per_client_csv", per_client_csv)
    with pytest.raises(Interrupted):
        run_experiment(config, progress=False)
    assert read_checkpoint(checkpoint_path(config, "fedselect-imagefolder:tiny-seed3"))["round"] == ROUNDS - 1
    resumed = run_experiment(config, progress=False)
    assert resumed["resumed_at_rounds"] == [ROUNDS]
    assert_same_run(whole, resumed)
    assert_same(tiny[0], tiny[1])


def test_without_checkpoints_metrics_are_logged_as_rounds_end(tmp_path, tiny, monkeypatch):
    config = tiny_config(tmp_path, "fedavg", checkpoint_every=0)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        run_experiment(config, progress=False)
    assert not checkpoint_path(config, "fedavg-imagefolder:tiny-seed3").exists()
    (run,) = load_runs(default_uri(tmp_path), experiment="resume")
    assert [s for s, _ in metric_history(default_uri(tmp_path), run["run_id"], "train_loss")] == [0, 1, 2]
    assert run["status"] == "FAILED"


def default_uri(results: Path) -> str:
    return f"sqlite:///{(results.resolve() / 'mlflow.db').as_posix()}"


def interrupted_checkpoint(tmp_path, monkeypatch, **train) -> tuple:
    config = tiny_config(tmp_path, "fedavg", rounds=3, **train)
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_experiment(config, progress=False)
    path = checkpoint_path(config, "fedavg-imagefolder:tiny-seed3")
    assert path.exists()
    return config, path


def test_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path, tiny, monkeypatch):
    config, path = interrupted_checkpoint(tmp_path, monkeypatch)
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b"", b"not a checkpoint"):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError) as err:
            run_experiment(config, progress=False)
        assert str(path) in str(err.value) and "train.resume=false" in str(err.value)
    torch.save({"format": 99}, path)
    with pytest.raises(CheckpointError, match="format"):
        run_experiment(config, progress=False)
    # the way on: start over without reading it (the new run replaces, then deletes, the file)
    fresh = load_config_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "resume": False}})
    record = run_experiment(fresh, progress=False)
    assert record["resumed_at_rounds"] == [] and record["final_round"] == 2 and not path.exists()


def test_checkpoint_of_another_config_or_store_is_refused(tmp_path, tiny, monkeypatch):
    config, path = interrupted_checkpoint(tmp_path, monkeypatch)
    name = "fedavg-imagefolder:tiny-seed3"
    # options that do not change what is computed keep the checkpoint
    assert checkpoint_path(tiny_config(tmp_path, "fedavg", rounds=3, checkpoint_every=1, resume=False), name) == path
    other = tiny_config(tmp_path, "fedavg", rounds=3, lr=0.07)
    other_path = checkpoint_path(other, name)
    assert other_path != path and other_path.parent == path.parent
    shutil.copy(path, other_path)
    with pytest.raises(CheckpointError, match=r"another config \(train.lr: 0.05 -> 0.07\)"):
        RunCheckpointer(other, run_name=name, device=torch.device("cpu"))
    other_path.unlink()
    checkpointer = RunCheckpointer(config, run_name=name, device=torch.device("cpu"))
    assert checkpointer.resuming
    with pytest.raises(CheckpointError, match="MLflow store"):
        checkpointer.mlflow_run_id(default_uri(tmp_path / "elsewhere"))
    (tmp_path / "mlflow.db").unlink()
    with pytest.raises(CheckpointError, match="not in"):
        checkpointer.mlflow_run_id(default_uri(tmp_path))


@dataclasses.dataclass(frozen=True)
class NotOurs:
    x: int = 1


def test_plain_encoding_round_trips_and_loads_with_weights_only(tmp_path):
    mask = {"w": torch.tensor([[True, False, True], [False, False, True]])}
    value = {
        "packed": pack_mask(mask), "array": np.arange(6, dtype=np.uint32).reshape(2, 3), "bools": np.eye(2) > 0,
        "scalar": np.float32(1.5), "eval": EvalResult(3, 4, 0.25), "ordered": OrderedDict(b=torch.ones(2), a=None),
        "pairs": [(1, "x"), (2, "y")], 7: float("-inf"), "view": torch.arange(10.0)[2:4],
    }
    path = tmp_path / "c.pt"
    write_checkpoint(path, {"value": encode(value)})
    back = decode(torch.load(path, weights_only=True)["value"])
    packed = back["packed"]["w"]
    assert type(packed).__name__ == "PackedTensor" and packed.shape == (2, 3)
    assert torch.equal(packed.bits, value["packed"]["w"].bits)
    assert back["array"].dtype == np.uint32 and np.array_equal(back["array"], value["array"])
    assert back["bools"].dtype == bool and back["scalar"] == np.float32(1.5) and type(back["scalar"]) is np.float32
    assert back["eval"] == EvalResult(3, 4, 0.25)
    assert isinstance(back["ordered"], OrderedDict) and list(back["ordered"]) == ["b", "a"]
    assert back["pairs"] == [(1, "x"), (2, "y")] and back[7] == float("-inf")
    assert torch.equal(back["view"], torch.tensor([2.0, 3.0])) and back["view"].untyped_storage().nbytes() == 8
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TypeError, match=r"state\['x'\]: object"):
        encode({"x": object()})
    forged = encode(NotOurs())
    forged["type"] = "os:system"
    with pytest.raises(TypeError, match="outside the fedselect package"):
        decode(forged)


def test_every_algorithm_state_can_be_checkpointed(tmp_path, tiny):
    """All registered algorithms: after a run, every client's and the server's declared state encodes."""
    for algorithm in available_algorithms():
        record = run_experiment(tiny_config(tmp_path, algorithm, rounds=1, local_epochs=0),
                                progress=False)
        assert record["rounds"] == 1


@pytest.mark.integration
def test_sigkilled_cli_run_resumes_to_the_same_end(tmp_path, data_root, empty_store):
    """A real `fedselect run` killed with SIGKILL after a checkpoint, restarted with the same command."""
    exe = Path(sys.executable).with_name("fedselect")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDSELECT_DATA_ROOT": str(data_root)}
    rounds = 4

    def command(results: Path) -> list[str]:
        results.mkdir()
        shutil.copy(empty_store, results / "mlflow.db")
        return [str(exe), "run", "--config", str(REPO / "configs" / "smoke.yaml"), "--no-progress",
                "--set", "device=cpu", "--set", "algorithm=fedselect", "--set", "algo.gradltn_iterations=2",
                "--set", "algo.gradltn_epochs=1", "--set", "data.partition.num_clients=2",
                "--set", "data.partition.train_per_class=5", "--set", "data.partition.test_per_class=5",
                "--set", f"train.rounds={rounds}", "--set", "train.checkpoint_every=1",
                "--set", f"tracking.results_dir={results}", "--out", str(results / "record.json")]

    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_proc = subprocess.Popen(command(whole_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
    resume_command = command(killed_dir)
    proc = subprocess.Popen(resume_command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed_dir / "checkpoints").glob("*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "record.json").exists(), "the run finished before it could be killed"
    again = subprocess.run(resume_command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    _, whole_err = whole_proc.communicate(timeout=600)
    assert whole_proc.returncode == 0, whole_err[-3000:]
    whole = json.loads((whole_dir / "record.json").read_text())
    resumed = json.loads((killed_dir / "record.json").read_text())
    assert len(resumed["resumed_at_rounds"]) == 1 and 1 <= resumed["resumed_at_rounds"][0] < rounds
    assert not list((killed_dir / "checkpoints").glob("*"))
    assert_same_run(whole, resumed, rounds=rounds)
