"""Personalized baselines on the mask mechanism: each method's defining behaviour, through FedMLRunner.

FedPer, FedRep, LG-FedAvg, FedBABU, FedAlt, Ditto and LotteryFL run on tiny synthetic federations
(tests/conftest.synthetic_clients) with the simulation flow, as tests/test_algorithms.py does.
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedselect.algorithms import fedrep as fedrep_module
from fedselect.algorithms.ditto import DittoOptions, flatten_state, load_flat_state
from fedselect.algorithms.fedalt import FedAltClient
from fedselect.algorithms.fedbabu import FedBABUOptions
from fedselect.algorithms.fedrep import FedRepOptions
from fedselect.algorithms.lotteryfl import LotteryFLOptions
from fedselect.algorithms.payload import encode_upload
from fedselect.config import ConfigError, load_config, load_config_dict
from fedselect.core.masks import target_count, unpack_mask
from fedselect.engine import SplitEpoch, evaluate, snapshot_state
from fedselect.models import prefix_spec, register_layer_groups
from fedselect.registry import available_algorithms, get_algorithm

from .conftest import REPO
from .test_algorithms import make_run, run_flow

BASELINES = ["fedper", "fedrep", "lg_fedavg", "fedbabu", "fedalt", "ditto", "lotteryfl"]
CNN_HEAD = {"head.weight", "head.bias"}
CNN_BODY = {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias"}
HEADER_BYTES = 16  # client_id and num_samples in every upload


class BNNet(nn.Module):
    """A tiny CNN with BatchNorm, so that running statistics are covered too."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
        return self.head(F.relu(self.fc1(x)))


register_layer_groups(BNNet, prefix_spec({"stem": ["conv", "bn"], "fc1": "fc1", "head": "head"}))


def setup(algorithm: str, *, algo: dict[str, Any] | None = None, model_cls: type | None = None,
          client_cls: type | None = None, num_clients: int = 3, rounds: int = 2, **train: Any) -> SimpleNamespace:
    """One run's objects, with the algorithm's options validated from ``algo`` as a config would."""
    fields = ("config", "clients", "args", "model", "init", "ctx", "trainers", "server", "flow")
    objects = make_run(algorithm, rounds=rounds, num_clients=num_clients, client_cls=client_cls, algo=algo,
                       model_cls=model_cls, **train)
    return SimpleNamespace(**dict(zip(fields, objects, strict=True)))


def run(r: SimpleNamespace) -> list:
    return run_flow(r.flow, r.args, r.model, r.clients)


def nbytes(state: dict[str, torch.Tensor], names: set[str]) -> int:
    return sum(state[n].numel() * state[n].element_size() for n in names)


def test_baselines_are_registered_with_frozen_options():
    assert set(BASELINES) <= set(available_algorithms())
    for name in BASELINES:
        options = get_algorithm(name).options_cls()
        with pytest.raises(AttributeError):
            options.__setattr__("x", 1)
    assert FedRepOptions().head_epochs is None and FedRepOptions().body_epochs is None
    assert DittoOptions().lam == 1.0
    assert FedBABUOptions() == FedBABUOptions(finetune_epochs=5, finetune_part="full")
    assert LotteryFLOptions() == LotteryFLOptions(target_sparsity=0.5, prune_rate=0.2, acc_threshold=0.1)


# ---- fixed partitions: the personal part stays home ---------------------------------------------------
PERSONAL = {"fedper": CNN_HEAD, "fedrep": CNN_HEAD, "fedalt": CNN_HEAD, "fedbabu": CNN_HEAD, "lg_fedavg": CNN_BODY}
# fewer head / fine-tuning epochs than the defaults: the behaviour tested does not depend on them
FAST = {"fedrep": {"head_epochs": 2, "body_epochs": 1}, "fedbabu": {"finetune_epochs": 1}}


