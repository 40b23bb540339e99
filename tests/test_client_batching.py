"""train.client_batching: a round's clients train side by side, identical calls as one vmapped batch.

In float64 a batched call, and a batched federation, must leave every client's model as sequential
training does (up to summation order: 1e-10), and a batched run repeats bit for bit.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import fedselect.runner.simulate as simulate
from fedselect import client_batching
from fedselect.batched_training import TrainRequest, batch_signature, train_together
from fedselect.config import load_config_dict
from fedselect.engine import OptimConfig, SplitEpoch
from fedselect.fedml_runtime.simulation import SimulationFlow
from fedselect.models import build_model
from fedselect.options import ConfigError

from .test_algorithms import make_run
from .test_resume import tiny_config, tiny_data

K, N, SIDE = 3, 20, 8


class TinyBatchNormNet(nn.Module):
    """Two convolutions with BatchNorm and a linear head: every kind of state a batched call stacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def noisy_transform(x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws from the client's generator per batch, as augmentation does: its order must be kept."""
    return x + torch.rand(x.shape, generator=generator, dtype=x.dtype) * 0.1 if train else x


def random_mask(model: nn.Module, seed: int, fraction: float = 0.4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) < fraction for n, p in model.named_parameters()}


def schedules(model: nn.Module) -> dict[str, list]:
    """Per client (seed i) a list of passes: whole, masked (momentum carried), LocalAlt's split
    epoch, head alone then all (frozen BatchNorm layers in eval mode)."""
    head = {n: None for n, _ in model.named_parameters() if n.startswith("head")}

    def split(i: int) -> list:
        v = random_mask(model, i)
        return [SplitEpoch((v, {n: ~m for n, m in v.items()}))] * 2

    return {"whole": lambda i: [None, None], "masked": lambda i: [random_mask(model, i)] * 2,
            "split_epoch": split, "head_then_all": lambda i: [head, None]}


def requests(models: list[nn.Module], passes, *, optim: OptimConfig, xs, ys, **kwargs) -> list[TrainRequest]:
    return [TrainRequest(m, xs[i], ys[i], passes(i), optim=optim, transform=noisy_transform,
                         generator=torch.Generator().manual_seed(100 + i), identity=(0, i, 0, 0), **kwargs)
            for i, m in enumerate(models)]


@pytest.fixture(scope="module")
def clients():
    torch.manual_seed(0)
    base = TinyBatchNormNet().double()
    models = []
    for _ in range(K):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        models.append(model)
    xs = [torch.randn(N, 3, SIDE, SIDE, dtype=torch.float64) for _ in range(K)]
    ys = [torch.randint(0, 3, (N,)) for _ in range(K)]
    return models, xs, ys


@pytest.mark.parametrize("schedule", ["whole", "masked", "split_epoch", "head_then_all"])
@pytest.mark.parametrize("optim", [OptimConfig(lr=0.05, batch_size=8),
                                   OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8)],
                         ids=["sgd", "momentum_wd"])
def test_a_batched_call_leaves_each_model_as_its_own_call_does(clients, schedule, optim):
    models, xs, ys = clients
    passes = schedules(models[0])[schedule]
    alone, together = [copy.deepcopy(m) for m in models], [copy.deepcopy(m) for m in models]
    expected = [r.run_alone() for r in requests(alone, passes, optim=optim, xs=xs, ys=ys, freeze_frozen_norms=True)]
    got = train_together(requests(together, passes, optim=optim, xs=xs, ys=ys, freeze_frozen_norms=True))
    for a, b, e, g in zip(alone, together, expected, got, strict=True):
        for name, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], value, rtol=0, atol=1e-10, msg=name)
        assert (g.samples, g.steps) == (e.samples, e.steps)
        assert g.loss_sum == pytest.approx(e.loss_sum, rel=1e-12)
    # the models did train (and a frozen part did not move where the schedule froze it)
    assert not torch.equal(together[0].conv1.weight, models[0].conv1.weight)


