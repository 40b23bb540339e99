"""The names of the metrics a run logs to MLflow, in one place.

MLflow's run page groups charts by the prefix before ``/`` and sorts the groups by name, so the
headline accuracies (``acc/mean``, ``acc/final_mean``, ...) come first, in their own group, and the
per-client accuracies follow in ``acc_per_client/client_03`` (zero-padded, so they sort by client).
Stores written before these names (``mean_acc``, ``acc_client_3``) are still read: :func:`lookup`
and :data:`LEGACY` map each name to its old one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MEAN_ACC = "acc/mean"              # mean over evaluated clients of per-sample accuracy on their own test split
STD_ACC = "acc/std"                # spread over clients
MIN_ACC = "acc/min"
MAX_ACC = "acc/max"
POOLED_ACC = "acc/pooled"          # all clients' test samples counted together
FINAL_MEAN_ACC = "acc/final_mean"  # logged once at the end, at step = rounds
BEST_MEAN_ACC = "acc/best_mean"

LEGACY = {MEAN_ACC: "mean_acc", STD_ACC: "std_acc", MIN_ACC: "min_acc", MAX_ACC: "max_acc",
          POOLED_ACC: "pooled_acc", FINAL_MEAN_ACC: "final_mean_acc", BEST_MEAN_ACC: "best_mean_acc"}

CLIENT_ACC = re.compile(r"acc_per_client/client_(\d+)|acc_client_(\d+)")


def client_acc(client: int, num_clients: int) -> str:
    """``acc_per_client/client_03``: zero-padded to the width of the largest client id (at least 2)."""
    width = max(2, len(str(max(0, num_clients - 1))))
    return f"acc_per_client/client_{client:0{width}d}"


def client_of(metric: str) -> int | None:
    """The client id of a per-client accuracy metric (either naming), else None."""
    match = CLIENT_ACC.fullmatch(metric)
    return None if match is None else int(match.group(1) or match.group(2))


def lookup(metrics: Mapping[str, float], name: str) -> float | None:
    """``metrics[name]``, or its pre-rename name's value for a run logged before the rename."""
    if name in metrics:
        return metrics[name]
    return metrics.get(LEGACY.get(name, name))
