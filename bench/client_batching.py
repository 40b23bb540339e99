"""K clients' training calls one after another against one batched call (``train.client_batching``).

    python bench/client_batching.py --device cuda --model resnet18 --clients 10 --samples 40 --epochs 5 [--json OUT]

Each of ``--clients`` clients holds ``--samples`` random uint8 images and its own copy of the model
(perturbed, so the copies differ); each makes the same call of our engine: ``--epochs`` passes of
``--spec`` (``whole``: every tensor in full, FedAvg's local update; ``masked``: every tensor on a
random half of its entries, a different half per client; ``localalt``: per epoch that half on half
of the samples, then the other half on the rest, FedSelect's local update), SGD with
momentum, batch ``--batch``, crop and flip augmentation. Once one client after the other
(:meth:`fedselect.batched_training.TrainRequest.run_alone`, what a round does without batching;
on CUDA with CUDA graphs, the default there),
once as one batched call (:func:`fedselect.batched_training.train_together`), from the same state
and random draws, alternated ``--repeat`` times. Printed per mode: wall ms per client step (the
device synchronised before and after), operators dispatched per client step (``compute``: those
that run a kernel; ``views``: metadata only, such as view, select or detach) and, on CUDA, kernel
launches and kernel ms per client step (``torch.profiler``); and the largest difference between the
two modes' parameters after the call, relative to the largest parameter value (float32:
summation order differs, see docs/GPU.md).
``tests/test_bench_client_batching.py`` runs it tiny on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedselect.batched_training import TrainRequest, train_together
from fedselect.engine import ImageTransform, OptimConfig, SplitEpoch
from fedselect.models import build_model

# operators that only make a new tensor header (no kernel, no data touched)
VIEW_OPS = {"view", "_unsafe_view", "detach", "select", "slice", "permute", "transpose", "t", "as_strided",
            "expand", "unsqueeze", "squeeze", "alias", "split", "split_with_sizes", "unbind", "reshape",
            "_reshape_alias", "set_", "lift_fresh"}


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched inside the block, below autograd and vmap (what runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    def split(self) -> tuple[int, int]:
        views = sum(n for op, n in self.counts.items() if op in VIEW_OPS)
        return sum(self.counts.values()) - views, views


def make_clients(ns: argparse.Namespace, device: torch.device) -> tuple[list[torch.nn.Module], list, list]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = build_model(ns.model, 10, image_size=ns.image_size).to(device)
    models = []
    for _ in range(ns.clients):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).to(device) * 0.01)
        models.append(model)
    xs = [torch.randint(0, 256, (ns.samples, 3, ns.image_size, ns.image_size), generator=gen,
                        dtype=torch.uint8).to(device) for _ in range(ns.clients)]
    ys = [torch.randint(0, 10, (ns.samples,), generator=gen).to(device) for _ in range(ns.clients)]
    return models, xs, ys


def passes_of(model: torch.nn.Module, kind: str, seed: int, epochs: int) -> list:
    """``epochs`` passes of the spec: whole, masked (a random half), or LocalAlt's epoch (that half,
    then the other half, each on half of the epoch's samples: FedSelect's local update)."""
    if kind == "whole":
        return [None] * epochs
    gen = torch.Generator().manual_seed(seed)
    half = {n: (torch.rand(p.shape, generator=gen) < 0.5).to(p.device) for n, p in model.named_parameters()}
    if kind == "masked":
        return [half] * epochs
    return [SplitEpoch((half, {n: ~m for n, m in half.items()}))] * epochs


def calls(models: list[torch.nn.Module], xs: list, ys: list, ns: argparse.Namespace) -> list[TrainRequest]:
    optim = OptimConfig(lr=0.01, momentum=0.9, batch_size=ns.batch)
    transform = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=True)
    # one after another, a CUDA device replays CUDA graphs, as a run does by default (train.cuda_graphs: auto);
    # a batched call has none
    graphs = xs[0].device.type == "cuda"
    return [TrainRequest(m, xs[i], ys[i], passes_of(m, ns.spec, i, ns.epochs), optim=optim, transform=transform,
                         generator=torch.Generator().manual_seed(100 + i), identity=(0, i, 0, 0), cuda_graphs=graphs)
            for i, m in enumerate(models)]


def measure(run: Callable[[], Any], device: torch.device, client_steps: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    run()
    sync()
    return {"wall_ms_per_client_step": (time.perf_counter() - start) * 1e3 / client_steps}


def profile(run: Callable[[], Any], device: torch.device, client_steps: int) -> dict[str, float]:
    """Operators (and on CUDA kernels) per client step, from a separate run of the same call."""
    with OperatorCount() as ops:
        run()
    compute, views = ops.split()
    out = {"compute_ops_per_client_step": compute / client_steps, "view_ops_per_client_step": views / client_steps}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        events = prof.key_averages()
        out["launches_per_client_step"] = sum(e.count for e in events if e.key.startswith("cudaLaunch")
                                              or e.key == "cudaGraphLaunch") / client_steps
        out["kernel_ms_per_client_step"] = sum(getattr(e, "self_device_time_total", 0.0) for e in events
                                               if e.device_type.name == "CUDA") / 1e3 / client_steps
    return out


def run_mode(mode: str, models: list, xs: list, ys: list, ns: argparse.Namespace) -> tuple[list, Callable[[], Any]]:
    """Fresh copies of the clients' models and the call that trains them in this mode."""
    copies = [copy.deepcopy(m) for m in models]
    requests = calls(copies, xs, ys, ns)
    if mode == "one_after_another":
        return copies, lambda: [r.run_alone() for r in requests]
    return copies, lambda: train_together(requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=40, help="training images per client (fedselect_table1: 40)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--spec", choices=("whole", "masked", "localalt"), default="masked")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode, alternated (after one warm-up)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    ns = parser.parse_args(argv)
    device = torch.device(ns.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models, xs, ys = make_clients(ns, device)
    steps = len(range(0, ns.samples, ns.batch)) * ns.epochs * ns.clients
    modes = ("one_after_another", "batched")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    trained = {}
    for attempt in range(ns.repeat + 1):  # the first is a warm-up (cuDNN autotuning, first allocations)
        for mode in modes:
            copies, run = run_mode(mode, models, xs, ys, ns)
            figures = measure(run, device, steps)
            trained[mode] = copies
            if attempt:
                walls[mode].append(figures["wall_ms_per_client_step"])
    results: dict[str, Any] = {}
    for mode in modes:
        _, run = run_mode(mode, models, xs, ys, ns)
        results[mode] = {"wall_ms_per_client_step": statistics.median(walls[mode]), "wall_ms_runs": walls[mode],
                         **profile(run, device, steps)}
    # parameters only: BatchNorm's running variance of a batch of a few 1x1 feature maps is too
    # ill-conditioned to compare (docs/GPU.md); relative to the largest parameter value
    pairs = [(a.detach(), b.detach()) for one, two in zip(*trained.values(), strict=True)
             for a, b in zip(one.parameters(), two.parameters(), strict=True)]
    difference = max((a - b).abs().max().item() for a, b in pairs) / max(a.abs().max().item() for a, _ in pairs)
    speedup = results["one_after_another"]["wall_ms_per_client_step"] / results["batched"]["wall_ms_per_client_step"]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(ns).items()},
              "client_steps": steps, "results": results, "speedup_batched": speedup,
              "largest_parameter_difference": difference}
    for mode, figures in results.items():
        print(f"{mode:>18}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if not isinstance(v, list)))
    print(f"batched: {speedup:.2f}x per client step; largest parameter difference {difference:.3g} (relative)")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