def test_frozen_statistics_stay_frozen(clients):
    models, xs, ys = clients
    together = [copy.deepcopy(m) for m in models]
    train_together(requests(together, lambda i: [None], optim=OptimConfig(lr=0.05, batch_size=8), xs=xs, ys=ys,
                            freeze_norm_stats=True))
    for before, after in zip(models, together, strict=True):
        assert torch.equal(before.bn1.running_mean, after.bn1.running_mean)
        assert not torch.equal(before.bn1.weight, after.bn1.weight)


def test_signature_groups_calls_that_train_the_same_tensors(clients):
    models, xs, ys = clients
    optim = OptimConfig(lr=0.05, batch_size=8)
    a, b = requests(models[:2], lambda i: [random_mask(models[0], i)], optim=optim, xs=xs, ys=ys)
    assert batch_signature(a) == batch_signature(b)  # masks differ, the trainable tensors do not
    head_only = {"head.weight": None, "head.bias": None}
    (c,) = requests(models[:1], lambda i: [head_only], optim=optim, xs=xs, ys=ys)
    assert batch_signature(c) != batch_signature(a)
    # an all-False mask freezes its tensor, as trainable_only does: another set of trainable tensors
    frozen_conv = {**random_mask(models[0], 0), "conv1.weight": torch.zeros_like(models[0].conv1.weight, dtype=bool)}
    (d,) = requests(models[:1], lambda i: [frozen_conv], optim=optim, xs=xs, ys=ys)
    assert batch_signature(d) != batch_signature(a)
    (e,) = requests(models[:1], lambda i: [None], optim=optim, xs=xs, ys=ys, extra_loss=lambda m: 0.0)
    assert batch_signature(e) is None  # an extra loss reads the module: trained alone
    (f,) = requests(models[:1], lambda i: [random_mask(models[0], 1)], optim=optim, xs=[x[:12] for x in xs],
                    ys=[y[:12] for y in ys])
    assert batch_signature(f) != batch_signature(a)  # another data size: other batches


def test_rendezvous_batches_waiting_calls_and_returns_each_result(clients):
    models, xs, ys = clients
    optim = OptimConfig(lr=0.05, batch_size=8)
    copies = [copy.deepcopy(m) for m in models]
    calls = requests(copies, lambda i: [None], optim=optim, xs=xs, ys=ys)
    threads = set()

    def job(request: TrainRequest) -> int:
        threads.add(threading.get_ident())
        first = client_batching.train(request)
        second = client_batching.train(request)  # a client's second call meets the others' again
        return first.steps + second.steps

    rendezvous = client_batching.Rendezvous()
    out = rendezvous.run([(i, lambda r=r: job(r)) for i, r in enumerate(calls)])
    assert out == {i: 6 for i in range(K)}
    assert (rendezvous.meetings, rendezvous.batched_calls, rendezvous.calls_in_batches) == (2, 2, 2 * K)
    assert len(threads) == K and threading.get_ident() not in threads
    assert client_batching.active_rendezvous() is None  # the main thread trains directly


def test_rendezvous_batches_at_most_max_clients_at_a_time(clients):
    models, xs, ys = clients
    calls = requests([copy.deepcopy(m) for m in models], lambda i: [None], optim=OptimConfig(lr=0.05, batch_size=8),
                     xs=xs, ys=ys)
    rendezvous = client_batching.Rendezvous(max_clients=2)
    out = rendezvous.run([(i, lambda r=r: client_batching.train(r).steps) for i, r in enumerate(calls)])
    assert out == {i: 3 for i in range(K)}
    assert (rendezvous.batched_calls, rendezvous.calls_in_batches, rendezvous.calls_alone) == (1, 2, 1)


def test_client_batch_max_needs_client_batching():
    with pytest.raises(ConfigError, match="train.client_batch_max"):
        load_config_dict({"train": {"client_batch_max": 4}})
    with pytest.raises(ConfigError, match="train.client_batch_max"):
        load_config_dict({"train": {"client_batching": True, "client_batch_max": -1}})


