"""Selective layer fine-tuning (``layersel``): the two-phase round on FedML's interfaces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedselect.algorithms.layersel import LayerSelClient, candidate_groups
from fedselect.algorithms.payload import encode_upload, payload_nbytes
from fedselect.config import ConfigError
from fedselect.core.selection import InfeasibleBudgetError
from fedselect.models import prefix_spec, register_layer_groups

from .test_algorithms import make_run, run_flow


class BNNet(nn.Module):
    """A small conv net with BatchNorm in every block: unselected blocks must keep their statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


register_layer_groups(BNNet, prefix_spec({"stem": "stem", "block1": "block1", "block2": "block2",
                                          "block3": "block3", "head": "head"}))


def layersel_run(rounds: int = 2, **algo):
    return make_run("layersel", rounds=rounds, algo=algo, model_cls=BNNet)


def test_candidates_are_blocks_then_head():
    model = BNNet()
    assert [g.name for g in candidate_groups(model)] == ["block1", "block2", "block3", "head"]


def test_round_trains_only_selected_layers_and_averages_over_their_trainers():
    config, clients, args, model, init, ctx, trainers, server, flow = layersel_run(rounds=1, strategy="random",
                                                                                   budget=0.5)
    global_before = {k: v.clone() for k, v in server.get_model_params().items()}
    uploads = {}
    original = LayerSelClient.local_upload

    def spy(self):
        upload = original(self)
        # encoded at once, as the wire would: the live state changes with the next client
        uploads[self.id] = encode_upload(upload.state, upload.personal_mask, client_id=self.id,
                                         num_samples=upload.num_samples)
        return upload

    LayerSelClient.local_upload = spy
    try:
        results = run_flow(flow, args, model, clients)
    finally:
        LayerSelClient.local_upload = original
    (_, sampled, selection), = server.history
    names = [g.name for g in server.groups]
    new_state = server.get_model_params()
    for row, cid in enumerate(sampled):
        chosen = {names[j] for j in np.flatnonzero(selection.mask[row])}
        assert "head" in chosen and len(chosen) <= 2  # budget: half of 4 unit-cost layers
        sent = set(uploads[cid]["tensors"])
        # exactly the chosen layers' parameters and BatchNorm buffers, nothing else
        assert all(n.split(".")[0] in chosen for n in sent)
        assert {n.split(".")[0] for n in sent} == chosen
    for name, before in global_before.items():
        layer = name.split(".")[0]
        trainers_of_layer = [cid for cid in sampled if name in uploads[cid]["tensors"]]
        if not trainers_of_layer:
            assert torch.equal(new_state[name], before), f"{name} changed though no client trained it"
        elif before.is_floating_point():
            weights = [clients[c].num_train for c in trainers_of_layer]
            expected = sum(uploads[c]["tensors"][name].double() * w for c, w in zip(trainers_of_layer, weights,
                                                                                    strict=True)) / sum(weights)
            assert torch.allclose(new_state[name].double(), expected, atol=1e-6), name
        assert layer != "stem" or torch.equal(new_state[name], before)
    assert results[0].server_metrics["selection_layers_mean"] <= 2


