"""Checkpoints of a cross-silo federation: the server's, and each client's own, so that ``serve`` and
``join`` started again after a crash resume the same MLflow run to the same metrics.

Server (:class:`FederationCheckpointer`, a :class:`~fedselect.runner.checkpoint.RunCheckpointer`
writing ``mode: cross_silo``): every ``train.checkpoint_every`` rounds and after the last, the global
state and the server's between-round state (taken when the round is aggregated, before the next
round's plans can touch it), the round logger (after the round's evaluation), the global random
states, the MLflow run, which clients are live or failed, the wire bytes and dropped updates so far,
each client's data sizes, and every client's round counter: the rounds it trained in. Written like
the simulation's (temporary file, ``os.replace``), at
``<results_dir>/checkpoints/<experiment>-<run name>-seed<seed>-<config hash>.pt``.

Client (:class:`ClientSnapshots`): after each local update, its between-round state (the
trainer's ``checkpoint_state``: personal values, masks, counters) as ``round-<r>.pt`` in
``<results_dir>/checkpoints/<experiment>-<run name>-seed<seed>-<config hash>-rank<K>/`` on its own
machine. The server's first model message to a client names the state to start from: a fresh
federation (old snapshots are deleted) or, resuming after round R, the client's snapshot of the last
round <= R it trained in and its round counter then; a missing or mismatching snapshot is an error
naming the folder. Model messages also carry the last round the server has checkpointed, and a client
deletes the snapshots no checkpoint can ask for any more; a finished federation deletes them all.

What the checkpoint does not cover: a round's wire byte counts include the restore note on the first
model message to each client after a restart, and ``round_seconds`` is measured anew.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fedselect import __version__
from fedselect.config import ExperimentConfig
from fedselect.fedml_runtime.messages import FederationError
from fedselect.files import atomic_writer
from fedselect.load_errors import load_failure

from .checkpoint import (
    FORMAT_VERSION,
    WAYS_ON,
    CheckpointError,
    RunCheckpointer,
    canonical_config,
    checkpoint_path,
    load_parts,
    write_checkpoint,
)
from .checkpoint_codec import decode, encode, rng_state, set_rng_state

log = logging.getLogger(__name__)


def checkpoint_due(config: ExperimentConfig, round_idx: int) -> bool:
    """The simulation's rule: every ``checkpoint_every`` rounds and after the last one (never when 0)."""
    every = config.train.checkpoint_every
    return every > 0 and ((round_idx + 1) % every == 0 or round_idx + 1 == config.train.rounds)


def data_sizes(descriptors: dict[int, dict[str, Any]]) -> dict[str, list[int]]:
    """What must not change between a federation and its resumption: each client's data sizes."""
    return {str(c): [int(d["num_train"]), int(d["num_test"])] for c, d in sorted(descriptors.items())}


class FederationCheckpointer(RunCheckpointer):
    """The cross-silo server's checkpoint: read when ``serve`` starts, written by the server manager."""

    mode = "cross_silo"

    def __init__(self, config: ExperimentConfig, *, run_name: str, device: torch.device) -> None:
        super().__init__(config, run_name=run_name, device=device)
        fed = self.state["federation"] if self.state is not None else {}
        self.start_round = int(self.state["round"]) + 1 if self.state is not None else 0
        self.failed: dict[int, str] = {int(c): str(r) for c, r in fed.get("failed", {}).items()}
        self.trained: dict[int, list[int]] = {int(c): list(r) for c, r in fed.get("trained", {}).items()}
        self.wire: list[dict[str, float]] = list(fed.get("wire", []))
        self.dropped: list[list[Any]] = list(fed.get("dropped", []))
        self.written = self.start_round - 1  # the last round a checkpoint covers (-1: none)
        self._captured: tuple[int, dict[str, Any]] | None = None

    def due(self, round_idx: int) -> bool:
        return checkpoint_due(self.config, round_idx)

    def start_federation(self, *, model: torch.nn.Module, server: Any, logger: Any, run_id: str, tracking_uri: str,
                         started: float, descriptors: dict[int, dict[str, Any]]) -> int:
        """Attach the run's objects; when resuming, load the saved state into them. Returns the first round."""
        self._run = {"model": model, "server": server, "logger": logger, "run_id": run_id,
                     "tracking_uri": tracking_uri, "started": started, "sizes": data_sizes(descriptors)}
        if self.state is None:
            return 0
        state, self.state = self.state, None
        saved = state["federation"]["sizes"]
        if any(saved.get(c) != sizes for c, sizes in self._run["sizes"].items()):
            raise CheckpointError(f"checkpoint {self.path}: the clients describe other data than the checkpointed "
                                  f"federation's (train/test sizes {self._run['sizes']}, saved {saved}). {WAYS_ON}")
        load_parts(self.path, self.device, [("model", model.load_state_dict, state.get("model")),
                                            ("server", server.load_checkpoint_state, state.get("server")),
                                            ("round logger", logger.load_checkpoint_state, state.get("logger"))],
                   owner="this federation")
        self.resumed_at = [*state["resumed_at"], self.start_round]
        self.previous_seconds = float(state["elapsed_seconds"])
        logger.flush()  # the rounds the checkpoint holds as not confirmed logged
        set_rng_state(state["rng"])
        return self.start_round

    def restore_note(self, cid: int) -> dict[str, Any]:
        """What client ``cid`` starts from (sent with its first model message): see the module docstring."""
        note: dict[str, Any] = {"run": self._run.get("run_id"), "round": self.start_round - 1}
        if self.start_round > 0:
            rounds = [r for r in self.trained.get(cid, []) if r < self.start_round]
            note.update(trained_round=max(rounds, default=-1), round_idx=len(rounds))
        return note

    def capture(self, round_idx: int) -> None:
        """The server's state right after aggregating ``round_idx`` (a checkpoint round), frozen."""
        run = self._run
        self._captured = (round_idx, copy.deepcopy({"model": encode(run["model"].state_dict(), "model"),
                                                    "server": encode(run["server"].checkpoint_state(), "server"),
                                                    "rng": rng_state()}))

    def write(self, round_idx: int, *, live: set[int], failed: dict[int, str], trained: dict[int, list[int]],
              wire: list[dict[str, float]], dropped: list[list[Any]]) -> bool:
        """After ``round_idx`` is logged: write its checkpoint (if captured), then log what it covers."""
        if self._captured is None or self._captured[0] != round_idx:
            return False
        _, frozen = self._captured
        self._captured = None
        run = self._run
        state = {
            "format": FORMAT_VERSION, "fedselect_version": __version__, "mode": self.mode,
            "config_hash": self.hash, "config": canonical_config(self.config), "device_type": self.device.type,
            "round": int(round_idx), "resumed_at": list(self.resumed_at), "elapsed_seconds": self.elapsed_seconds(),
            "mlflow": {"run_id": run["run_id"], "tracking_uri": run["tracking_uri"]},
            **frozen, "clients": [], "logger": encode(run["logger"].checkpoint_state(), "round logger"),
            "federation": {"live": sorted(live), "failed": {str(c): r for c, r in failed.items()},
                           "trained": {str(c): [r for r in rs if r <= round_idx] for c, rs in trained.items()},
                           "wire": list(wire), "dropped": list(dropped), "sizes": run["sizes"]},
        }
        write_checkpoint(self.path, state)
        run["logger"].flush()
        self.written = round_idx
        return True


