"""``layersel``'s options for the readings of the authors' release: head outside the budget, scores in
train mode, raw scores; plus its local-work count and personal BatchNorm statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedselect.algorithms.base import BadUpdateError
from fedselect.algorithms.layersel import LayerSelOptions
from fedselect.algorithms.layersel_budget import client_budgets, select_round
from fedselect.config import ConfigError
from fedselect.core.selection import SCORE_KIND, STRATEGIES, InfeasibleBudgetError, select_layers
from fedselect.models import prefix_spec, register_layer_groups

from .test_algorithms import make_run, run_flow
from .test_layersel import BNNet

BODY = ["block1", "block2", "block3"]


class DropNet(nn.Module):
    """BatchNorm and dropout in every block: what train-mode scoring must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5))
        self.block2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))).mean(dim=(2, 3)))


register_layer_groups(DropNet, prefix_spec({"stem": "stem", "block1": "block1", "block2": "block2", "head": "head"}))


def run(rounds: int = 1, model_cls=BNNet, train=None, **algo):
    return make_run("layersel", rounds=rounds, algo=algo, model_cls=model_cls, **(train or {}))


def fake_reports(server, sampled, width):
    kind = SCORE_KIND.get(server.options.strategy)
    rng = np.random.default_rng(0)
    return {cid: ({"kind": kind, "scores": rng.random(width).tolist()} if kind else {}) for cid in sampled}


# ---- head_in_budget -------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
def test_head_outside_budget_trains_the_head_on_top_of_a_budget_of_body_layers(strategy):
    *_, server, _ = run(strategy=strategy, budget=2 / 3, head_in_budget=False)
    assert np.allclose(server.budgets, 2.0)  # 2/3 of the three body layers' unit cost
    plans = server.plan_round(0, fake_reports(server, [0, 1, 2], width=3))
    for cid, plan in plans.items():
        assert plan["layers"][-1] == "head", (strategy, cid)
        body = plan["layers"][:-1]
        assert set(body) <= set(BODY)
        assert len(body) == (3 if strategy == "full" else 2), (strategy, body)
    if strategy == "top":
        assert plans[0]["layers"] == ["block2", "block3", "head"]
    if strategy == "bottom":
        assert plans[0]["layers"] == ["block1", "block2", "head"]
    # the same fraction with the head inside the budget: 2 of 4 layers, the head one of them
    *_, inside, _ = run(strategy=strategy, budget=0.5)
    for plan in inside.plan_round(0, fake_reports(inside, [0, 1, 2], width=4)).values():
        assert plan["layers"][-1] == "head" and len(plan["layers"]) == (4 if strategy == "full" else 2)


@pytest.mark.parametrize("strategy", ["ilp", "snr", "random", "both"])
def test_head_outside_budget_is_the_body_problem_plus_the_head(strategy):
    options = LayerSelOptions(strategy=strategy, lam=0.3, head_in_budget=False, budget=0.5, cost="params")
    costs = np.array([3.0, 5.0, 2.0, 4.0, 40.0])  # the head (last) costs more than any budget
    budgets = client_budgets(costs, 4, options, seed=0)
    assert np.allclose(budgets, 7.0)
    scores = np.random.default_rng(1).random((4, 4)) if strategy in SCORE_KIND else None
    result = select_round(options, costs, budgets, scores, seed=3, round_idx=2)
    body = select_layers(strategy, costs=costs[:4], budgets=budgets, lam=0.3, scores=scores, seed=3, round_idx=2)
    assert np.array_equal(result.mask[:, :4], body.mask) and result.mask[:, 4].all()
    assert result.objective == pytest.approx(body.objective)
    assert (result.cost_per_client(costs) - costs[4] <= budgets + 1e-9).all()


def test_budget_checks_follow_where_the_head_is():
    # unit costs: 0.2 of 4 layers cannot pay for the head; with the head outside, 0.34 of 3 body
    # layers pays for one of them, 0.2 of them for none
    with pytest.raises(InfeasibleBudgetError, match="algo.budget.*always-trained head"):
        run(budget=0.2)
    *_, server, _ = run(budget=0.34, head_in_budget=False)
    assert np.allclose(server.budgets, 1.02)
    with pytest.raises(InfeasibleBudgetError, match="algo.budget_min.*cheapest selectable layer"):
        run(budget=0.3, budgets="heterogeneous", budget_min=0.2, head_in_budget=False)
    # parameter costs: the head's 27 parameters are outside the budget, so 0.05 of the body's
    # 1032 (51.6) covers no block layer (the cheapest has 234)
    with pytest.raises(InfeasibleBudgetError, match="cost 234 of the cheapest selectable layer"):
        run(budget=0.05, cost="params", head_in_budget=False)


