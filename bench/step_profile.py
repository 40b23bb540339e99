"""Where one local training step's time goes: host (Python, kernel launches) or device (kernels).

    python bench/step_profile.py --device cuda --model resnet18 --batch 32 --steps 40 [--json OUT]

Trains ``--steps`` SGD steps of our engine (``fedselect.engine.train_passes``, momentum, no
augmentation unless ``--augment``) on random uint8 images, once per trainable spec:

- ``whole``: every tensor trainable in full (FedAvg's step: one multi-tensor update);
- ``masked``: every tensor trainable on a random half of its entries (FedSelect's LocalAlt step:
  the masked update, one tensor at a time);
- ``body``: every tensor but the head in full, the head frozen (FedRep's body phase).

``--graphs on`` runs the same steps with ``train.cuda_graphs`` (forward and backward replayed from
CUDA graphs, :mod:`fedselect.cuda_graphs`), ``--graphs both`` runs each spec both ways and prints,
per spec, the largest difference between the parameters after one epoch eager and one epoch
graphed from the same state and draws (CUDA only).

For each it prints wall ms per step (device synchronised before and after), and from
``torch.profiler`` over the same steps: device kernel ms per step, kernel launches per step,
host-device synchronisations per step, and the top operators by host time. When wall time per
step is far above kernel time, the step is bound by the host (launches, Python), not the device.
Runs on CPU too (no kernel columns); ``tests/test_bench_step_profile.py`` runs it tiny.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fedselect.engine import ImageTransform, OptimConfig, restore_state, snapshot_state, train_passes
from fedselect.models import build_model

SPECS = ("whole", "masked", "body")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def make_spec(model: torch.nn.Module, kind: str, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    params = dict(model.named_parameters())
    if kind == "whole":
        return {name: None for name in params}
    if kind == "body":
        head = list(params)[-2:]  # the classifier's weight and bias come last in every built-in model
        return {name: None for name in params if name not in head}
    return {name: (torch.rand(p.shape, generator=generator) < 0.5).to(p.device) for name, p in params.items()}


def step_setup(ns: argparse.Namespace) -> tuple[OptimConfig, ImageTransform]:
    """The optimizer settings and input transform every profiled step uses."""
    return (OptimConfig(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=ns.batch),
            ImageTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=ns.augment))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_spec(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, ns: argparse.Namespace,
                 device: torch.device, graphs: bool) -> dict[str, Any]:
    """Warm up, time, then profile the same number of steps of one trainable spec."""
    generator = torch.Generator().manual_seed(0)
    spec = make_spec(model, kind, generator)
    optim, transform = step_setup(ns)

    def epoch() -> int:
        return train_passes(model, x, y, [spec], optim=optim, transform=transform, generator=generator,
                            cuda_graphs=graphs).steps

    epoch()  # warm-up: cuDNN autotuning, allocator, first momentum buffers
    sync(device)
    started = time.perf_counter()
    steps = epoch()
    sync(device)
    wall_ms = 1000 * (time.perf_counter() - started) / steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        epoch()
        sync(device)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in events if e.key in SYNC_EVENTS)
    copies = sum(e.count for e in events if e.key.startswith("cudaMemcpy"))
    top = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:ns.top]
    return {
        "spec": kind + ("/graphed" if graphs else ""), "steps": steps, "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": kernel_us / 1000 / steps if device.type == "cuda" else None,
        "launches_per_step": launches / steps, "syncs_per_step": syncs / steps, "memcpy_per_step": copies / steps,
        "top_host_ops": [{"op": e.key, "calls_per_step": e.count / steps,
                          "self_host_ms_per_step": e.self_cpu_time_total / 1000 / steps} for e in top],
    }


def graphed_difference(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor,
                       ns: argparse.Namespace) -> dict[str, float]:
    """Largest |difference| of the parameters after one epoch eager and one graphed, same start."""
    start = snapshot_state(model)
    after = {}
    for graphs in (False, True):
        restore_state(model, start)
        generator = torch.Generator().manual_seed(1)
        spec = make_spec(model, kind, torch.Generator().manual_seed(0))
        optim, transform = step_setup(ns)
        train_passes(model, x, y, [spec], optim=optim, transform=transform, generator=generator, cuda_graphs=graphs)
        after[graphs] = snapshot_state(model)
    restore_state(model, start)
    # per floating-point tensor: largest |graphed - eager| relative to the tensor's largest |value|
    relative = {k: float((after[True][k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-12))
                for k, v in after[False].items() if v.is_floating_point()}
    worst = max(relative, key=relative.get)
    return {"max_abs": max(float((after[True][k].double() - v.double()).abs().max()) for k, v in after[False].items()),
            "max_value": max(float(v.double().abs().max()) for v in after[False].values()),
            "max_relative": relative[worst], "max_relative_tensor": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed (and per profiled) epoch")
    parser.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, of {', '.join(SPECS)}")
    parser.add_argument("--augment", action="store_true", help="random crop + flip on the device, as in training")
    parser.add_argument("--graphs", choices=("off", "on", "both"), default="off",
                        help="train.cuda_graphs for the steps (CUDA); both: each spec both ways, and their difference")
    parser.add_argument("--top", type=int, default=12, help="host operators listed per spec")
    parser.add_argument("--json", type=Path, help="write the figures here")
    ns = parser.parse_args(argv)
    unknown = [kind for kind in ns.specs.split(",") if kind not in SPECS]
    if unknown:
        parser.error(f"--specs: unknown spec {unknown[0]!r} (known: {', '.join(SPECS)})")
    device = torch.device(ns.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = build_model(ns.model, 10, image_size=ns.image_size).to(device)
    n = ns.batch * ns.steps
    x = torch.randint(0, 256, (n, 3, ns.image_size, ns.image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[ns.graphs]
    if True in modes and device.type != "cuda":
        parser.error("--graphs on|both needs --device cuda")
    results = [profile_spec(model, kind, x, y, ns, device, graphs) for kind in ns.specs.split(",") for graphs in modes]
    differences = {kind: graphed_difference(model, kind, x, y, ns) for kind in ns.specs.split(",")} \
        if ns.graphs == "both" else {}
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {label}; {ns.model} at {ns.image_size} px, batch {ns.batch}, {ns.steps} steps per epoch")
    print(f"{'spec':15} {'wall ms/step':>12} {'kernel ms/step':>15} {'launches/step':>14} {'syncs/step':>11}")
    for r in results:
        kernel = "-" if r["kernel_ms_per_step"] is None else f"{r['kernel_ms_per_step']:.2f}"
        print(f"{r['spec']:15} {r['wall_ms_per_step']:12.2f} {kernel:>15} {r['launches_per_step']:14.0f} "
              f"{r['syncs_per_step']:11.2f}")
    for r in results:
        print(f"\n{r['spec']}: top host operators (self ms per step, calls per step)")
        for op in r["top_host_ops"]:
            print(f"  {op['op'][:60]:60} {op['self_host_ms_per_step']:8.3f} {op['calls_per_step']:8.1f}")
    for kind, diff in differences.items():
        print(f"{kind}: after one epoch from the same state, graphed vs eager: largest |difference| "
              f"{diff['max_abs']:.3g} (largest |value| {diff['max_value']:.3g}); largest relative to its tensor's "
              f"largest |value|: {diff['max_relative']:.3g} ({diff['max_relative_tensor']})")
    if ns.json is not None:
        ns.json.write_text(json.dumps({"device": label, "model": ns.model, "batch": ns.batch, "results": results,
                                       "graphed_vs_eager": differences}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
