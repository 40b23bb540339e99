"""Every upload defect of issue 17, for both ``train.on_bad_update`` modes, through the cross-silo server's
public path: upload messages into the server manager's ``receive_message``, the round's result out.

The manager is the real :class:`~fedselect.fedml_runtime.cross_silo.FedSelectServerManager` with the real
FedAvg server; only its channel is a stand-in (nothing is sent: no client is live to receive the next
model), so a round is two upload messages in and one :class:`RoundResult` (or a stop) out. ``drop``: the
defective upload is named in the round's dropped updates and the other client's upload alone is
averaged; ``error``: the federation stops naming the client, a ``BadUpdateError``, never a raw exception.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.message_define import MyMessage

from fedselect.fedml_runtime.cross_silo import FedSelectServerManager
from fedselect.fedml_runtime.deadlines import AnswerClock
from fedselect.fedml_runtime.grpc_channel import KEY_ROUND, decode_message, encode_message
from fedselect.fedml_runtime.messages import KEY_META

from .test_algorithms import make_run


class QuietChannel:
    """What the manager needs of its channel when no client is live: traffic, and stopping."""

    traffic: list[Any] = []
    is_running = True

    def stop_receive_message(self) -> None:
        self.is_running = False


def server_manager(on_bad_update: str) -> tuple[FedSelectServerManager, list[Any], list[Any]]:
    """A manager in round 0 of a one-round federation of two clients, waiting for both uploads."""
    config, _, args, _, _, _, trainers, server, _ = make_run("fedavg", rounds=1, num_clients=2,
                                                            on_bad_update=on_bad_update)
    m = FedSelectServerManager.__new__(FedSelectServerManager)
    results: list[Any] = []
    now = time.monotonic()
    m.__dict__.update(
        config=config, deploy=config.deploy, transport=SimpleNamespace(secure=True), num_clients=2, rounds=1,
        args=args, on_round_end=lambda result, wire: results.append(result), server=server,
        descriptors={c: {"num_train": t.local_sample_number} for c, t in enumerate(trainers)}, live=set(),
        failed={}, phase="rounds", round_idx=0, pending={("upload", 0): now, ("upload", 1): now}, sampled=[0, 1],
        sent_init=set(), uploads={}, reports={}, plans={}, plan_pending=False, evals={}, rejected=[], stashed=None,
        error=None, config_error=None, round_started={0: now}, started=now, com_manager=QuietChannel(),
        message_handler_dict={}, backend="GRPC", clock=AnswerClock(None), trained={}, checkpoints=None)
    m.register_message_receive_handlers()
    return m, trainers, results


META = {"train_loss": 0.5, "download_nbytes": 100, "metrics": {"train_sample_passes": 24.0}}


def send(m: FedSelectServerManager, cid: int, payload: Any, num_samples: Any, meta: Any = None) -> None:
    """One upload message from client ``cid``, through the wire format, into the manager."""
    msg = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, cid + 1, 0)
    msg.add_params(MyMessage.MSG_ARG_KEY_MODEL_PARAMS, payload)
    msg.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, num_samples)
    msg.add_params(KEY_ROUND, 0)
    msg.add_params(KEY_META, meta if isinstance(meta, str) else json.dumps(meta or META))
    msg = decode_message(encode_message(msg))  # what reaches the server is what the wire restores
    m.receive_message(msg.get_type(), msg)


def first(payload: dict) -> str:
    return next(iter(payload["tensors"]))


def retyped(dtype: torch.dtype, fill: Any) -> Callable[[dict], None]:
    def forge(p: dict) -> None:
        name = first(p)
        p["tensors"][name] = torch.full_like(p["tensors"][name], fill, dtype=dtype)
    return forge


# (what the client sends instead: forge(payload), or the message's sample count; the rejection's words)
DEFECTS: dict[str, tuple[Callable[[dict], None] | None, Any, Any, list[str]]] = {
    "int64 tensor": (retyped(torch.int64, 7), None, None, ["dtype torch.int64", "torch.float32"]),
    "bool tensor": (retyped(torch.bool, True), None, None, ["dtype torch.bool", "torch.float32"]),
    "extra key": (lambda p: p.update(extra=torch.zeros(1_000_000)), None, None, ["unexpected keys ['extra']",
                                                                                  "must be exactly"]),
    "missing key": (lambda p: p.pop("partial"), None, None, ["lacks keys ['partial']"]),
    "list value": (lambda p: p["tensors"].update({first(p): p["tensors"][first(p)].tolist()}), None, None,
                   ["is a list, not a tensor"]),
    "sparse tensor": (lambda p: p["tensors"].update({first(p): p["tensors"][first(p)].to_sparse()}), None, None,
                      ["torch.sparse_coo tensor", "torch.strided"]),
    "nan values": (lambda p: p["tensors"][first(p)].fill_(float("nan")), None, None, ["non-finite values"]),
    "nan samples": (None, float("nan"), None, ["'num_samples' (message) is nan", "joined with 24"]),
    "negative samples": (lambda p: p.update(num_samples=-1000), -1000, None,
                         ["'num_samples' (message) is -1000", "joined with 24"]),
    "float samples": (None, 24.0, None, ["'num_samples' (message) is 24.0"]),
    "bool samples": (None, True, None, ["'num_samples' (message) is True"]),
    "payload claims 4000": (lambda p: p.update(num_samples=4000), None, None,
                            ["'num_samples' (payload) is 4000", "joined with 24"]),
    "another client id": (lambda p: p.update(client_id=0), None, None,
                          ["'client_id' is 0", "sent by client 1 (rank 2, its certificate)"]),
    "metrics not numbers": (None, None, {**META, "metrics": {"x": "many"}}, ["'metrics' must map names to numbers"]),
    "meta keys": (None, None, {**META, "extra": 1}, ["exactly the keys"]),
    "meta not json": (None, None, "{not json", ["not JSON text"]),
}


@pytest.mark.parametrize("mode", ["drop", "error"])
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_upload_defect_is_rejected_in_both_modes(defect, mode):
    forge, num_samples, meta, words = DEFECTS[defect]
    m, trainers, results = server_manager(mode)
    before = {k: v.clone() for k, v in m.server.get_model_params().items()}
    good = trainers[0].get_model_params()
    bad = trainers[1].get_model_params()
    with torch.no_grad():  # the good client's upload moves the model, so averaging it in shows
        for value in good["tensors"].values():
            if value.is_floating_point():
                value.add_(1.0)
    if forge is not None:
        forge(bad)
    send(m, 0, good, 24)
    send(m, 1, bad, 24 if num_samples is None else num_samples, meta)
    if mode == "drop":
        assert m.error is None and len(results) == 1, m.error
        (dropped,) = results[0].dropped
        assert dropped[0] == 1, dropped
        for word in words:
            assert word in dropped[1], (word, dropped[1])
        # only the good upload was averaged: the new model is exactly it
        after = m.server.get_model_params()
        assert all(torch.equal(after[k], good["tensors"][k]) for k in after if k in good["tensors"])
        assert not all(torch.equal(after[k], before[k]) for k in after)
    else:
        assert results == [] and m.phase == "done"
        assert m.error.startswith("BadUpdateError: rejected update from client 1: "), m.error
        for word in words:
            assert word in m.error, (word, m.error)


def test_a_good_round_is_accepted():
    m, trainers, results = server_manager("error")
    send(m, 0, trainers[0].get_model_params(), 24)
    send(m, 1, trainers[1].get_model_params(), 24)
    assert m.error is None and len(results) == 1 and results[0].dropped == []
    assert math.isclose(results[0].train_loss, 0.5)