def test_rendezvous_raises_a_clients_error_after_the_others_finish(clients):
    models, xs, ys = clients
    optim = OptimConfig(lr=0.05, batch_size=8)
    good = requests([copy.deepcopy(models[0])], lambda i: [None], optim=optim, xs=xs, ys=ys)[0]
    bad = requests([copy.deepcopy(models[1])], lambda i: [{"no.such": None}], optim=optim, xs=xs, ys=ys)[0]
    finished = []

    def ok() -> None:
        client_batching.train(good)
        finished.append(0)

    def failing() -> None:
        raise ValueError("client 2 broke")

    with pytest.raises(KeyError, match="no.such"):
        client_batching.Rendezvous().run([(0, ok), (1, lambda: client_batching.train(bad)), (2, failing)])
    assert finished == [0]
    with pytest.raises(ValueError, match="client 2 broke"):
        client_batching.Rendezvous().run([(0, ok), (2, failing)])


def _flow_run(algorithm: str, algo: dict, batched: bool):
    """Two rounds in float64: summation order then moves values by ~1e-15, far from flipping a top-k."""
    config, _, args, _, _, ctx, trainers, server, _ = make_run(
        algorithm, rounds=2, num_clients=3, algo=algo, client_batching=batched,
        model_cls=lambda: build_model("cnn", 3, image_size=16).double())
    transform = ctx.transform
    ctx.transform = lambda x, *, train, generator=None: transform(x, train=train, generator=generator).double()
    flow = SimulationFlow(args=args, device="cpu", clients=trainers, server=server, rounds=2, participation=1.0,
                          seed=config.seed, progress=False, batch_clients=batched)
    return flow.run(), server.get_model_params(), trainers


@pytest.mark.parametrize(("algorithm", "algo"), [
    ("fedavg", {}), ("fedrep", {}), ("fedbabu", {}), ("ditto", {}), ("lotteryfl", {}), ("layersel", {}),
    ("fedselect", {"gradltn_iterations": 2, "gradltn_epochs": 1}),
    ("fedselect", {"mask_search": "grow", "p": 0.25, "maskable": "weights"}),
])
def test_a_batched_federation_matches_the_sequential_one(algorithm, algo):
    seq_results, seq_global, seq_clients = _flow_run(algorithm, algo, False)
    results, global_state, trained = _flow_run(algorithm, algo, True)
    for name, value in seq_global.items():
        torch.testing.assert_close(global_state[name], value, rtol=0, atol=1e-10, msg=name)
    for a, b in zip(seq_clients, trained, strict=True):
        assert a.packed_mask.keys() == b.packed_mask.keys()
        for name, values in a.personal_values.items():
            torch.testing.assert_close(b.personal_values[name], values, rtol=0, atol=1e-10)
        assert b.model is seq_clients[0].model or b.model is trained[0].model  # the shared module again
    for s, r in zip(seq_results, results, strict=True):
        assert r.train_loss == pytest.approx(s.train_loss, rel=1e-12)
        assert r.client_metrics == s.client_metrics  # local work and personal fractions
        assert r.bytes_down == s.bytes_down
        # layer selection's reports are JSON text, whose length follows a score's last digits
        assert r.bytes_up == pytest.approx(s.bytes_up, rel=1e-3)
    # repeatable: a second batched run gives the same bits
    _, again, _ = _flow_run(algorithm, algo, True)
    assert all(torch.equal(again[n], v) for n, v in global_state.items())


def test_client_batching_with_cuda_graphs_true_is_a_config_error():
    with pytest.raises(ConfigError, match="train.client_batching"):
        load_config_dict({"train": {"client_batching": True, "cuda_graphs": True}})


def test_batched_runs_replay_no_cuda_graphs():
    *_, ctx, _, _, _ = make_run("fedavg", client_batching=True)
    assert ctx.cuda_graphs is False


def test_cross_silo_refuses_client_batching(tmp_path):
    from fedselect.runner.cross_silo import cross_silo_args

    config = tiny_config(tmp_path, "fedavg", client_batching=True)
    with pytest.raises(ConfigError, match="train.client_batching"):
        cross_silo_args(config, 0)


