"""Checkpoints of a training run's whole federated state, and resuming from them.

Every ``train.checkpoint_every`` rounds and after its last round, a run saves what any later
round depends on: the shared module and the server's global model, every client's and the
server's between-round state (:class:`fedselect.algorithms.base.Checkpointable`: personal
values, packed masks, counters, Ditto's personal model, layer selection's history, ...), the
round logger's totals and history (the run record is built from them), the MLflow run id, the
round, and the global torch/numpy/python random states (per-client draws come from generators
seeded by (seed, client, round) and need no saving; the globals are saved all the same).

File: ``<results_dir>/checkpoints/<experiment>-<run name>-seed<seed>-<config hash>.pt``, written
to a temporary file and moved into place (``os.replace``), so a kill mid-write leaves the
previous checkpoint whole. It is read with ``torch.load(weights_only=True)``: it holds only
tensors and plain containers; PackedTensor, numpy arrays, tuples, OrderedDicts and dataclasses
are written as tagged plain dicts (:mod:`.checkpoint_codec`).

Restart: the same command finds the checkpoint by its config, builds data, model, clients and
server exactly as a new run would (same seed), loads the saved state over them and goes on at
the next round, logging into the same MLflow run. On CPU the finished run is bit-identical to
one never interrupted (tests/test_resume.py). After the run record is written the checkpoint is
deleted: re-running a finished run's command starts a new run.

Metrics: MLflow must end with exactly one point per key and round. Rounds run after the last
checkpoint run again after a restart, so their metrics must not reach MLflow before a
checkpoint covers them: with checkpoints on, the round logger holds each round's metrics (and
their timestamps) until the next checkpoint, which carries them, is written, and logs them
right after. A restart logs the held metrics of its checkpoint again; MLflow does not add a
point with the same key, step, value and timestamp twice, so whether the kill came before or
after that write, each point is there once. The price: MLflow trails the run by up to
``checkpoint_every`` rounds.

A checkpoint that cannot be used is an error, never skipped: unreadable or truncated, another
format, another config, another device kind, or an MLflow run that is gone. The message names
the file and the two ways on: delete it, or start over with ``--set train.resume=false``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedselect import __version__
from fedselect.config import ConfigError, ExperimentConfig
from fedselect.files import atomic_writer, temporary_glob
from fedselect.load_errors import load_failure
from fedselect.tracking import flatten, load_runs

from .checkpoint_codec import decode, encode, rng_state, set_rng_state

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_DIRNAME = "checkpoints"
# config keys that do not change what a run computes; changing them keeps the checkpoint usable
UNHASHED_KEYS = (("train", "checkpoint_every"), ("train", "resume"), ("deploy",))
WAYS_ON = ("Delete it to start this run over, or start over without reading it "
           "(--set train.resume=false; the next checkpoint replaces it).")


class CheckpointError(ConfigError):
    """A checkpoint exists but cannot be used to resume this run.

    A :class:`ConfigError` because the way on is a run option (``train.resume``) or deleting the
    file: the command line reports it in one line, like a bad config key.
    """


# ------------------------------------------------------------------------------ identity


def _hashed_config(config: ExperimentConfig) -> dict[str, Any]:
    raw = config.to_dict()
    for path in UNHASHED_KEYS:
        node = raw
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return raw


def canonical_config(config: ExperimentConfig) -> str:
    """The config as canonical JSON, without :data:`UNHASHED_KEYS` (what the hash covers)."""
    return json.dumps(_hashed_config(config), sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: ExperimentConfig) -> str:
    """sha256 (12 hex digits) of :func:`canonical_config`."""
    return hashlib.sha256(canonical_config(config).encode("utf-8")).hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "_"


def checkpoint_path(config: ExperimentConfig, run_name: str) -> Path:
    """Where the run of ``config`` named ``run_name`` keeps its checkpoint."""
    key = f"{_safe(config.tracking.experiment)}-{_safe(run_name)}-seed{config.seed}-{config_hash(config)}"
    return Path(config.tracking.results_dir) / CHECKPOINT_DIRNAME / f"{key}.pt"


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> str:
    """The first ``limit`` keys whose values differ, as ``key: old -> new``."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    text = ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "no key differs"


