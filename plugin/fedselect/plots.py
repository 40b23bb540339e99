"""Figures written by runs (artifacts); study-level figures live in analysis/."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def plot_iou_heatmap(matrix: np.ndarray, path: str | os.PathLike, *, title: str,
                     labels: Sequence[str] | None = None) -> None:
    """Clients x clients mask IoU as an annotated heatmap (FedSelect paper, Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    labels = list(labels) if labels is not None else [f"client {i}" for i in range(n)]
    # at least 6 x 5 inches at 300 dpi, growing with the clients, so the annotations stay readable
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.6 * n), max(5.0, 1.2 + 0.55 * n)))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("client")
    ax.set_ylabel("client")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="IoU of personal masks")
    fig.tight_layout()
    fig.savefig(path, dpi=300)
    plt.close(fig)


def plot_selection_heatmap(share: np.ndarray, path: str | os.PathLike, *, layers: Sequence[str],
                           rounds: Sequence[int], title: str) -> None:
    """Layers x rounds: the fraction of the round's clients that trained each layer
    (selective layer fine-tuning paper, Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(14.0, 2.0 + 0.25 * max(1, len(rounds))), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", origin="lower", interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    step = max(1, len(rounds) // 20)
    ax.set_xticks(range(0, len(rounds), step), [str(r) for r in rounds[::step]], fontsize=7)
    ax.set_xlabel("round")
    ax.set_ylabel("layer (input at the bottom)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of clients training it")
    fig.tight_layout()
    fig.savefig(path, dpi=300)
    plt.close(fig)
