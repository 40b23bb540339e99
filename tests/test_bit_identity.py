"""Speed work must not move a bit: fingerprints of local training, evaluation and mask selection.

The fingerprints were recorded on CPU with the pinned torch (requirements.txt) before the speed
changes of the engine and the mask functions (device-side loss sums, fused optimizer updates,
candidate selection without ``nonzero``). Any change here means CPU metrics of every run change:
that must be an algorithm change, stated as such, never a side effect of making things faster.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from fedselect.core.topk import grow_mask, topk_mask, topk_mask_global
from fedselect.engine import ImageTransform, OptimConfig, SplitEpoch, evaluate, train_passes


def digest(tensors: object) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

def engine_case() -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 5))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (37, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 5, (37,), generator=g)
    params = dict(model.named_parameters())
    half = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in params.items()}
    other = {n: ~m for n, m in half.items()}
    transform = ImageTransform((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), augment=True, pad=2)
    stats = train_passes(model, x, y, [None, SplitEpoch((half, other)), {"5.weight": None}],
                         optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=8),
                         transform=transform, generator=torch.Generator().manual_seed(2), freeze_frozen_norms=True)
    ev = evaluate(model, x, y, transform=transform, batch_size=16)
    return (digest(model.state_dict().values()), repr(stats.loss_sum), stats.samples, stats.steps, ev.correct,
            repr(ev.loss_sum))

def mask_case() -> str:
    g = torch.Generator().manual_seed(3)
    scores = {"a": torch.randint(0, 4, (50, 7), generator=g).float(), "b": torch.rand(33, generator=g)}
    within = {k: torch.rand(v.shape, generator=g) < 0.6 for k, v in scores.items()}
    out = [topk_mask(scores["a"], 40, within=within["a"]), topk_mask(scores["b"], 5),
           *topk_mask_global(scores, 60, within=within).values(),
           *grow_mask(within, scores, rate=0.3, target_fraction=0.9).values()]
    return digest(out)


RECORDED_WITH = "2.15"
pytestmark = pytest.mark.skipif(not torch.__version__.startswith(RECORDED_WITH),
                                reason=f"fingerprints recorded with torch {RECORDED_WITH} on CPU")


# the one-pass CPU kernels (fedselect.core.cpu_kernels) off and forced on: both give the recorded bits
kernel_settings = pytest.mark.parametrize("kernels", ["0", "1"])


@kernel_settings
def test_local_training_and_evaluation_are_bit_identical(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", kernels)
    assert engine_case() == ("0d84c282d3f0ba6e", "178.0971360206604", 111, 16, 11, "57.996535301208496")


@kernel_settings
def test_mask_selection_is_bit_identical(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSELECT_CPU_KERNELS", kernels)
    assert mask_case() == "214386e8eeddd5e5"