@pytest.mark.parametrize("algorithm", sorted(PERSONAL))
def test_personal_part_never_leaves_and_is_never_overwritten(algorithm):
    r = setup(algorithm, algo=FAST.get(algorithm))
    results = run(r)
    personal = PERSONAL[algorithm]
    shared = set(r.init) - personal
    for trainer in r.trainers:
        upload = trainer.get_model_params()
        assert set(upload["tensors"]) == shared and not upload["partial"]
    # no client ever shared them, so the server still holds the initial values
    global_state = r.server.get_model_params()
    for name in personal:
        assert torch.equal(global_state[name], r.init[name]), name
    assert not torch.equal(global_state["fc1.weight" if algorithm != "lg_fedavg" else "head.weight"],
                           r.init["fc1.weight" if algorithm != "lg_fedavg" else "head.weight"])
    # a broadcast with garbage in the personal entries changes nothing of them
    poisoned = OrderedDict((k, v.clone()) for k, v in global_state.items())
    for name in personal:
        poisoned[name].fill_(float("nan"))
    for trainer in r.trainers:
        trainer.set_model_params(poisoned)
        state = r.model.state_dict()
        for name in personal:
            assert torch.equal(state[name].flatten(), trainer.personal_values[name]), name
        for name in shared:
            assert torch.equal(state[name], global_state[name]), name
    if algorithm != "fedbabu":  # FedBABU's head is common; the others personalize it
        a, b = (t.personal_values[sorted(personal)[0]] for t in r.trainers[:2])
        assert not torch.equal(a, b)
    # bytes: the shared part up and down, nothing of the personal part after the first download
    assert results[1].bytes_up == 3 * (nbytes(r.init, shared) + HEADER_BYTES)
    assert results[0].bytes_down == 3 * nbytes(r.init, set(r.init))
    assert results[1].bytes_down == 3 * nbytes(r.init, shared)


# ---- FedRep --------------------------------------------------------------------------------------------
def test_fedrep_phases_each_touch_only_their_part(monkeypatch):
    # equal local work: 3 local epochs, 2 on the head, so 1 on the body
    r = setup("fedrep", algo={"head_epochs": 2}, model_cls=BNNet, rounds=1, local_epochs=3)
    calls = []
    real = fedrep_module.train_part

    def spy(client, epochs, entries, **kwargs):
        before = snapshot_state(client.model)
        stats = real(client, epochs, entries, **kwargs)
        calls.append((set(entries), epochs, before, snapshot_state(client.model), stats.steps))
        return stats

    monkeypatch.setattr(fedrep_module, "train_part", spy)
    run(r)
    head = {"head.weight", "head.bias"}
    body = set(r.init) - head
    assert any(name.endswith("running_mean") for name in body)
    assert len(calls) == 2 * len(r.trainers)
    for i, (entries, epochs, before, after, steps) in enumerate(calls):
        head_phase = i % 2 == 0
        assert entries == (head if head_phase else body)
        assert epochs == (2 if head_phase else 1) and steps > 0
        # (a bias right before BatchNorm gets no gradient, so not every trained tensor moves)
        assert not torch.equal(before["head.weight" if head_phase else "conv.weight"],
                               after["head.weight" if head_phase else "conv.weight"]), f"phase {i} did not train"
        for name in before:
            if name not in entries:
                # bit-identical, BatchNorm statistics included
                assert torch.equal(before[name], after[name]), f"phase {i}: {name} changed"


# ---- FedAlt --------------------------------------------------------------------------------------------
def trained_names(spec) -> set[str]:
    return {name for name, mask in spec.items() if mask is None or bool(mask.any())}


class RecordingFedAlt(FedAltClient):
    def train_passes(self, passes, **kwargs):
        # per epoch of local work, the parts trained in turn
        self.recorded = [[trained_names(s) for s in (p.phases if isinstance(p, SplitEpoch) else (p,))]
                         for p in passes]
        return super().train_passes(passes, **kwargs)


def test_fedalt_alternates_personal_and_shared_within_each_epoch():
    r = setup("fedalt", client_cls=RecordingFedAlt, rounds=1, local_epochs=2)
    run(r)
    assert r.trainers[0].recorded == [[CNN_HEAD, CNN_BODY], [CNN_HEAD, CNN_BODY]]
    # one epoch of local work is one pass over the data, split between v and u
    assert r.trainers[0].last_train_stats.samples == 2 * r.trainers[0].data.num_train


