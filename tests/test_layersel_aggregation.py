"""Issue 18: the single-trainer failure of the per-layer average (the paper's Eq. 7) on a tiny model,
and what each aggregation option does about it.

One client holds one-class data and, on scores that favour it alone (lambda = 0, as RGN solves), is
the only trainer of ``block2``. Eq. 7 (``aggregation: trainers``) makes the global block2 that
client's copy; ``aggregation: sampled`` moves it only by the client's share of the round's weight;
``min_trainers: 2`` keeps the solve from giving a layer a single trainer at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .test_algorithms import make_run
from .test_layersel import BNNet

# clients x (block1, block2, block3, head): client 0 scores block2 highest, the others block1
SCORES = {0: [0.1, 5.0, 0.1, 1.0], 1: [5.0, 0.1, 0.1, 1.0], 2: [5.0, 0.2, 0.1, 1.0]}


def one_round(**algo):
    """A round driven by hand (as the simulation does), client 0's data all of class 0; returns the
    server, the global state before and after, and client 0's uploaded copy of every entry."""
    _, clients, args, model, *_, trainers, server, _ = make_run(
        "layersel", rounds=1, algo={"strategy": "ilp", "lam": 0.0, "budget": 0.5, **algo}, model_cls=BNNet)
    data = trainers[0].data
    data.train_y.zero_()  # one-class training data: every image of class 0, its channel bright
    data.train_x[:, 0] = 220
    before = {k: v.clone() for k, v in server.get_model_params().items()}
    plans = server.plan_round(0, {cid: {"kind": "grad_norm", "scores": s} for cid, s in SCORES.items()})
    server.begin_round()
    copies = {}
    for trainer in trainers:
        trainer.set_model_params(before)
        trainer.receive_plan(plans[trainer.id])
        trainer.on_before_local_training(None, "cpu", args)
        trainer.train(None, "cpu", args)
        trainer.on_after_local_training(None, "cpu", args)
        upload = trainer.local_upload()
        if trainer.id == 0:
            copies = {k: v.detach().clone() for k, v in upload.state.items()}
        assert server.add_local_upload(upload)
        trainer.release_unpacked_mask()
    after = server.end_round()
    server.set_model_params(after)
    return server, plans, before, after, copies, [c.num_train for c in clients]


def block(state, name="block2"):
    return {k: v for k, v in state.items() if k.startswith(f"{name}.") and v.is_floating_point()}


def test_eq7_makes_the_single_trainers_layer_its_copy():
    server, plans, before, after, copies, _ = one_round()
    assert [cid for cid, p in plans.items() if "block2" in p["layers"]] == [0]
    assert server.round_metrics()["selection_trainers_block2"] == 1.0
    assert server.round_metrics()["selection_single_trainer_layers"] == 1.0
    for name, value in block(after).items():
        assert torch.equal(value, copies[name]), name  # the one-class client's copy, bit for bit
        assert not torch.equal(value, before[name]) or "running" in name


def test_all_sampled_clients_with_zero_updates_damp_the_single_trainers_step():
    server, plans, before, after, copies, sizes = one_round(aggregation="sampled")
    share = sizes[0] / sum(sizes)  # client 0's weight among the three accepted uploads
    assert 0 < share < 1
    for name, value in block(after).items():
        expected = before[name].double() + share * (copies[name].double() - before[name].double())
        assert torch.allclose(value.double(), expected, atol=1e-6), name
        step, full = float((value - before[name]).norm()), float((copies[name] - before[name]).norm())
        assert step == pytest.approx(share * full, rel=1e-4, abs=1e-7)
    # the head, trained by everyone, is Eq. 7's mean unchanged (share 1)
    eq7 = one_round()[3]
    for name, value in block(after, "head").items():
        assert torch.allclose(value, eq7[name], atol=1e-6), name
    # block1, trained by clients 1 and 2: their share of the weight
    trainers = [cid for cid, p in plans.items() if "block1" in p["layers"]]
    assert trainers == [1, 2]
    share1 = (sizes[1] + sizes[2]) / sum(sizes)
    for name, value in block(after, "block1").items():
        expected = before[name].double() + share1 * (eq7[name].double() - before[name].double())
        assert torch.allclose(value.double(), expected, atol=1e-6), name


def test_min_trainers_keeps_any_layer_from_a_single_trainer():
    server, plans, before, after, copies, _ = one_round(min_trainers=2)
    trained = np.array([[g.name in plans[cid]["layers"] for g in server.groups] for cid in sorted(plans)])
    k = trained.sum(axis=0)
    assert ((k == 0) | (k >= 2)).all(), k
    assert server.round_metrics()["selection_single_trainer_layers"] == 0.0
    if k[1] == 0:  # block2 untrained: the global block2 is unchanged
        for name, value in block(after).items():
            assert torch.equal(value, before[name]), name
    else:  # or averaged over at least two clients: not client 0's copy
        assert any(not torch.equal(value, copies.get(name, value)) for name, value in block(after).items())