def test_fedselect_run_with_client_batching_records_the_same_local_work(tmp_path, monkeypatch):
    """The real runner (FedMLRunner, MLflow, run record) with batched clients."""
    data = tiny_data()
    monkeypatch.setattr(simulate, "load_data", lambda config: data)
    records = {}
    for batched in (False, True):
        config = tiny_config(tmp_path / str(batched), "fedselect", {"p": 0.5, "gradltn_iterations": 1}, rounds=2,
                             checkpoint_every=0, client_batching=batched)
        records[batched] = simulate.run_experiment(config, progress=False)
    assert records[True]["train_sample_passes_total"] == records[False]["train_sample_passes_total"] > 0
    # the record says how the calls ran: GradLTN's and LocalAlt's calls of the sampled clients, batched
    assert records[False]["client_batching"] is None
    batching = records[True]["client_batching"]
    assert batching["calls_in_batches"] >= 2 * batching["batched_calls"] > 0 and batching["calls_alone"] == 0
    assert records[True]["per_client_acc"] == pytest.approx(records[False]["per_client_acc"], abs=0.2)


@pytest.mark.parametrize("options", [{}, {"resize": 12}, {"channels_last": True}])
def test_stacked_augmentation_equals_each_clients_own(options):
    """One augmentation pass over all clients' batches: the same draws per generator, the same values."""
    from fedselect.engine import ImageTransform

    transform = ImageTransform((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), augment=True, **options)
    batches = [torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8) for _ in range(3)]
    alone = torch.stack([transform(b, train=True, generator=torch.Generator().manual_seed(i))
                         for i, b in enumerate(batches)])
    stacked = transform.stacked(batches, [torch.Generator().manual_seed(i) for i in range(3)])
    assert torch.equal(stacked, alone)


class WithUnusedLayer(TinyBatchNormNet):
    """A parameter the forward never reads gets no gradient: MaskedSGD leaves it, and its momentum, alone."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(2, 2)


def test_a_tensor_without_a_gradient_keeps_its_values():
    torch.manual_seed(1)
    models = [WithUnusedLayer().double() for _ in range(2)]
    xs = [torch.randn(N, 3, SIDE, SIDE, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 3, (N,)) for _ in range(2)]
    optim = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8)
    alone, together = [copy.deepcopy(m) for m in models], [copy.deepcopy(m) for m in models]
    for r in requests(alone, lambda i: [None, None], optim=optim, xs=xs, ys=ys):
        r.run_alone()
    train_together(requests(together, lambda i: [None, None], optim=optim, xs=xs, ys=ys))
    for before, a, b in zip(models, alone, together, strict=True):
        assert torch.equal(b.unused.weight, before.unused.weight) and torch.equal(a.unused.weight, before.unused.weight)
        torch.testing.assert_close(b.head.weight, a.head.weight, rtol=0, atol=1e-10)


def test_client_batching_of_a_text_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="train.client_batching.*text"):
        load_config_dict({"data": {"dataset": "amazon_reviews"}, "model": {"name": "minilm"},
                          "train": {"client_batching": True}})


class WithDropout(TinyBatchNormNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.nn.functional.dropout(x.mean(dim=(2, 3)), 0.5, self.training))


def test_dropout_in_a_batched_call_is_seeded_by_the_call():
    """Each client draws its own dropout masks (vmap randomness "different"); the draws repeat for
    the same call, and another stream of the round draws others."""
    torch.manual_seed(2)
    models = [WithDropout().double() for _ in range(2)]
    xs = [torch.randn(N, 3, SIDE, SIDE, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 3, (N,)) for _ in range(2)]
    optim = OptimConfig(lr=0.05, batch_size=8)

    def trained(stream: int) -> list[torch.Tensor]:
        copies = [copy.deepcopy(m) for m in models]
        calls = requests(copies, lambda i: [None], optim=optim, xs=xs, ys=ys)
        for call in calls:
            call.identity = (0, call.identity[1], 0, stream)
        train_together(calls)
        return [c.head.weight.detach().clone() for c in copies]

    first, again, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
