"""One definition of local work: E local epochs are E * n_k training sample passes for every method.

Mask search (GradLTN) and evaluation-time fine-tuning (FedBABU) are extra work, logged beside it.
The BatchNorm rule (train.norm_buffers, statistics frozen with their layer) is the same for all.
"""

from __future__ import annotations

import pytest
import torch

from fedselect.config import ConfigError
from fedselect.core.work import split_local_epochs

from .test_algorithms import make_run, run_flow
from .test_baselines import BNNet

EQUAL_WORK = ["fedavg", "local", "fedper", "fedrep", "lg_fedavg", "fedalt", "ditto", "lotteryfl", "fedbabu"]
EPOCHS = 3


def run_algorithm(algorithm: str, *, algo=None, model_cls=None, **train):
    config, clients, args, model, init, ctx, trainers, server, flow = make_run(
        algorithm, rounds=2, num_clients=3, algo=algo, model_cls=model_cls, **{"local_epochs": EPOCHS, **train})
    return run_flow(flow, args, model, clients), clients, trainers, server, init


@pytest.mark.parametrize("algorithm", EQUAL_WORK)
def test_every_method_does_e_epochs_of_sample_passes(algorithm):
    results, clients, *_ = run_algorithm(algorithm, algo={"finetune_epochs": 2} if algorithm == "fedbabu" else None)
    for result in results:
        for cid, metrics in result.client_metrics.items():
            # the synthetic clients' sizes are not multiples of the batch size: single-sample last
            # batches are skipped, so count what was trained
            n = clients[cid].num_train
            assert EPOCHS * (n - 1) <= metrics["train_sample_passes"] <= EPOCHS * n, (algorithm, cid)
        adapt = {e.adapt_sample_passes for e in result.evaluation.values()}
        if algorithm == "fedbabu":
            assert all(a > 0 for a in adapt)
        else:
            assert adapt == {0}


def test_fedselect_counts_its_mask_search():
    algo = {"p": 0.5, "gradltn_iterations": 2, "gradltn_epochs": 1, "search_every": 2}
    results, clients, *_ = run_algorithm("fedselect", algo=algo)
    n = clients[0].num_train
    first, second = (r.client_metrics[0]["train_sample_passes"] for r in results)
    # round 0: GradLTN (at most 2 runs of 1 epoch) + LocalAlt's 3 epochs; round 1: LocalAlt only
    assert EPOCHS * (n - 1) <= second <= EPOCHS * n
    assert first - second >= n - 1


def test_fedrep_and_ditto_split_the_local_epochs():
    *_, trainers, _, _ = run_algorithm("fedrep")
    assert (trainers[0].head_epochs, trainers[0].body_epochs) == (EPOCHS - 1, 1)
    *_, trainers, _, _ = run_algorithm("ditto")
    assert (trainers[0].global_epochs, trainers[0].personal_epochs) == (2, 1)
    *_, trainers, _, _ = run_algorithm("ditto", algo={"personal_epochs": 3, "global_epochs": 3})
    assert (trainers[0].global_epochs, trainers[0].personal_epochs) == (3, 3)
    with pytest.raises(ConfigError, match="head_epochs"):
        run_algorithm("fedrep", algo={"head_epochs": EPOCHS + 1})


def test_split_local_epochs():
    assert split_local_epochs(5, 4, None) == (4, 1)
    assert split_local_epochs(5, None, 2) == (3, 2)
    assert split_local_epochs(5, 10, 5) == (10, 5)
    for bad in ((5, 6, None), (5, None, -1), (5, None, None)):
        with pytest.raises(ValueError):
            split_local_epochs(*bad)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedselect", "fedrep"])
def test_personal_norm_buffers_never_leave_the_client(algorithm):
    algo = {"gradltn_iterations": 1, "gradltn_epochs": 1} if algorithm == "fedselect" else None
    results, clients, trainers, server, init = run_algorithm(algorithm, algo=algo, model_cls=BNNet,
                                                             norm_buffers="personal")
    buffers = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for trainer in trainers:
        assert not buffers & set(trainer.get_model_params()["tensors"])
    for name in buffers:
        assert torch.equal(server.get_model_params()[name], init[name]), name
    means = [t.personal_values["bn.running_mean"] for t in trainers]
    assert not torch.equal(means[0], means[1])


def test_averaged_norm_buffers_are_uploaded_by_default():
    _, _, trainers, server, init = run_algorithm("fedavg", model_cls=BNNet)
    assert "bn.running_mean" in trainers[0].get_model_params()["tensors"]
    assert not torch.equal(server.get_model_params()["bn.running_mean"], init["bn.running_mean"])


def test_localalt_freezes_the_statistics_of_the_part_held_fixed():
    # FedAlt with the stem personal: in the u pass the stem's BatchNorm is fixed, statistics included
    from fedselect.engine import SplitEpoch

    config, clients, args, model, init, ctx, trainers, server, flow = make_run(
        "fedalt", rounds=1, num_clients=1, algo={"personal_groups": ["head"]}, model_cls=BNNet, local_epochs=1)
    trainer = trainers[0]
    trainer.ensure_personal_mask()
    head_only = {n: torch.full_like(p, n.startswith("head"), dtype=torch.bool) for n, p in model.named_parameters()}
    before = model.bn.running_mean.clone()
    trainer.train_passes([SplitEpoch((head_only, {n: torch.zeros_like(m) for n, m in head_only.items()}))])
    assert torch.equal(model.bn.running_mean, before)
    trainer.train_passes([{n: ~m for n, m in head_only.items()}])
    assert not torch.equal(model.bn.running_mean, before)