def test_fedalt_two_passes_per_epoch_as_the_released_code():
    r = setup("fedalt", algo={"localalt_epoch": "two_passes"}, client_cls=RecordingFedAlt, rounds=1, local_epochs=2)
    run(r)
    assert r.trainers[0].recorded == [[CNN_HEAD], [CNN_BODY], [CNN_HEAD], [CNN_BODY]]
    assert r.trainers[0].last_train_stats.samples == 4 * r.trainers[0].data.num_train


def test_fedalt_partition_by_layer_group_names():
    r = setup("fedalt", algo={"personal_groups": ["conv1"]}, client_cls=RecordingFedAlt, rounds=1)
    run(r)
    conv1 = {"conv1.weight", "conv1.bias"}
    assert r.trainers[0].recorded == [[conv1, (CNN_BODY | CNN_HEAD) - conv1]]
    assert set(r.trainers[0].get_model_params()["tensors"]) == set(r.init) - conv1
    assert torch.equal(r.server.get_model_params()["conv1.weight"], r.init["conv1.weight"])


# ---- FedBABU -------------------------------------------------------------------------------------------
def test_fedbabu_head_is_frozen_in_training_and_finetuned_for_evaluation():
    r = setup("fedbabu", algo={"finetune_epochs": 2})
    results = run(r)
    global_state = r.server.get_model_params()
    for name in CNN_HEAD:
        assert torch.equal(global_state[name], r.init[name])
        for trainer in r.trainers:
            assert torch.equal(trainer.personal_values[name], r.init[name].flatten())
    assert not torch.equal(global_state["conv1.weight"], r.init["conv1.weight"])

    trainer = r.trainers[0]
    trainer.set_model_params(global_state)
    federated = snapshot_state(r.model)
    reported = trainer.test(None, "cpu", r.args)
    # test() restores the federated state bit for bit
    for name, value in snapshot_state(r.model).items():
        assert torch.equal(value, federated[name]), name
    # and what it reported is the fine-tuned model's accuracy
    trainer.prepare_for_evaluation()
    assert not torch.equal(r.model.state_dict()["head.weight"], r.init["head.weight"])
    fine_tuned = evaluate(r.model, trainer.data.test_x, trainer.data.test_y, transform=r.ctx.transform)
    assert fine_tuned.correct == reported.correct
    assert fine_tuned.loss_sum == pytest.approx(reported.loss_sum, rel=1e-6)
    assert results[-1].evaluation[0].loss_sum == pytest.approx(reported.loss_sum, rel=1e-6)
    trainer.set_model_params(global_state)
    plain = evaluate(r.model, trainer.data.test_x, trainer.data.test_y, transform=r.ctx.transform)
    assert plain.loss_sum != pytest.approx(reported.loss_sum, rel=1e-6)


def test_fedbabu_head_only_finetuning_moves_only_the_head():
    r = setup("fedbabu", algo={"finetune_part": "head", "finetune_epochs": 1}, rounds=1)
    run(r)
    trainer = r.trainers[1]
    trainer.set_model_params(r.server.get_model_params())
    before = snapshot_state(r.model)
    trainer.prepare_for_evaluation()
    after = snapshot_state(r.model)
    assert all(torch.equal(before[n], after[n]) for n in CNN_BODY)
    assert not torch.equal(before["head.weight"], after["head.weight"])


# ---- Ditto ---------------------------------------------------------------------------------------------
def test_ditto_global_model_and_bytes_are_fedavgs():
    ditto, fedavg = setup("ditto"), setup("fedavg")
    ditto_results, fedavg_results = run(ditto), run(fedavg)
    for name, value in fedavg.server.get_model_params().items():
        assert torch.equal(ditto.server.get_model_params()[name], value), name
    assert [x.bytes_up for x in ditto_results] == [x.bytes_up for x in fedavg_results]
    assert [x.bytes_down for x in ditto_results] == [x.bytes_down for x in fedavg_results]


