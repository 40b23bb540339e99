"""Resumable federations (issue 17): kill the server mid-run after a checkpoint, start ``serve`` and the
clients again, and the federation ends with the metrics and the MLflow run of one never interrupted.

``toyper`` (FedPer: a personal head on each client, so a client's own checkpoint matters, plus a pause
per local update so that the kill lands mid-round) reaches the processes through
``--plugin tests.test_cross_silo_resume``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedselect.algorithms.base import FedAvgServer
from fedselect.algorithms.fedper import FedPerClient
from fedselect.config import load_config_dict
from fedselect.registry import register
from fedselect.runner.federation_checkpoint import ClientSnapshots, FederationCheckpointer, checkpoint_due
from fedselect.runner.processes import Fleet
from fedselect.tracking import load_runs, run_tracking_uri

from .test_algorithms import make_run
from .test_cross_silo import (
    FEDERATION_TIMEOUT_S,
    federate,
    history,
    logs,
    raw_config,
    start,
    tiny_folder,
    wait_for,
    write_config,
)

_ = tiny_folder  # a fixture, used by name
PLUGIN = ["tests.test_cross_silo_resume"]
ROUNDS = 5


@dataclass(frozen=True)
class PauseOptions:
    # every local update waits this long
    sleep_s: float = 0.0


class PausingFedPerClient(FedPerClient):
    Options = PauseOptions

    def local_update(self):
        time.sleep(self.options.sleep_s)
        return super().local_update()


register("toyper", client=PausingFedPerClient, server=FedAvgServer, options=PauseOptions,
         summary="test only: FedPer (personal head) with a pause per local update")


def resume_config(folder: Path, tiny: Path) -> dict:
    return raw_config(folder, tiny, algorithm="toyper", algo={"sleep_s": 0.7},
                      train={"rounds": ROUNDS, "checkpoint_every": 2}, deploy={"peer_timeout_s": 3})


def every_metric(record: dict) -> dict[str, list[tuple[int, float]]]:
    (run,) = load_runs(record["tracking_uri"], run_ids=[record["mlflow_run_id"]])
    return {key: history(record, key) for key in sorted(run["metrics"])}


# ------------------------------------------------------------------ offline pieces

def test_client_snapshots_keep_what_a_checkpoint_can_ask_for(tmp_path):
    config, *_, trainers, _, _ = make_run("fedper", num_clients=1)
    config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, results_dir=str(tmp_path)))
    snaps = ClientSnapshots(config, run_name="x", rank=1, device=torch.device("cpu"))
    trainer = trainers[0]
    snaps.restore({"run": "r1", "round": -1}, trainer)
    for round_idx in (0, 2, 3):
        trainer.round_idx += 1
        snaps.save(round_idx, trainer)
    snaps.prune(2)  # a checkpoint after round 2 may ask for round 2's state, or anything later
    assert snaps.rounds() == [2, 3]
    fresh = make_run("fedper", num_clients=1)[6][0]
    snaps.restore({"run": "r1", "round": 2, "trained_round": 2, "round_idx": 2}, fresh)
    assert fresh.round_idx == 2
    with pytest.raises(Exception, match="holds \\[3, 4\\]"):
        snaps.restore({"run": "r1", "round": 1, "trained_round": 0, "round_idx": 1}, fresh)
    with pytest.raises(Exception, match="belongs to MLflow run r1"):
        snaps.restore({"run": "other", "round": 2, "trained_round": 2, "round_idx": 2}, fresh)
    snaps.restore({"run": "r2", "round": -1}, fresh)  # a new federation: the old snapshots go
    assert snaps.rounds() == []
    assert [r for r in range(2) if checkpoint_due(config, r)] == [1]  # rounds=2, every 5: after the last only
    assert FederationCheckpointer.mode == "cross_silo"


# ------------------------------------------------------------------ the acceptance test (real processes)

@pytest.mark.integration
def test_a_killed_server_resumes_to_the_uninterrupted_federation(tmp_path, tiny_folder):  # noqa: F811
    (tmp_path / "reference").mkdir()
    reference, fleet = federate(tmp_path / "reference", resume_config(tmp_path / "reference", tiny_folder),
                                plugins=PLUGIN)
    assert reference is not None and all(m.returncode == 0 for m in fleet.members), logs(fleet)

    folder = tmp_path / "killed"
    folder.mkdir()
    raw = resume_config(folder, tiny_folder)
    config = write_config(folder, raw)
    record = folder / "federated.json"
    with Fleet(folder / "logs-1") as fleet:
        start(fleet, config, [1, 2], record=record, plugins=PLUGIN)
        server = fleet.members[0]
        wait_for(server, "checkpoint after round 2")
        fleet.kill(server)  # SIGKILL while round 3 is under way
        fleet.wait(timeout_s=60, leader="server", grace_s=30)
    assert [m.returncode for m in fleet.members][1:] == [1, 1], logs(fleet)  # the clients saw it die
    assert not record.exists() and "round 4/5" not in server.log_path.read_text()
    (checkpoint,) = (folder / "results" / "checkpoints").glob("*.pt")
    snapshots = sorted(p.name for p in (folder / "results" / "checkpoints").glob("*-rank*"))
    assert len(snapshots) == 2
    (killed_run,) = load_runs(run_tracking_uri(load_config_dict(raw).tracking))
    assert killed_run["status"] == "RUNNING"

    with Fleet(folder / "logs-2") as fleet:
        start(fleet, config, [1, 2], record=record, plugins=PLUGIN)
        fleet.wait(timeout_s=FEDERATION_TIMEOUT_S, leader="server", grace_s=20)
    assert all(m.returncode == 0 for m in fleet.members), logs(fleet)
    assert "resuming the federation at round 3/5" in fleet.members[0].log_path.read_text()
    resumed = json.loads(record.read_text())
    assert resumed["mlflow_run_id"] == killed_run["run_id"] and resumed["resumed_at_rounds"] == [2]
    for key in ("per_client_acc", "mean_acc_per_round", "bytes_up_per_round", "bytes_down_per_round",
                "final_mean_acc", "best_mean_acc", "best_round", "train_sample_passes_total", "clients_failed",
                "evaluated_clients", "updates_dropped"):
        assert resumed[key] == reference[key], key
    ours, theirs = every_metric(resumed), every_metric(reference)
    assert sorted(ours) == sorted(theirs)
    for key, points in theirs.items():
        if key in ("round_seconds", "wall_seconds") or key.startswith("wire_bytes"):
            # timings, and the first resumed round's model messages carry the restore note
            assert [step for step, _ in ours[key]] == [step for step, _ in points], key
        else:
            assert ours[key] == points, key  # one point per round, the same value to the bit
    (run,) = load_runs(resumed["tracking_uri"])
    assert run["status"] == "FINISHED"
    assert not checkpoint.exists() and not list((folder / "results" / "checkpoints").glob("*-rank*"))