def test_unselected_layers_are_bit_identical_after_local_training():
    _, clients, args, model, init, ctx, trainers, server, flow = layersel_run(strategy="top", budget=0.5)
    trainer = trainers[0]
    trainer.set_model_params(server.get_model_params())
    trainer.receive_plan({"layers": ["block3", "head"]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(None, "cpu", args)
    after = model.state_dict()
    for name, value in before.items():
        trained = name.split(".")[0] in ("block3", "head")
        if trained and value.is_floating_point() and "running" not in name:
            assert not torch.equal(after[name], value), f"{name} should have trained"
        if not trained:
            assert torch.equal(after[name], value), f"{name} moved though its layer was not selected"


def test_frozen_layers_get_no_gradient_work():
    _, clients, args, model, *_ , trainers, server, flow = layersel_run()
    seen = []
    hooks = [p.register_hook(lambda g, n=n: seen.append(n)) for n, p in model.named_parameters()]
    trainer = trainers[0]
    trainer.set_model_params(server.get_model_params())
    trainer.receive_plan({"layers": ["head"]})
    trainer.train(None, "cpu", args)
    for h in hooks:
        h.remove()
    assert seen and {n.split(".")[0] for n in seen} == {"head"}
    metrics = trainer.round_metrics()
    assert metrics["layers_trained"] == 1.0
    assert 0 < metrics["backward_fraction"] < 0.1  # head only: no gradient through the conv blocks


def test_scores_phase_is_counted_and_does_not_move_the_model():
    _, clients, args, model, init, ctx, trainers, server, flow = layersel_run(rounds=1, strategy="ilp")
    trainer = trainers[1]
    trainer.set_model_params(server.get_model_params())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = trainer.plan_report()
    assert report["kind"] == "grad_norm" and len(report["scores"]) == 4
    assert all(s >= 0 for s in report["scores"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"scoring changed {name}"
    results = run_flow(flow, args, model, clients)
    uploads = sum(payload_nbytes(t.get_model_params()) for t in [])  # nothing: bytes come from the flow
    assert uploads == 0
    report_bytes = len(json.dumps(report, separators=(",", ":")).encode())
    # every sampled client sent a score report of about that size on top of its layers
    assert results[0].bytes_up > 3 * report_bytes
    assert results[0].server_metrics["selection_optimal"] == 1.0


def test_position_strategies_send_no_scores():
    _, clients, args, model, init, ctx, trainers, server, flow = layersel_run(strategy="top")
    trainers[0].set_model_params(server.get_model_params())
    assert trainers[0].plan_report() == {}


def test_full_strategy_trains_every_candidate_layer():
    _, clients, args, model, init, ctx, trainers, server, flow = layersel_run(rounds=1, strategy="full")
    run_flow(flow, args, model, clients)
    (_, _, selection), = server.history
    assert selection.mask.all()


def test_infeasible_budget_fails_before_round_one():
    with pytest.raises(InfeasibleBudgetError, match="algo.budget"):
        make_run("layersel", algo={"budget": 0.02, "cost": "params"}, model_cls=BNNet)


@pytest.mark.parametrize(("algo", "key"), [({"strategy": "best"}, "algo.strategy"), ({"lam": -1.0}, "algo.lam"),
                                           ({"budget": 1.5}, "algo.budget"),
                                           ({"budgets": "heterogeneous", "budget": 0.1, "budget_min": 0.2},
                                            "algo.budget_min")])
def test_bad_options_name_their_key(algo, key):
    with pytest.raises(ConfigError, match=key):
        make_run("layersel", algo=algo, model_cls=BNNet)


def test_heterogeneous_budgets_are_seeded_and_respected():
    *_, server, flow = layersel_run(strategy="ilp", budgets="heterogeneous", budget=0.6, budget_min=0.25)
    budgets = server.budgets
    *_, server2, _ = layersel_run(strategy="ilp", budgets="heterogeneous", budget=0.6, budget_min=0.25)
    assert np.array_equal(budgets, server2.budgets)
    assert budgets.min() >= 0.25 * 4 and budgets.max() <= 4


def test_selection_artifacts(tmp_path):
    _, clients, args, model, init, ctx, trainers, server, flow = layersel_run(rounds=2, strategy="ilp")
    run_flow(flow, args, model, clients)
    table, figure = server.write_artifacts(tmp_path)
    rows = table.read_text().splitlines()
    assert rows[0] == "round,client,block1,block2,block3,head"
    assert len(rows) == 1 + 2 * 3
    assert figure.stat().st_size > 0


def test_same_seed_same_result():
    def final_state():
        _, clients, args, model, *_, server, flow = layersel_run(rounds=2, strategy="ilp", lam=0.5)
        run_flow(flow, args, model, clients)
        return server.get_model_params(), [h[2].mask.tolist() for h in server.history]

    (a, ma), (b, mb) = final_state(), final_state()
    assert ma == mb
    assert all(torch.equal(a[k], b[k]) for k in a)
