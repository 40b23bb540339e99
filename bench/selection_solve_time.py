"""Solve time of the layer-selection MILP (PuLP + bundled CBC) at N clients x L layers.

    python bench/selection_solve_time.py                 # N=100, L=50, lambdas 0.001 0.01 0.1 1
    python bench/selection_solve_time.py --clients 10 --layers 18 --time-limit 5

Reads nothing; prints one row per (score model, lambda): seconds, CBC outcome (optimal, or
time_limit = the best selection found when the limit hit), objective, mean layers per client and
the disagreement D. Scores are normalized to mean 1, as the layersel algorithm does, so lambda is
in units of a mean layer score. Two score models: iid Gamma(1,1) noise (no shared structure: the
hardest case), and layer-driven scores (a log-normal base per layer times small client noise),
closer to real gradient norms, which differ far more between layers than between clients.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedselect.core.selection import disagreement, solve_ilp


def score_models(clients: int, layers: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    iid = rng.gamma(1.0, 1.0, (clients, layers))
    base = rng.lognormal(0.0, 1.0, layers)
    layered = base[None, :] * rng.lognormal(0.0, 0.3, (clients, layers))
    return {"iid": iid / iid.mean(), "layer-driven": layered / layered.mean()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.2, help="budget as a fraction of the layers (unit costs)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--time-limit", type=float, default=10.0, help="CBC time limit per solve, seconds")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    costs = np.ones(ns.layers)
    budgets = np.full(ns.clients, max(1.0, round(ns.budget * ns.layers)))
    print(f"N={ns.clients} clients x L={ns.layers} layers, unit costs, budget {budgets[0]:g} layers, head required, "
          f"time limit {ns.time_limit:g} s")
    print("| scores | lambda | seconds | outcome | objective | layers/client | D |\n|---|---|---|---|---|---|---|")
    for name, scores in score_models(ns.clients, ns.layers, ns.seed).items():
        for lam in ns.lambdas:
            started = time.perf_counter()
            result = solve_ilp(scores, costs, budgets, lam, required=(ns.layers - 1,), time_limit_s=ns.time_limit)
            seconds = time.perf_counter() - started
            print(f"| {name} | {lam:g} | {seconds:.2f} | {result.status} | {result.objective:.2f} | "
                  f"{result.mask.sum(axis=1).mean():.1f} | {disagreement(result.mask):g} |", flush=True)


if __name__ == "__main__":
    main()
