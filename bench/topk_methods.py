"""How long one GradLTN selection of a whole model takes, by each way ``topk_masks`` can select.

    python bench/topk_methods.py --device cuda --model resnet18 --repeat 10 [--json OUT]

FedSelect's GradLTN (paper Alg. 1) selects, after each of its L trainings, the largest fraction
of gamma = |theta_trained - theta_0| within the current mask in every weight tensor; a study
round of the paper's Table 1 makes 50 of them (10 clients x L = 5). This times one such
selection on the model's weight tensors (ResNet-18: 11 M entries in 41 tensors), with
theta_trained = theta_0 + small noise and a random mask of ``--within`` of each tensor, keeping
``--keep`` of each tensor, for every method of ``fedselect.core.topk.topk_masks``:

- ``per_tensor``: one exact selection per tensor (the CPU's default; numba kernels on 1-2 threads);
- ``radix``: every tensor at once by counting (``fedselect.core.topk_radix``; the GPU's default);
- ``segmented``: every tensor at once by three stable sorts (the GPU's way before ``radix``).

It prints ms per selection (device synchronised around each, the best and the median of
``--repeat``, after one warm-up) and checks that all methods chose the same entries.
``tests/test_bench_topk_methods.py`` runs it tiny on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedselect.core.masks import target_count
from fedselect.core.topk import TOPK_METHODS, topk_masks
from fedselect.models import build_model

METHODS = tuple(m for m in TOPK_METHODS if m != "auto")


def selection_inputs(model_name: str, within: float, seed: int, device: torch.device):  # noqa: ANN201
    """theta_0 (the model's weights), theta_trained, the candidate mask: as one GradLTN selection sees them."""
    model = build_model(model_name, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    trained = {n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in theta0.items()}
    mask = {n: torch.rand(v.shape, generator=g) < within for n, v in theta0.items()}
    move = {n: v.to(device) for n, v in theta0.items()}, {n: v.to(device) for n, v in trained.items()}
    return (*move, {n: m.to(device) for n, m in mask.items()})


def time_method(method: str, theta0: dict, trained: dict, mask: dict, keep: float, repeat: int,
                device: torch.device) -> tuple[list[float], dict]:
    """ms of each of ``repeat`` selections (after one warm-up) and the last selection."""
    names = list(theta0)
    ks = {n: min(target_count(v.numel(), keep), int(mask[n].sum())) for n, v in theta0.items()}

    def gamma(name: str) -> torch.Tensor:  # as fedselect.core.gradltn._select computes it
        return (trained[name] - theta0[name]).abs()

    times, chosen = [], {}
    for i in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        chosen = topk_masks(names, gamma, ks, mask, method=method)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(1000 * (time.perf_counter() - t))
    return times, chosen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="resnet18", help="a built-in model (fedselect.models)")
    parser.add_argument("--within", type=float, default=0.87, help="candidate share of each tensor (the mask)")
    parser.add_argument("--keep", type=float, default=0.76, help="share of each tensor the selection keeps")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    ns = parser.parse_args(argv)
    device = torch.device(ns.device)
    methods = ns.methods.split(",")
    if any(m not in METHODS for m in methods) or ns.repeat < 1:
        parser.error(f"--methods takes {', '.join(METHODS)}; --repeat at least 1")
    theta0, trained, mask = selection_inputs(ns.model, ns.within, ns.seed, device)
    entries = sum(v.numel() for v in theta0.values())
    print(f"{ns.model} on {device}: {entries} weight entries in {len(theta0)} tensors, "
          f"torch threads {torch.get_num_threads()}")
    results, reference = {}, None
    for method in methods:
        times, chosen = time_method(method, theta0, trained, mask, ns.keep, ns.repeat, device)
        same = reference is None or all(torch.equal(chosen[n], reference[n]) for n in reference)
        reference = reference or chosen
        results[method] = {"best_ms": min(times), "median_ms": statistics.median(times), "same_entries": same}
        print(f"  {method:<11} best {min(times):8.2f} ms  median {statistics.median(times):8.2f} ms"
              f"  same entries as {methods[0]}: {same}")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "model": ns.model, "entries": entries,
              "tensors": len(theta0), "within": ns.within, "keep": ns.keep, "repeat": ns.repeat,
              "results": results}
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2))
    if not all(r["same_entries"] for r in results.values()):
        raise SystemExit("topk_methods: the methods chose different entries")
    return report


if __name__ == "__main__":
    main()