def _key(config: ExperimentConfig, run_name: str) -> str:
    return checkpoint_path(config, run_name).stem


class ClientSnapshots:
    """One cross-silo client's own checkpoints (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, *, run_name: str, rank: int, device: torch.device) -> None:
        self.enabled = config.train.checkpoint_every > 0
        self.device = torch.device(device)
        self.folder = checkpoint_path(config, run_name).parent / f"{_key(config, run_name)}-rank{rank}"
        self.run: str | None = None

    def rounds(self) -> list[int]:
        """The rounds this client holds snapshots of."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := re.fullmatch(r"round-(\d+)\.pt", p.name)))

    def _file(self, round_idx: int) -> Path:
        return self.folder / f"round-{round_idx}.pt"

    def save(self, round_idx: int, trainer: Any) -> None:
        """This client's state after training ``round_idx`` (written before its upload is sent)."""
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        blob = {"format": FORMAT_VERSION, "run": self.run, "round": int(round_idx),
                "round_idx": int(trainer.round_idx), "state": encode(trainer.checkpoint_state(), "client")}
        with atomic_writer(self._file(round_idx), "wb") as fh:
            torch.save(blob, fh)

    def restore(self, note: dict[str, Any], trainer: Any) -> None:
        """Start from what the server's first model message says: fresh, or a snapshot of this client's."""
        self.run = note.get("run")
        if int(note.get("round", -1)) < 0:
            self.clear()  # a new federation: earlier snapshots belong to another one
            return
        trained, expected = int(note["trained_round"]), int(note["round_idx"])
        ways = ("Delete the server's checkpoint or start it over (--set train.resume=false) to run the federation "
                "from round 1")
        if trained < 0:
            if trainer.round_idx != expected:
                raise FederationError(f"resuming: the server expects round counter {expected}, a new client has "
                                      f"{trainer.round_idx}")
            return  # never trained before the checkpoint: the state it was built with
        path = self._file(trained)
        if not path.is_file():
            raise FederationError(f"resuming after round {note['round'] + 1}: the server expects this client's "
                                  f"checkpoint of round {trained + 1}, and {self.folder} holds "
                                  f"{[r + 1 for r in self.rounds()] or 'none'}. {ways}")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise FederationError(f"resuming: cannot read {path}: {load_failure(exc)}. {ways}") from None
        if blob.get("run") != self.run or int(blob.get("round_idx", -1)) != expected:
            raise FederationError(f"resuming: {path} belongs to MLflow run {blob.get('run')} at round counter "
                                  f"{blob.get('round_idx')}, the server resumes run {self.run} expecting {expected}. "
                                  f"{ways}")
        trainer.load_checkpoint_state(decode(blob["state"], self.device))
        log.warning("client resumed from %s (trained %d rounds)", path, expected)

    def prune(self, checkpointed: int) -> None:
        """Delete the snapshots no checkpoint can ask for: all older than the newest one <= ``checkpointed``."""
        if checkpointed < 0:
            return
        covered = [r for r in self.rounds() if r <= checkpointed]
        for r in covered[:-1]:
            self._file(r).unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every snapshot (a finished federation, or a new one)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def to_note(text: Any) -> dict[str, Any]:
    """The restore note of a model message (JSON text)."""
    note = json.loads(text)
    if not isinstance(note, dict) or "round" not in note:
        raise FederationError(f"malformed restore note from the server: {str(text)[:200]}")
    return note