# -------------------------------------------------------------------------------- files


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    with atomic_writer(path, "wb") as fh:
        torch.save(state, fh)


_REQUIRED = ("format", "config_hash", "config", "round", "device_type", "mlflow", "model", "server", "clients",
             "logger", "rng", "elapsed_seconds", "resumed_at")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``; anything unreadable is a :class:`CheckpointError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, a pickle weights_only refuses: all unusable
        raise CheckpointError(f"checkpoint {path} cannot be read: {load_failure(exc)}. {WAYS_ON}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a fedselect checkpoint of format {FORMAT_VERSION} "
                              f"(found {found!r}). {WAYS_ON}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}. {WAYS_ON}")
    return state


# ---------------------------------------------------------------------------------- a run


def load_parts(path: Path, device: torch.device, parts: list[tuple[str, Callable[[Any], Any], Any]], *,
               owner: str, hint: str = "") -> None:
    """Decode each saved part onto ``device`` and hand it to its loader, in order; a part that does not
    fit is a :class:`CheckpointError` naming it (``checkpoint P does not fit <owner>'s <part><hint>``)."""
    for name, load, saved in parts:
        try:
            if saved is None:
                raise KeyError(name)
            load(decode(saved, device))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit {owner}'s {name}{hint}: {exc}. {WAYS_ON}") from exc


class RunCheckpointer:
    """One training run's checkpoint: the state it resumes from (read at construction) and its saves.

    ``run_experiment`` builds it before loading data (so a bad checkpoint fails at once), asks
    it for the MLflow run to reopen, calls :meth:`start` once every object of the run exists,
    gives :meth:`save` to the simulation flow, and calls :meth:`remove` once the record is written.
    """

    # which runtime wrote a checkpoint (a file without the key is the simulation's); the cross-silo
    # server's subclass (fedselect.runner.federation_checkpoint) writes its own kind
    mode = "simulation"

    def __init__(self, config: ExperimentConfig, *, run_name: str, device: torch.device) -> None:
        self.config = config
        self.every = config.train.checkpoint_every
        self.device = torch.device(device)
        self.hash = config_hash(config)
        self.path = checkpoint_path(config, run_name)
        # rounds at which this run was resumed, and its wall seconds before the last resume
        self.resumed_at: list[int] = []
        self.previous_seconds = 0.0
        self._run: dict[str, Any] = {}
        for tmp in self.path.parent.glob(temporary_glob(self.path)):
            log.warning("removing %s, a checkpoint write that never finished", tmp)
            tmp.unlink(missing_ok=True)
        self.state = self._load() if config.train.resume else None

    @property
    def resuming(self) -> bool:
        return self.state is not None

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def _load(self) -> dict[str, Any] | None:
        others = sorted(p.name for p in self.path.parent.glob(f"{self.path.stem[:-len(self.hash)]}*.pt")
                        if p != self.path)
        if others:
            log.warning("checkpoint(s) of the same run name under another config, not used: %s (in %s); delete "
                        "them if that config is not coming back", ", ".join(others), self.path.parent)
        if not self.path.exists():
            return None
        state = read_checkpoint(self.path)
        if state.get("mode", "simulation") != self.mode:
            raise CheckpointError(f"checkpoint {self.path} was written by a {state.get('mode', 'simulation')} run, "
                                  f"this is a {self.mode} run. {WAYS_ON}")
        if state["config_hash"] != self.hash:
            diff = config_diff(json.loads(state["config"]), json.loads(canonical_config(self.config)))
            raise CheckpointError(f"checkpoint {self.path} was written by another config ({diff}). {WAYS_ON}")
        if state["device_type"] != self.device.type:
            raise CheckpointError(f"checkpoint {self.path} was written on {state['device_type']}, this run uses "
                                  f"{self.device.type}: resuming on another device would not reproduce the run. "
                                  f"Set `device` to match, or: {WAYS_ON}")
        if state.get("fedselect_version") != __version__:
            log.warning("checkpoint %s was written by fedselect %s, this is %s", self.path,
                        state.get("fedselect_version"), __version__)
        log.warning("resuming from %s after round %d", self.path, state["round"])
        return state

    def mlflow_run_id(self, tracking_uri: str) -> str | None:
        """The MLflow run to reopen (None for a new run); it must still be in ``tracking_uri``."""
        if self.state is None:
            return None
        saved = self.state["mlflow"]
        if saved["tracking_uri"] != tracking_uri:
            raise CheckpointError(f"checkpoint {self.path} logs into MLflow store {saved['tracking_uri']}, this run "
                                  f"into {tracking_uri} (is MLFLOW_TRACKING_URI different?). {WAYS_ON}")
        try:
            found = load_runs(tracking_uri, run_ids=[saved["run_id"]])
        except Exception as exc:
            found, reason = [], f"{type(exc).__name__}: {exc}"
        else:
            reason = "deleted"
        if not found:
            raise CheckpointError(f"checkpoint {self.path} continues MLflow run {saved['run_id']}, which is not in "
                                  f"{tracking_uri} ({reason}). {WAYS_ON}")
        return saved["run_id"]

    def start(self, *, model: torch.nn.Module, clients: list[Any], server: Any, logger: Any, run_id: str,
              tracking_uri: str, started: float) -> int:
        """Attach the run's objects; when resuming, load the saved state into them. Returns the first round.

        Call it last before the flow runs: it sets the global random states.
        """
        self._run = {"model": model, "clients": clients, "server": server, "logger": logger, "run_id": run_id,
                     "tracking_uri": tracking_uri, "started": started}
        if self.state is None:
            return 0
        state, self.state = self.state, None
        if len(state["clients"]) != len(clients):
            raise CheckpointError(f"checkpoint {self.path} holds {len(state['clients'])} clients, this run has "
                                  f"{len(clients)}. {WAYS_ON}")
        clients_parts = [(f"client {cid}", client.load_checkpoint_state, saved)
                         for cid, (client, saved) in enumerate(zip(clients, state["clients"], strict=True))]
        load_parts(self.path, self.device, [("model", model.load_state_dict, state.get("model")),
                                            ("server", server.load_checkpoint_state, state.get("server")),
                                            *clients_parts,
                                            ("round logger", logger.load_checkpoint_state, state.get("logger"))],
                   owner="this run", hint=" (written by another fedselect version?)")
        self.resumed_at = [*state["resumed_at"], int(state["round"]) + 1]
        self.previous_seconds = float(state["elapsed_seconds"])
        # the rounds the checkpoint holds as not confirmed logged: logged now, or found already there
        logger.flush()
        set_rng_state(state["rng"])
        return int(state["round"]) + 1

    def save(self, round_idx: int) -> None:
        """Flow callback: write the state after ``round_idx``, then log the rounds it covers."""
        run = self._run
        if not run:
            raise RuntimeError("RunCheckpointer.save before start()")
        state = {
            "format": FORMAT_VERSION,
            "fedselect_version": __version__,
            "config_hash": self.hash,
            "config": canonical_config(self.config),
            "device_type": self.device.type,
            "round": int(round_idx),
            "resumed_at": list(self.resumed_at),
            "elapsed_seconds": self.elapsed_seconds(),
            "mlflow": {"run_id": run["run_id"], "tracking_uri": run["tracking_uri"]},
            "model": encode(run["model"].state_dict(), "model"),
            "server": encode(run["server"].checkpoint_state(), "server"),
            "clients": [encode(c.checkpoint_state(), f"client {i}") for i, c in enumerate(run["clients"])],
            "logger": encode(run["logger"].checkpoint_state(), "round logger"),
            "rng": rng_state(),
        }
        write_checkpoint(self.path, state)
        run["logger"].flush()

    def elapsed_seconds(self) -> float:
        """Wall seconds of the run so far, over all its attempts (work lost to a kill not counted)."""
        return self.previous_seconds + time.time() - self._run.get("started", time.time())

    def remove(self) -> None:
        """Delete the checkpoint (the run is finished and its record written)."""
        self.path.unlink(missing_ok=True)