def test_ditto_personal_model_is_pulled_toward_the_global_one():
    distances = []
    for lam in (0.0, 0.1, 1.0, 10.0):
        r = setup("ditto", algo={"lam": lam}, num_clients=1, rounds=1, local_epochs=3)
        trainer = r.trainers[0]
        trainer.set_model_params(r.server.get_model_params())
        trainer.train(None, "cpu", r.args)
        distances.append(float((trainer.personal_flat - flatten_state(r.init)).norm()))
    assert distances[0] > 0
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances


def test_ditto_evaluates_the_personal_model_and_restores_the_global_one():
    r = setup("ditto")
    results = run(r)
    trainer = r.trainers[2]
    trainer.set_model_params(r.server.get_model_params())
    global_model = snapshot_state(r.model)
    reported = trainer.test(None, "cpu", r.args)
    for name, value in snapshot_state(r.model).items():
        assert torch.equal(value, global_model[name]), name
    assert not torch.equal(trainer.personal_flat, flatten_state(global_model))
    load_flat_state(r.model, trainer.personal_flat)
    personal = evaluate(r.model, trainer.data.test_x, trainer.data.test_y, transform=r.ctx.transform)
    assert (personal.correct, personal.loss_sum) == (reported.correct, pytest.approx(reported.loss_sum, rel=1e-6))
    assert results[-1].evaluation[2].loss_sum == pytest.approx(reported.loss_sum, rel=1e-6)


# ---- LotteryFL -----------------------------------------------------------------------------------------
PRUNE_ALWAYS = {"acc_threshold": 0.0, "prune_rate": 0.2, "target_sparsity": 0.5}


def test_lotteryfl_sparsity_follows_its_schedule_and_stops_at_the_target():
    r = setup("lotteryfl", algo=PRUNE_ALWAYS, rounds=5)
    results = run(r)
    expected = [min(0.5, 1 - 0.8 ** (j + 1)) for j in range(5)]  # 0.2, 0.36, 0.488, 0.5, 0.5
    for trainer in r.trainers:
        assert trainer.sparsity_history == pytest.approx(expected, abs=2e-3)
        assert trainer.prune_steps == 4
        mask = trainer.personal_mask
        for name in trainer.prunable:
            assert int(mask[name].sum()) == target_count(mask[name].numel(), 0.5), name
    assert results[-1].client_metrics[0]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # a sparse upload is smaller than FedAvg's dense one
    assert results[-1].bytes_up < 0.6 * results[0].bytes_down


def test_lotteryfl_pruned_entries_are_zero_untrained_and_not_uploaded():
    r = setup("lotteryfl", algo=PRUNE_ALWAYS, rounds=2)
    uploads = []
    add, begin = r.server.add_local_upload, r.server.begin_round

    def capture(upload):
        # what the wire would carry, with the global model the round started from (last round kept)
        payload = encode_upload(upload.state, upload.personal_mask, client_id=upload.client_id,
                                num_samples=upload.num_samples)
        uploads.append((float(upload.num_samples), payload,
                        {k: v.clone() for k, v in r.server.get_model_params().items()}))
        return add(upload)

    def begin_last_round_only():
        uploads.clear()
        begin()

    r.server.add_local_upload = capture
    r.server.begin_round = begin_last_round_only
    run(r)
    global_state = r.server.get_model_params()
    for trainer in r.trainers:
        mask = trainer.personal_mask
        assert set(mask) == set(trainer.prunable) == {"conv1.weight", "conv2.weight", "fc1.weight", "head.weight"}
        # stored after masked SGD: still exactly zero, so the pruned entries never trained
        for name in mask:
            assert torch.equal(trainer.personal_values[name], torch.zeros_like(trainer.personal_values[name]))
        trainer.set_model_params(global_state)
        state = r.model.state_dict()
        for name, pruned in mask.items():
            assert bool((state[name][pruned] == 0).all()), name
            assert torch.equal(state[name][~pruned], global_state[name][~pruned]), name
        upload = trainer.get_model_params()
        sent_masks = unpack_mask(upload["masks"])
        for name, pruned in mask.items():
            assert name not in upload["tensors"]
            assert torch.equal(sent_masks[name], pruned)
            assert upload["partial"][name].numel() == int((~pruned).sum())
    # the server averages each entry over the clients that kept it (weighted by sample count)
    name = "conv1.weight"
    previous = uploads[0][2][name]
    numerator = torch.zeros_like(previous, dtype=torch.float64)
    denominator = torch.zeros_like(previous, dtype=torch.float64)
    for weight, payload, _ in uploads:
        kept = ~unpack_mask(payload["masks"])[name]
        values = torch.zeros_like(previous)
        values[kept] = payload["partial"][name]
        numerator += torch.where(kept, values.double() * weight, 0.0)
        denominator += kept.double() * weight
    expected = torch.where(denominator > 0, (numerator / denominator.clamp_min(1e-300)).float(), previous)
    assert torch.allclose(global_state[name], expected, atol=1e-6)
    assert bool((denominator == 0).any()) and bool((denominator > 0).any())


