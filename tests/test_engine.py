"""Local training engine: masked steps, frozen tensors, augmentation, per-sample accuracy."""

import torch
from torch import nn

from fedselect.engine import (
    ImageTransform,
    OptimConfig,
    client_generator,
    evaluate,
    train_passes,
)


def tiny_problem(n: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=gen)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))
    transform = ImageTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True, pad=2)
    return model, x, y, transform


OPT = OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=16)


def test_masked_entries_and_frozen_tensors_are_bit_identical():
    model, x, y, transform = tiny_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = torch.zeros_like(model[1].weight, dtype=torch.bool)
    mask[:4] = True
    stats = train_passes(model, x, y, [{"1.weight": mask, "3.bias": None}] * 2, optim=OPT, transform=transform,
                         generator=client_generator(0, 0, 0))
    after = model.state_dict()
    assert stats.samples == 2 * len(y) and stats.steps == 2 * 4
    assert torch.equal(after["1.weight"][~mask], before["1.weight"][~mask])
    assert not torch.equal(after["1.weight"][mask], before["1.weight"][mask])
    assert torch.equal(after["1.bias"], before["1.bias"])
    assert torch.equal(after["3.weight"], before["3.weight"])
    assert not torch.equal(after["3.bias"], before["3.bias"])
    # requires_grad is restored afterwards
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_tensors_get_no_gradient_work():
    model, x, y, transform = tiny_problem()
    seen = []
    model[1].weight.register_hook(lambda g: seen.append(g))
    train_passes(model, x, y, [{"3.weight": None, "3.bias": None}], optim=OPT, transform=transform,
                 generator=client_generator(0, 0, 0))
    assert seen == []


def test_same_generator_same_result():
    results = []
    for _ in range(2):
        torch.manual_seed(1)
        model, x, y, transform = tiny_problem()
        train_passes(model, x, y, [None] * 2, optim=OPT, transform=transform, generator=client_generator(3, 1, 2))
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_augmentation_shapes_and_determinism():
    transform = ImageTransform((0.0,), (1.0,), augment=True, pad=4)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    a = transform(x, train=True, generator=torch.Generator().manual_seed(0))
    b = transform(x, train=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 1, 6, 6) and torch.equal(a, b)
    plain = transform(x, train=False)
    assert torch.allclose(plain, x.float() / 255.0)


def test_resize_happens_after_augmentation_and_keeps_plain_batches_exact():
    x = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    resized = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=True, pad=2, resize=20)
    plain = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=True, pad=2)
    gen = torch.Generator().manual_seed(1)
    out = resized(x, train=True, generator=gen)
    expected = torch.nn.functional.interpolate(plain(x, train=True, generator=torch.Generator().manual_seed(1)),
                                               size=(20, 20), mode="bilinear", align_corners=False)
    assert out.shape == (3, 3, 20, 20) and torch.equal(out, expected)
    # already at the target size: untouched
    assert torch.equal(ImageTransform((0.5,) * 3, (0.25,) * 3, augment=False, resize=8)(x, train=False),
                       plain(x, train=False))


def test_evaluate_counts_per_sample():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    x = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 0]], dtype=torch.uint8).view(3, 3, 1, 1)
    y = torch.tensor([0, 1, 1])
    result = evaluate(model, x, y, transform=ImageTransform((0, 0, 0), (1, 1, 1), augment=False), batch_size=2)
    assert (result.correct, result.total) == (2, 3)
    assert abs(result.accuracy - 2 / 3) < 1e-12


def test_frozen_norm_stats_keep_running_statistics_but_train_affine_weights():
    x = torch.randint(0, 256, (32, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    transform = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=False)
    results = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_passes(model, x, y, [None], optim=OPT, transform=transform, generator=client_generator(0, 0, 0),
                     freeze_norm_stats=frozen)
        results[frozen] = (before, model)
    before, model = results[True]
    assert torch.equal(model[1].running_mean, before["1.running_mean"])
    assert torch.equal(model[1].running_var, before["1.running_var"])
    assert not torch.equal(model[1].weight, before["1.weight"]) and model.training
    before, model = results[False]
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_cpu_crops_one_image_at_a_time_with_the_batched_gathers_values():
    """The CPU's per-image slice copies equal the batched gather, flip and select other devices run."""
    import torch.nn.functional as F

    for pad, shape, seed in ((4, (32, 3, 32, 32), 0), (2, (7, 1, 9, 13), 1), (0, (3, 3, 5, 5), 2)):
        transform = ImageTransform((0.0,), (1.0,), augment=True, pad=pad)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        got = transform._augment(x, *transform._draw(n := shape[0], torch.Generator().manual_seed(seed), x.device))
        g = torch.Generator().manual_seed(seed)
        _, c, h, w = shape
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        padded = F.pad(x, (pad,) * 4)
        rows = (offsets[:, 0:1] + torch.arange(h)).view(n, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w)).view(n, 1, 1, w)
        cropped = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
        assert torch.equal(got, torch.where(flips.view(n, 1, 1, 1), cropped.flip(3), cropped))


def test_client_global_rng_on_cpu_draws_as_torch_manual_seed_and_restores() -> None:
    import numpy as np

    from fedselect.engine import client_global_rng

    torch.manual_seed(11)
    outer = torch.random.get_rng_state()
    with client_global_rng(1, 2, 3, "cpu", stream=4):
        inside = torch.rand(6)
    assert torch.equal(torch.random.get_rng_state(), outer)  # the caller's stream continues untouched
    torch.manual_seed(int(np.random.SeedSequence([1, 2, 3, 4, 0xD509]).generate_state(1)[0]))
    assert torch.equal(inside, torch.rand(6))
