"""Solve time of the layer-selection problem (exact reductions + knapsacks + PuLP/CBC MILP) at N clients x L layers.

    python bench/selection_solve_time.py                  # N=100, L=50, all cases below
    python bench/selection_solve_time.py --clients 10 --layers 18 --time-limit 5
    python bench/selection_solve_time.py --costs unit --budgets identical --lambdas 0.001 0.01 0.1 1
    python bench/selection_solve_time.py --min-trainers 3      # with the min-trainers constraint (issue 18)

Reads nothing; prints one row per (score model, costs, budgets, lambda): seconds, outcome (optimal,
or time_limit = the best selection found when the limit hit, with its gap to the solver's upper
bound), objective, mean layers per client and the disagreement D. Scores are normalized to mean 1,
as the layersel algorithm does, so lambda is in units of a mean layer score; by default the lambdas
are 0, 1, 10 and 100 times median(score) / N (the marginal penalty of one disagreeing client is
lambda (N - 2k - 1), so median / N makes it comparable to a typical score at 1x). Cases:

* scores: iid Gamma(1,1) noise (no shared structure: the hardest case), and layer-driven scores (a
  log-normal base per layer times small client noise), closer to real gradient norms, which differ
  far more between layers than between clients;
* costs: unit (one per layer) and parameter-count-like (log-normal, seeded, spanning ~two decades);
* budgets: identical (``--budget`` times the total cost) and heterogeneous (seeded truncated
  half-normal with that mean level, between 0.4x and 2x of it);
* the last layer (the head) is required.

At lambda = 0 (and for SNR/RGN, which solve with lambda = 0) the problem is one knapsack per client,
solved by :func:`fedselect.core.knapsack.knapsack` without CBC.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from fedselect.core.selection import disagreement, heterogeneous_budgets, solve_ilp


class _LastWarning(logging.Handler):
    """Keeps the solver's last time-limit warning, whose last argument is its upper bound."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.record: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.record = record


def score_models(clients: int, layers: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    iid = rng.gamma(1.0, 1.0, (clients, layers))
    base = rng.lognormal(0.0, 1.0, layers)
    layered = base[None, :] * rng.lognormal(0.0, 0.3, (clients, layers))
    return {"iid": iid / iid.mean(), "layer-driven": layered / layered.mean()}


def cost_models(layers: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 1])
    return {"unit": np.ones(layers), "params": np.round(rng.lognormal(13.0, 1.0, layers))}


def budget_models(costs: np.ndarray, clients: int, fraction: float, seed: int) -> dict[str, np.ndarray]:
    level = max(fraction * costs.sum(), 2.0 * costs[-1])  # room for the head and more
    if np.all(costs == 1):
        level = max(2.0, round(level))
    hetero = heterogeneous_budgets(clients, level=level, minimum=max(0.4 * level, costs[-1]), maximum=2.0 * level,
                                   seed=seed)
    return {"identical": np.full(clients, level), "heterogeneous": hetero}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--budget", type=float, default=0.2, help="budget level as a fraction of the total cost")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None,
                        help="absolute lambdas (default: --lambda-multiples times median score / N)")
    parser.add_argument("--lambda-multiples", type=float, nargs="+", default=[0.0, 1.0, 10.0, 100.0])
    parser.add_argument("--scores", nargs="+", default=["iid", "layer-driven"], choices=["iid", "layer-driven"])
    parser.add_argument("--costs", nargs="+", default=["unit", "params"], choices=["unit", "params"])
    parser.add_argument("--budgets", nargs="+", default=["identical", "heterogeneous"],
                        choices=["identical", "heterogeneous"])
    parser.add_argument("--time-limit", type=float, default=10.0, help="time limit per solve, seconds")
    parser.add_argument("--min-trainers", type=int, default=1,
                        help="every layer but the head trained by 0 or at least this many clients (1: no constraint)")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args()
    watcher = _LastWarning()
    logging.getLogger("fedselect.core.selection").addHandler(watcher)
    logging.getLogger("fedselect.core.selection").propagate = False
    print(f"N={ns.clients} clients x L={ns.layers} layers, budget level {ns.budget:g} of the total cost, "
          f"head required, time limit {ns.time_limit:g} s, min_trainers {ns.min_trainers}")
    print("| scores | costs | budgets | lambda | seconds | outcome | gap | objective | layers/client | D |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for sname, scores in score_models(ns.clients, ns.layers, ns.seed).items():
        if sname not in ns.scores:
            continue
        lambdas = ns.lambdas or [m * float(np.median(scores)) / ns.clients for m in ns.lambda_multiples]
        for cname, costs in cost_models(ns.layers, ns.seed).items():
            if cname not in ns.costs:
                continue
            for bname, budgets in budget_models(costs, ns.clients, ns.budget, ns.seed).items():
                if bname not in ns.budgets:
                    continue
                for lam in lambdas:
                    watcher.record = None
                    started = time.perf_counter()
                    result = solve_ilp(scores, costs, budgets, lam, required=(ns.layers - 1,),
                                       time_limit_s=ns.time_limit, min_trainers=ns.min_trainers)
                    seconds = time.perf_counter() - started
                    gap = "0"
                    if result.status == "time_limit" and watcher.record is not None:
                        upper = float(watcher.record.args[-1])
                        gap = f"{(upper - result.objective) / max(abs(upper), 1e-12):.2%}"
                    print(f"| {sname} | {cname} | {bname} | {lam:.4g} | {seconds:.2f} | {result.status} | {gap} | "
                          f"{result.objective:.2f} | {result.mask.sum(axis=1).mean():.1f} | "
                          f"{disagreement(result.mask):g} |", flush=True)


if __name__ == "__main__":
    main()