def test_head_outside_budget_leaves_the_head_out_of_the_scores():
    _, clients, args, model, *_, trainers, server, flow = run(strategy="ilp", head_in_budget=False)
    *_, trainers_in, server_in, _ = run(strategy="ilp")
    for trainer, trainer_in in zip(trainers, trainers_in, strict=True):
        trainer.set_model_params(server.get_model_params())
        outside = trainer.plan_report()["scores"]
        trainer_in.set_model_params(server.get_model_params())
        inside = trainer_in.plan_report()["scores"]
        assert len(outside) == 3 and np.allclose(outside, inside[:3], rtol=1e-6)
    reports = {0: {"kind": "grad_norm", "scores": [1.0, 2.0, 3.0]}, 1: {"kind": "grad_norm", "scores": [3.0, 2.0, 1.0]}}
    assert np.allclose(server.score_matrix([0, 1], reports), np.array([[1, 2, 3], [3, 2, 1]]) / 2.0)
    with pytest.raises(BadUpdateError, match="malformed"):
        server.score_matrix([0], {0: {"kind": "grad_norm", "scores": [1.0, 2.0, 3.0, 4.0]}})
    results = run_flow(flow, args, model, clients)
    (_, sampled, selection), = server.history
    assert selection.mask[:, -1].all() and (selection.mask[:, :3].sum(axis=1) <= 1.5).all()
    assert results[0].server_metrics["selection_layers_mean"] <= 2.5


# ---- score_mode -----------------------------------------------------------------------------

def record_modes(model):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, *_, name=name: seen.append((name, mod.training)))
             for name, m in model.named_modules() if isinstance(m, (nn.Dropout, nn.BatchNorm2d))]
    return seen, hooks


def test_train_mode_scores_are_seeded_and_leave_the_model_bit_identical():
    *_, model, _, _, trainers, server, _ = run(model_cls=DropNet, strategy="ilp", score_mode="train")
    trainer = trainers[0]
    trainer.set_model_params(server.get_model_params())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    seen, hooks = record_modes(model)
    first = trainer.plan_report()["scores"]
    for h in hooks:
        h.remove()
    modes = dict(seen)
    # local training's modes: dropout and the blocks' BatchNorm train, the frozen stem's does not
    assert modes == {"stem.1": False, "block1.1": True, "block1.3": True, "block2.1": True, "block2.3": True}
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"train-mode scoring changed {name}"
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert trainer.plan_report()["scores"] == first  # the dropout draws are seeded
    assert model.training  # the module's own mode is restored
    *_, eval_trainers, eval_server, _ = run(model_cls=DropNet, strategy="ilp")
    eval_trainers[0].set_model_params(eval_server.get_model_params())
    seen, hooks = record_modes(eval_trainers[0].model)
    in_eval = eval_trainers[0].plan_report()["scores"]
    for h in hooks:
        h.remove()
    assert not any(training for _, training in seen)
    assert not np.allclose(first, in_eval)  # batch statistics and dropout change the gradients


def test_train_mode_scores_keep_frozen_statistics_in_eval():
    *_, model, _, _, trainers, server, _ = run(model_cls=DropNet, strategy="ilp", score_mode="train",
                                               train={"norm_stats": "frozen"})
    trainers[0].set_model_params(server.get_model_params())
    seen, hooks = record_modes(model)
    trainers[0].plan_report()
    for h in hooks:
        h.remove()
    assert {name: on for name, on in seen if ".1" in name} == {"stem.1": False, "block1.1": False, "block2.1": False}
    assert dict(seen)["block1.3"] is True


def test_a_whole_round_with_train_mode_scores_is_reproducible():
    def masks_and_state():
        _, clients, args, model, *_, server, flow = run(rounds=2, model_cls=DropNet, strategy="ilp",
                                                        score_mode="train", head_in_budget=False, budget=0.5)
        run_flow(flow, args, model, clients)
        return [h[2].mask.tolist() for h in server.history], server.get_model_params()

    (ma, a), (mb, b) = masks_and_state(), masks_and_state()
    assert ma == mb and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_score_mode_names_its_key():
    with pytest.raises(ConfigError, match="algo.score_mode"):
        run(score_mode="training")


# ---- local work and personal statistics -----------------------------------------------------

