"""LocalAlt with momentum: the part held fixed neither moves nor gathers momentum (issue: momentum leak).

Pillutla et al. 2022, Alg. 1: while v trains, u is fixed, and vice versa. With one momentum
optimizer over both passes, the buffer of u's entries used to take in the gradients computed in
the v pass and spend them in the u pass, so LocalAlt reduced to delayed joint SGD.
"""

import copy

import torch
from torch import nn

from fedselect.engine import OptimConfig, SplitEpoch, client_generator, train_passes
from fedselect.optim import MaskedSGD


def identity(x, *, train, generator=None):
    return x


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 6, generator=gen)
    y = torch.randint(0, 3, (48,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Linear(6, 3)
    v = {"weight": torch.rand(3, 6, generator=gen) < 0.5, "bias": torch.tensor([True, False, False])}
    u = {k: ~m for k, m in v.items()}
    return model, x, y, v, u


OPT = OptimConfig(lr=0.1, momentum=0.9, batch_size=16)


def run(model, x, y, passes, stream=0):
    return train_passes(model, x, y, passes, optim=OPT, transform=identity,
                        generator=client_generator(0, 0, 0, stream))


def test_v_then_u_equals_v_then_fresh_u_pass():
    model, x, y, v, u = problem()
    joint = copy.deepcopy(model)
    run(joint, x, y, [v, u])
    # the same sample orders: one generator, v's pass first, then u's pass
    gen = client_generator(0, 0, 0)
    apart = copy.deepcopy(model)
    train_passes(apart, x, y, [v], optim=OPT, transform=identity, generator=gen)
    train_passes(apart, x, y, [u], optim=OPT, transform=identity, generator=gen)
    for name, value in joint.state_dict().items():
        assert torch.equal(value, apart.state_dict()[name]), name


def test_buffer_never_holds_gradient_of_entries_frozen_in_its_pass():
    model, x, y, v, _ = problem()
    optimizer = MaskedSGD(lr=0.1, momentum=0.9)
    params = [(name, p, v[name]) for name, p in model.named_parameters()]
    for _ in range(3):
        MaskedSGD.zero_grad(params)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step(params)
    for name, buf in optimizer.buffers.items():
        assert torch.count_nonzero(buf[~v[name]]) == 0, name
        assert torch.count_nonzero(buf[v[name]]) > 0, name


def test_u_pass_with_v_fixed_equals_u_only_training_from_the_same_start():
    # a u pass that follows a v pass starts from the v pass's result; training u alone from
    # that state with a fresh optimizer must give the same u
    model, x, y, v, u = problem(seed=3)
    run(model, x, y, [v])
    start = copy.deepcopy(model)
    after_v = {k: t.clone() for k, t in model.state_dict().items()}
    gen = client_generator(0, 0, 0, 5)
    train_passes(model, x, y, [u, u], optim=OPT, transform=identity, generator=gen)
    gen = client_generator(0, 0, 0, 5)
    train_passes(start, x, y, [u, u], optim=OPT, transform=identity, generator=gen)
    for name, value in model.state_dict().items():
        assert torch.equal(value, start.state_dict()[name])
        assert torch.equal(value[v[name]], after_v[name][v[name]]), "v moved in a u pass"


def test_split_epoch_sees_every_sample_once_and_trains_each_phase_on_its_half():
    model, x, y, v, u = problem()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    stats = run(model, x, y, [SplitEpoch((v, u))] * 2)
    assert stats.samples == 2 * len(y)
    # 24 samples per half, batches of 16: 2 steps per phase per epoch
    assert stats.steps == 2 * 2 * 2
    after = model.state_dict()
    assert not torch.equal(after["weight"][v["weight"]], before["weight"][v["weight"]])
    assert not torch.equal(after["weight"][u["weight"]], before["weight"][u["weight"]])


def test_split_epoch_with_an_empty_phase_is_a_plain_pass():
    model, x, y, v, u = problem()
    empty = {k: torch.zeros_like(m) for k, m in v.items()}
    full = {k: torch.ones_like(m) for k, m in v.items()}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    run(a, x, y, [SplitEpoch((empty, full))])
    run(b, x, y, [full])
    # the empty phase trains nothing but its half of the samples is not given to the other phase
    assert not all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    c = copy.deepcopy(model)
    stats = run(c, x, y, [SplitEpoch((empty, empty))])
    assert stats.samples == 0
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in c.state_dict().items())


def test_flat_masked_step_equals_the_per_tensor_step_bit_for_bit():
    """The GPU path (masked tensors updated as one flat vector) against the per-tensor one, forced
    on CPU: same parameters and buffers, bit for bit, through alternating v and u masks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    v = {name: torch.rand(p.shape, generator=gen) < 0.5 for name, p in net.named_parameters()}
    u = {name: ~m for name, m in v.items()}
    results = []
    for flat in (False, True):
        model = copy.deepcopy(net)
        optimizer = MaskedSGD(lr=0.1, momentum=0.9, weight_decay=5e-4, flat_masked=flat)
        for spec in (v, u, v, v, u):
            params = [(name, p, spec[name]) for name, p in model.named_parameters()]
            MaskedSGD.zero_grad(params)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step(params)
        results.append((model.state_dict(), optimizer.buffers))
    (state_a, buf_a), (state_b, buf_b) = results
    for name, value in state_a.items():
        assert torch.equal(value.view(torch.int32), state_b[name].view(torch.int32)), name
    for name, value in buf_a.items():
        assert torch.equal(value.view(torch.int32), buf_b[name].view(torch.int32)), name
