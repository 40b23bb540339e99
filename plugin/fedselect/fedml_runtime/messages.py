"""The cross-silo wire vocabulary shared by server and client managers: our message types and
keys (beside FedML's own), the JSON forms of plans and evaluations, and the receive loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedselect.engine import EvalResult
from fedselect.fedml_bridge import import_fedml

import_fedml()
from fedml.cross_silo.server.message_define import MyMessage  # noqa: E402

# new message types (FedML's own stop below 10)
MSG_C2S_PLAN_REPORT = 100
MSG_S2C_PLAN = 101
MSG_C2S_EVAL_RESULT = 102
STATUS_FAILED = "FAILED"
KEY_TRAIN = "fedselect_train"
KEY_EVAL_ROUND = "fedselect_eval_round"
KEY_PLAN = "fedselect_plan"
KEY_REPORT = "fedselect_report"
KEY_EVAL = "fedselect_eval"
KEY_META = "fedselect_meta"
KEY_DESCRIPTOR = "fedselect_descriptor"
KEY_REASON = "fedselect_reason"
# a client's first model message: the state it starts from (JSON: a new federation, or resuming)
KEY_RESTORE = "fedselect_restore"
# every model message: the last round the server has checkpointed (-1: none)
KEY_CHECKPOINTED = "fedselect_checkpointed"
MODEL_MESSAGES = (str(MyMessage.MSG_TYPE_S2C_INIT_CONFIG), str(MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT))


class FederationError(RuntimeError):
    """The federation stopped: a client failed (policy "error"), too few remain, or bad input."""


def to_json(value: Any, what: str) -> str:
    """Compact JSON text of a planning message; anything not JSON-safe fails here, naming it."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a JSON-safe dict: {exc}") from exc


def eval_to_json(result: EvalResult) -> str:
    return json.dumps({"correct": int(result.correct), "total": int(result.total), "loss_sum": float(result.loss_sum),
                       "adapt_sample_passes": int(result.adapt_sample_passes)})


def eval_from_json(text: str) -> EvalResult:
    d = json.loads(text)
    return EvalResult(correct=int(d["correct"]), total=int(d["total"]), loss_sum=float(d["loss_sum"]),
                      adapt_sample_passes=int(d.get("adapt_sample_passes", 0)))


def eval_due(round_idx: int, rounds: int, eval_every: int) -> bool:
    """The simulation's rule: every ``eval_every`` rounds, and always after the last."""
    return (round_idx + 1) % eval_every == 0 or round_idx + 1 == rounds


def run_until_done(manager: Any, on_interrupt: Callable[[], None]) -> None:
    """FedML's receive loop of ``manager`` until the federation ends; on Ctrl-C ``on_interrupt``
    tells the peers first; a failure the manager recorded (``manager.error``) is raised."""
    try:
        manager.run()
    except KeyboardInterrupt:
        on_interrupt()
        raise
    finally:
        if manager.com_manager.is_running:
            manager.com_manager.stop_receive_message()
    if manager.error is not None:
        raise FederationError(manager.error)