@pytest.mark.parametrize("score_mode", ["eval", "train"])
def test_scoring_counts_as_training_sample_passes(score_mode):
    _, clients, args, model, *_, trainers, server, flow = run(strategy="ilp", score_batches=2,
                                                              score_mode=score_mode)
    trainers[0].set_model_params(server.get_model_params())
    trainers[0].plan_report()
    assert trainers[0].sample_passes == 2 * 8  # two batches of batch_size 8
    trainers[0].sample_passes = 0
    results = run_flow(flow, args, model, clients)
    for cid, metrics in results[0].client_metrics.items():
        n = clients[cid].num_train
        assert metrics["train_sample_passes"] == 16 + n, cid  # scoring + one local epoch


def test_position_strategies_count_only_training():
    _, clients, args, model, *_, trainers, server, flow = run(strategy="top")
    results = run_flow(flow, args, model, clients)
    assert all(m["train_sample_passes"] == clients[c].num_train for c, m in results[0].client_metrics.items())


def test_personal_norm_statistics_are_not_uploaded():
    *_, trainers, server, _ = run(strategy="top", train={"norm_buffers": "personal"})
    trainer = trainers[0]
    trainer.set_model_params(server.get_model_params())
    trainer.receive_plan({"layers": ["block3", "head"]})
    trainer.train(None, "cpu", None)
    upload = trainer.get_model_params()
    sent = set(upload["tensors"])
    assert sent == {"block3.0.weight", "block3.0.bias", "block3.1.weight", "block3.1.bias", "head.weight",
                    "head.bias"}
    assert not upload["partial"]
    # averaged statistics travel with their layer
    *_, trainers, server, _ = run(strategy="top")
    trainers[0].set_model_params(server.get_model_params())
    trainers[0].receive_plan({"layers": ["block3", "head"]})
    trainers[0].train(None, "cpu", None)
    assert {"block3.1.running_mean", "block3.1.running_var", "block3.1.num_batches_tracked"} <= set(
        trainers[0].get_model_params()["tensors"])


def test_personal_norm_statistics_stay_on_each_client_over_a_run():
    _, clients, args, model, init, *_, trainers, server, flow = run(rounds=2, strategy="ilp",
                                                                    train={"norm_buffers": "personal"})
    run_flow(flow, args, model, clients)
    state = server.get_model_params()
    stats = [n for n in state if "running" in n or "num_batches" in n]
    assert stats and all(torch.equal(state[n], init[n]) for n in stats)
    # each client that trained a block keeps its own statistics of it
    kept = [t.personal_values for t in trainers if t.personal_values]
    assert kept and any(not torch.equal(v, init[n].reshape(-1)) for pv in kept for n, v in pv.items()
                        if "running_mean" in n)


# ---- issue 18: budget draw, score scale, top-up, min-trainers, per-round logs ------------------

def test_defaults_are_the_behaviour_before_issue_18():
    o = LayerSelOptions()
    assert (o.budget_draw, o.normalize_over, o.top_up, o.aggregation, o.min_trainers) == \
        ("half_normal", "scored", False, "trainers", 1)
    from fedselect.study import load_study, validate_study

    for path in ("configs/layersel_cifar10.yaml", "configs/layersel_reviews.yaml"):
        validate_study(load_study(path))  # every run config of the studies stays valid


def test_authors_budget_draw_only_adds_layers():
    options = LayerSelOptions(budget=4 / 18, budgets="heterogeneous", budget_draw="authors", budget_max=10 / 18)
    costs = np.ones(18)
    budgets = client_budgets(costs, 40, options, seed=0)
    assert budgets.min() >= 4.0 - 1e-9 and budgets.max() <= 10.0 + 1e-9 and np.allclose(budgets, np.round(budgets))
    half = client_budgets(costs, 40, LayerSelOptions(budget=4.5 / 18, budgets="heterogeneous", budget_min=0.15),
                          seed=0)
    assert half.min() < 4.0  # the half-normal draw around the level can give fewer layers than identical
    # parameter costs: never below the identical budget, not rounded
    params = np.array([300.0, 50.0, 120.0, 80.0])
    drawn = client_budgets(params, 20, LayerSelOptions(budget=0.5, budgets="heterogeneous", budget_draw="authors",
                                                       cost="params"), seed=1)
    assert drawn.min() >= 0.5 * params.sum() - 1e-9
    with pytest.raises(ConfigError, match="algo.budget.*algo.budget_max.*authors"):
        LayerSelOptions(budget=0.6, budget_max=0.5, budgets="heterogeneous", budget_draw="authors")
    # budget_min is unused by the authors' draw, so a budget below it is fine
    LayerSelOptions(budget=0.1, budget_min=0.2, budgets="heterogeneous", budget_draw="authors")