def test_lotteryfl_accuracy_threshold_gates_pruning():
    r = setup("lotteryfl", algo={"acc_threshold": 1.0}, rounds=1)
    run(r)
    assert all(t.sparsity_history == [0.0] and t.prune_steps == 0 for t in r.trainers)


def test_lotteryfl_rewinds_unpruned_weights_to_the_initialization():
    r = setup("lotteryfl", algo=PRUNE_ALWAYS, rounds=1)
    run(r)
    trainer = r.trainers[0]
    trainer.set_model_params(r.server.get_model_params())
    trainer.prune(trainer.ctx.options)
    trainer.rewind()
    mask = trainer.personal_mask
    for name, param in r.model.named_parameters():
        expected = r.init[name].masked_fill(mask[name], 0.0) if name in mask else r.init[name]
        assert torch.equal(param.detach(), expected), name


# ---- options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("algorithm", "key", "value"), [
    ("fedrep", "head_epochs", -1),
    ("fedrep", "body_epochs", -2),
    ("fedbabu", "finetune_epochs", -1),
    ("fedbabu", "finetune_part", "body"),
    ("ditto", "lam", -0.5),
    ("ditto", "personal_epochs", -1),
    ("lotteryfl", "target_sparsity", 1.0),
    ("lotteryfl", "prune_rate", 0.0),
    ("lotteryfl", "acc_threshold", 1.5),
    ("fedalt", "personal_groups", []),
    ("lg_fedavg", "shared_groups", []),
    ("fedper", "head_epochs", 3),
])
def test_bad_options_name_the_key(algorithm, key, value):
    with pytest.raises(ConfigError, match=f"algo.{key}"):
        load_config_dict({"algorithm": algorithm, "algo": {key: value}})


@pytest.mark.parametrize(("algorithm", "key"), [("fedalt", "personal_groups"), ("lg_fedavg", "shared_groups")])
def test_unknown_layer_group_fails_before_training_naming_the_key(algorithm, key):
    with pytest.raises(ConfigError, match=f"algo.{key}.*'classifier'"):
        setup(algorithm, algo={key: ["classifier"]})
    with pytest.raises(ConfigError, match=f"algo.{key}"):
        setup(algorithm, algo={key: ["conv1", "conv2", "fc1", "head"]})


# ---- end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    # one results folder for all methods: the MLflow store and the partition are made once, as in a study
    return tmp_path_factory.mktemp("smoke-results")


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", BASELINES)
def test_smoke_config_runs_end_to_end(algorithm, smoke_results, data_root):
    from fedselect.runner.simulate import run_experiment

    fast = [f"algo.{key}={value}" for key, value in FAST.get(algorithm, {}).items()]
    config = load_config(REPO / "configs" / "smoke.yaml", [
        f"algorithm={algorithm}", "device=cpu", f"data.root={data_root}", "data.download=false",
        f"tracking.results_dir={smoke_results}", *fast])
    record = run_experiment(config, progress=False)
    assert record["algorithm"] == algorithm and record["rounds"] == 2
    assert len(record["per_client_acc"]) == 4
    assert 0.0 <= record["final_mean_acc"] <= 1.0
    assert record["bytes_up"] > 0 and record["bytes_down"] > 0
