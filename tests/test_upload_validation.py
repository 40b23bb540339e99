"""Uploads the server must refuse: only what encode_upload builds for this model is averaged in."""

from __future__ import annotations

import math

import pytest
import torch

from fedselect.algorithms.base import BadUpdateError
from fedselect.algorithms.payload import encode_upload, validate_upload

from .test_algorithms import make_run


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "b": torch.randn(4), "count": torch.tensor(7, dtype=torch.int64)}


def upload(reference, personal=None):
    state = {k: v.clone() for k, v in reference.items()}
    return encode_upload(state, personal or {}, client_id=1, num_samples=40)


def test_a_faithful_upload_passes(reference):
    validate_upload(upload(reference), reference)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[0] = True
    validate_upload(upload(reference, {"w": mask}), reference)


@pytest.mark.parametrize("forge, message", [
    (lambda p: p["tensors"].update(w=torch.full((4, 3), 7, dtype=torch.int64)), "dtype torch.int64"),
    (lambda p: p["tensors"].update(w=torch.ones(4, 3, dtype=torch.bool)), "dtype torch.bool"),
    (lambda p: p["tensors"].update(count=torch.tensor(7.0)), "dtype torch.float32"),
    (lambda p: p["tensors"].update(w=[[0.0] * 3] * 4), "not a tensor"),
    (lambda p: p.update(extra=torch.zeros(1_000_000)), "unexpected keys ['extra']"),
    (lambda p: p["tensors"].update(x=torch.zeros(2)), "global model lacks"),
    (lambda p: p["tensors"].update(b=torch.zeros(5)), "shape"),
    (lambda p: p["tensors"].update(b=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "non-finite"),
    (lambda p: p.update(num_samples=-1000), "num_samples"),
    (lambda p: p.update(num_samples=True), "num_samples"),
    (lambda p: p.update(client_id="1"), "client_id"),
    (lambda p: p.update(tensors=[1, 2]), "mapping"),
])
def test_forged_uploads_are_refused_naming_why(reference, forge, message):
    payload = upload(reference)
    forge(payload)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_upload(payload, reference)


def test_partial_tensor_must_send_exactly_its_shared_entries(reference):
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[0] = True
    payload = upload(reference, {"w": mask})
    payload["partial"]["w"] = torch.zeros(12)
    with pytest.raises(ValueError, match="shared values"):
        validate_upload(payload, reference)
    payload = upload(reference, {"w": mask})
    payload["partial"]["w"] = payload["partial"]["w"].to(torch.int64)
    with pytest.raises(ValueError, match="dtype"):
        validate_upload(payload, reference)


@pytest.mark.parametrize("weight", [float("nan"), -1000.0, 0.0, math.inf, "many"])
def test_bad_sample_counts_are_dropped_or_stop_the_round(weight):
    *_, trainers, server, _ = make_run("fedavg", rounds=1, on_bad_update="drop")
    good = trainers[0].get_model_params()
    server.begin_round()
    assert [server.add_upload(weight, good), server.add_upload(40.0, good)] == [False, True]
    assert "sample count" in server.dropped_updates[-1][1]
    *_, trainers, server, _ = make_run("fedavg", rounds=1, on_bad_update="error")
    with pytest.raises(BadUpdateError, match="sample count"):
        server.add_upload(weight, trainers[0].get_model_params())


def test_a_non_tensor_value_is_dropped_not_a_crash():
    *_, trainers, server, _ = make_run("fedavg", rounds=1, on_bad_update="drop")
    payload = trainers[0].get_model_params()
    name = next(iter(payload["tensors"]))
    payload["tensors"][name] = payload["tensors"][name].tolist()
    assert not server.add_upload(40.0, payload)
    assert "not a tensor" in server.dropped_updates[-1][1]