def test_scores_can_be_scaled_over_the_choosable_layers_and_the_head_share_is_logged():
    _, clients, args, model, *_, server, flow = run(strategy="ilp", normalize_over="choosable")
    reports = {0: {"kind": "grad_norm", "scores": [1.0, 2.0, 3.0, 94.0]},
               1: {"kind": "grad_norm", "scores": [3.0, 2.0, 1.0, 94.0]}}
    assert np.allclose(server.score_matrix([0, 1], reports), np.array([[1, 2, 3, 94], [3, 2, 1, 94]]) / 2.0)
    *_, scored, _ = run(strategy="ilp")
    assert np.allclose(scored.score_matrix([0, 1], reports), np.array([[1, 2, 3, 94], [3, 2, 1, 94]]) / 25.0)
    *_, raw, _ = run(strategy="ilp", normalize_scores=False, normalize_over="choosable")
    assert np.allclose(raw.score_matrix([0, 1], reports), [[1, 2, 3, 94], [3, 2, 1, 94]])
    raw.plan_round(0, reports)
    assert raw.round_metrics()["selection_required_score_share"] == pytest.approx(188 / 200)
    results = run_flow(flow, args, model, clients)
    assert 0 < results[0].server_metrics["selection_required_score_share"] < 1
    # the head outside the budgets is not scored: no share to log
    *_, outside, _ = run(strategy="ilp", head_in_budget=False)
    outside.plan_round(0, fake_reports(outside, [0, 1, 2], width=3))
    assert "selection_required_score_share" not in outside.round_metrics()


def test_round_logs_trainers_per_layer_and_unused_budget():
    _, clients, args, model, *_, server, flow = run(strategy="ilp", lam=100.0, budget=0.75)
    results = run_flow(flow, args, model, clients)
    metrics = results[0].server_metrics
    (_, sampled, selection), = server.history
    for j, group in enumerate(server.groups):
        assert metrics[f"selection_trainers_{group.name}"] == selection.mask[:, j].sum()
    spent = selection.mask.astype(float) @ server.costs
    for row, cid in enumerate(sampled):
        assert metrics[f"selection_unused_budget_client_{cid}"] == pytest.approx(server.budgets[cid] - spent[row])
    assert metrics["selection_unused_budget_mean"] == pytest.approx(np.mean(server.budgets[sampled] - spent))
    assert metrics["selection_single_trainer_layers"] == float((selection.mask.sum(axis=0) == 1).sum())


def test_top_up_uses_the_budget_the_solve_leaves():
    # a huge lambda makes the ILP agree on one common set within the smallest budget; top-up fills the rest
    *_, plain, _ = run(strategy="ilp", lam=50.0)
    *_, filled, _ = run(strategy="ilp", lam=50.0, top_up=True)
    plain.budgets = filled.budgets = np.array([2.0, 3.0, 4.0])  # heterogeneous, in unit-cost layers
    reports = fake_reports(plain, [0, 1, 2], width=4)
    plain.plan_round(0, reports)
    filled.plan_round(0, reports)
    before, after = plain.round_metrics(), filled.round_metrics()
    assert before["selection_unused_budget_mean"] == pytest.approx(1.0)  # everyone trains the same 2 layers
    assert after["selection_unused_budget_mean"] == 0.0
    mask = filled.history[-1][2].mask
    assert (mask >= plain.history[-1][2].mask).all()
    assert (mask.astype(float) @ filled.costs <= filled.budgets + 1e-9).all()
    with pytest.raises(ConfigError, match="algo.top_up.*algo.strategy"):
        run(strategy="top", top_up=True)


def test_min_trainers_config_errors_name_their_keys():
    with pytest.raises(ConfigError, match="algo.min_trainers.*algo.strategy"):
        run(strategy="random", min_trainers=2)
    with pytest.raises(ConfigError, match="algo.min_trainers' must be an integer >= 1"):
        run(min_trainers=0)
    # one client sampled per round (participation 0.34 of 3): two trainers can never be found
    with pytest.raises(ConfigError, match="algo.min_trainers', 'train.participation' and 'data.partition.num_clients'"):
        run(strategy="ilp", min_trainers=2, train={"participation": 0.34})
    _, clients, args, model, *_, server, flow = run(strategy="rgn", min_trainers=2)
    run_flow(flow, args, model, clients)
    k = server.history[-1][2].mask.sum(axis=0)
    assert ((k == 0) | (k >= 2)).all()
