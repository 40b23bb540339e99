"""The CPU kernels against the PyTorch / numpy passes they replace, side by side in one process.

    python bench/cpu_kernels.py                      # 2.4 M entries (a ResNet-18 layer4 kernel), 1 and 2 threads
    python bench/cpu_kernels.py --entries 100000 --threads 1 --repeat 5 --json out.json

For each masked operation of a FedSelect round (fedselect.core.cpu_kernels), times the PyTorch path
(``FEDSELECT_CPU_KERNELS=0``) and the kernel (``=1``) on the same data, medians of ``--repeat``
calls, at each PyTorch thread count of ``--threads``, checks that both give the same bits, and
prints the table (ms per call and the ratio). bench/README.md, "CPU, fifth pass", has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

from fedselect.core import cpu_kernels  # noqa: E402
from fedselect.core.aggregate import MaskedMean  # noqa: E402
from fedselect.core.masks import compress, scatter_masked  # noqa: E402
from fedselect.core.topk import topk_abs_change, topk_mask  # noqa: E402
from fedselect.optim import MaskedSGD  # noqa: E402


def operations(n: int, seed: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each operation as a call on fixed data that returns its result (a fresh tensor)."""
    g = torch.Generator().manual_seed(seed)
    param, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) < 0.5
    candidates = int(mask.sum())
    personal = torch.randn(candidates, generator=g)
    global_values = torch.randn(n, generator=g)
    scores = torch.randn(n, generator=g).abs()

    weight = torch.nn.Parameter(param.clone())
    weight.grad = grad
    optimizer = MaskedSGD(lr=0.05)

    def sgd_step() -> torch.Tensor:
        # in place: the figure is the step alone; the result is compared after the first call
        optimizer.step([("w", weight, mask)])
        return weight.detach()

    def server_sum() -> torch.Tensor:
        mean = MaskedMean({"w": global_values})
        mean.add_personal("w", param, mask, 40)
        mean.add_personal("w", grad, ~mask, 12)
        return mean.result()[0]["w"]

    def merge() -> torch.Tensor:
        return scatter_masked(torch.empty(n), mask, personal, base=global_values)

    return {
        "masked SGD step": sgd_step,
        "server sums and mean, two uploads": server_sum,
        "global values + personal ones": merge,
        "compaction x[m]": lambda: compress(param, mask),
        "top-k, half the entries candidates": lambda: topk_mask(scores, n // 4, within=mask),
        # GradLTN's selection: the largest |trained - theta_0| (the PyTorch path makes the changes first)
        "top-k of |new - old|, half candidates": lambda: topk_abs_change(
            param, global_values, n // 4, within=mask, candidates=candidates),
    }


def timed(call: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    """Median ms per call, and the first call's result (a copy: the SGD step works in place)."""
    result = call().clone()  # also the warm-up (and numba's compile or cache load)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), result


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=2_359_296, help="entries per tensor (default: 2359296)")
    parser.add_argument("--threads", default="1,2", help="PyTorch thread counts, comma-separated (default: 1,2)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per figure (default: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    ns = parser.parse_args(argv)
    if not cpu_kernels.NUMBA_FOUND:
        print("bench/cpu_kernels.py: error: numba is not installed", file=sys.stderr)
        return 2
    rows = []
    saved, saved_threads = os.environ.get(cpu_kernels.ENV), torch.get_num_threads()
    try:
        for threads in (int(t) for t in ns.threads.split(",")):
            torch.set_num_threads(threads)
            for name in operations(ns.entries, ns.seed):
                os.environ[cpu_kernels.ENV] = "0"
                torch_ms, expected = timed(operations(ns.entries, ns.seed)[name], ns.repeat)
                os.environ[cpu_kernels.ENV] = "1"
                kernel_ms, result = timed(operations(ns.entries, ns.seed)[name], ns.repeat)
                rows.append({"operation": name, "threads": threads, "pytorch_ms": torch_ms, "kernel_ms": kernel_ms,
                             "same_bits": same_bits(result, expected)})
    finally:
        # the caller's thread count back (a test process's later convolutions depend on it)
        torch.set_num_threads(saved_threads)
        if saved is None:
            os.environ.pop(cpu_kernels.ENV, None)
        else:
            os.environ[cpu_kernels.ENV] = saved
    print(f"{ns.entries} entries, random 50 % mask, median of {ns.repeat} calls, ms")
    print(f"{'operation':36s} {'threads':>7s} {'PyTorch':>9s} {'kernel':>9s} {'ratio':>6s}  same bits")
    for r in rows:
        print(f"{r['operation']:36s} {r['threads']:7d} {r['pytorch_ms']:9.2f} {r['kernel_ms']:9.2f} "
              f"{r['pytorch_ms'] / r['kernel_ms']:6.1f}  {r['same_bits']}")
    if ns.json:
        ns.json.write_text(json.dumps({"entries": ns.entries, "repeat": ns.repeat, "rows": rows}, indent=1))
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
