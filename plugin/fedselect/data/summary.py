"""Human-readable views of a partition: a JSON-able summary and a clients x classes figure."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .partition import LabelArray, Partition

__all__ = ["partition_summary", "plot_partition"]

# beyond these sizes, per-cell numbers would be too small to read; the colours still are
_ANNOTATE_MAX_CLIENTS = 50
_ANNOTATE_MAX_CLASSES = 20


def partition_summary(
    partition: Partition, train_labels: LabelArray, test_labels: LabelArray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Per-client sample counts of ``partition``, as a JSON-able dict.

    Returns ``{"dataset", "kind", "spec", "num_clients", "num_classes", "classes", "totals",
    "train_size_stats", "clients": [{"client", "train_size", "test_size", "train_counts",
    "test_counts"}]}`` where the ``*_counts`` map every class name to its sample count.
    """
    counts = partition.class_counts(train_labels, test_labels)
    num_classes = len(counts["train"][0]) if counts["train"] else partition.num_classes
    names = [str(c) for c in class_names]
    if len(names) < num_classes:
        raise ValueError(f"class_names has {len(names)} names but the labels have {num_classes} classes")
    clients = []
    for k, (train_row, test_row) in enumerate(zip(counts["train"], counts["test"], strict=True)):
        clients.append({
            "client": k,
            "train_size": int(sum(train_row)),
            "test_size": int(sum(test_row)),
            "train_counts": {names[c]: int(n) for c, n in enumerate(train_row)},
            "test_counts": {names[c]: int(n) for c, n in enumerate(test_row)},
        })
    sizes = np.array([c["train_size"] for c in clients], dtype=np.int64)
    return {
        "dataset": partition.dataset,
        "kind": partition.kind,
        "spec": dict(partition.spec),
        "num_clients": partition.num_clients,
        "num_classes": len(names),
        "classes": names,
        "totals": {"train": int(sizes.sum()), "test": int(sum(c["test_size"] for c in clients))},
        "train_size_stats": {
            "min": int(sizes.min(initial=0)),
            "max": int(sizes.max(initial=0)),
            "mean": float(sizes.mean()) if sizes.size else 0.0,
        },
        "clients": clients,
    }


def plot_partition(summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw a clients x classes heatmap of train counts with each client's train/test sizes.

    Cells show their counts when there are at most 50 clients and 20 classes; the side bars are
    always labelled. The figure grows with the number of clients, so 100 clients stay legible.
    """
    # imported here: matplotlib costs a second to import and only plotting needs it
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    classes = list(summary["classes"])
    clients = summary["clients"]
    n_clients, n_classes = len(clients), len(classes)
    if n_clients == 0:
        raise ValueError("the summary has no clients to plot")
    grid = np.array([[c["train_counts"].get(name, 0) for name in classes] for c in clients], dtype=float)
    train_sizes = np.array([c["train_size"] for c in clients])
    test_sizes = np.array([c["test_size"] for c in clients])

    row_h = 0.28 if n_clients <= 30 else 0.16
    height = max(4.0, 1.8 + row_h * n_clients)
    width = min(max(7.0, 3.5 + 0.45 * n_classes), 22.0) + 3.5
    fig = Figure(figsize=(width, height), layout="constrained")
    heat_ax, bar_ax = fig.subplots(1, 2, sharey=True, width_ratios=[max(n_classes, 4), 3])

    # zeros are masked (left blank) so that a pathological split reads as its few filled cells
    masked = np.ma.masked_equal(grid, 0)
    positive = grid[grid > 0]
    top = float(positive.max()) if positive.size else 1.0
    # a log scale keeps Dirichlet's few huge cells from washing out the many small ones
    use_log = positive.size > 0 and positive.min() * 50 < top
    norm = LogNorm(vmin=float(positive.min()), vmax=top) if use_log else Normalize(0.0, top)
    image = heat_ax.imshow(masked, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=heat_ax, label="train samples", shrink=0.6, pad=0.01)

    heat_ax.set_xticks(range(n_classes))
    tilt = n_classes > 5
    heat_ax.set_xticklabels(classes, rotation=60 if tilt else 0, ha="right" if tilt else "center",
                            fontsize=8 if n_classes <= 20 else 5)
    step = 1 if n_clients <= 50 else 5
    heat_ax.set_yticks(range(0, n_clients, step))
    heat_ax.set_yticklabels([str(k) for k in range(0, n_clients, step)], fontsize=8 if n_clients <= 50 else 6)
    heat_ax.set_xlabel("class")
    heat_ax.set_ylabel("client")
    if n_clients <= _ANNOTATE_MAX_CLIENTS and n_classes <= _ANNOTATE_MAX_CLASSES:
        fontsize = 7 if n_clients <= 30 else 5
        for (k, c), value in np.ndenumerate(grid):
            if value:
                # dark text on the bright end of viridis, light text on the dark end
                bright = norm(value) > 0.6
                heat_ax.text(c, k, f"{int(value)}", ha="center", va="center", fontsize=fontsize,
                             color="black" if bright else "white")

    ys = np.arange(n_clients)
    bar_h = 0.4 if n_clients <= 50 else 0.45
    bar_ax.barh(ys - bar_h / 2, train_sizes, height=bar_h, color="tab:blue", label="train")
    bar_ax.barh(ys + bar_h / 2, test_sizes, height=bar_h, color="tab:orange", label="test")
    if n_clients <= _ANNOTATE_MAX_CLIENTS:
        for k in range(n_clients):
            bar_ax.text(train_sizes[k], k - bar_h / 2, f" {train_sizes[k]}", va="center", fontsize=6)
            bar_ax.text(test_sizes[k], k + bar_h / 2, f" {test_sizes[k]}", va="center", fontsize=6)
    bar_ax.set_xlim(0, max(int(train_sizes.max()), int(test_sizes.max()), 1) * 1.25)
    bar_ax.set_xlabel("samples per client")
    bar_ax.grid(axis="x", alpha=0.3)
    bar_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=7, frameon=False)

    spec = summary.get("spec", {})
    params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "kind" and v is not None)
    totals = summary.get("totals", {})
    fig.suptitle(f"{summary.get('dataset') or 'dataset'}: {summary.get('kind')} partition ({params})\n"
                 f"{n_clients} clients, {totals.get('train', int(train_sizes.sum()))} train / "
                 f"{totals.get('test', int(test_sizes.sum()))} test samples", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
