"""Study figures, read from MLflow through the run records (or any MLflow selection).

    python -m analysis.figures --study configs/default.yaml --out-dir results/default/figures \\
        results/default/runs/*.json

Reads: the run records (MLflow run ids, tracking URIs), the MLflow runs (metrics, per-round
histories, artifacts), the study YAML (optional: the paper's points on the p figure).
Writes into --out-dir (PNG, matplotlib Agg):
  learning_curves.png     mean client accuracy per round, mean +- std band over seeds, per variant
  accuracy_vs_p.png       final accuracy vs personalization rate p of FedSelect (paper Fig. 2)
  accuracy_vs_bytes.png   final accuracy vs MB up and down per client per round
  accuracy_vs_compute.png final accuracy vs backward compute per client per round (only runs
                          logging compute_backward_mean; skipped, with a log line, when none do)
  artifacts/              copies of runs' figure artifacts: mask IoU heatmaps (masks/mask_iou_*.png,
                          FedSelect paper Fig. 1) and layer-selection heatmaps (selection/selection_heatmap.png)
  index.json              what was written, with captions, and what was skipped and why
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.paper import FEDSELECT_TABLE1, NOT_RECORDED, option_value
from analysis.runs import Selection, add_selection_args, load_selection, variant_options
from fedselect.files import atomic_write_text
from fedselect.tracking import metric_history, with_retry
from fedselect.tracking import metric_names as names
from fedselect.tracking.compare import RunStats

log = logging.getLogger(__name__)

# run artifacts collected into the report: (artifact path, kind, caption)
RUN_ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("masks/mask_iou_model.png", "mask_iou_model", "clients' personal-mask IoU, whole model"),
    ("masks/mask_iou_head.png", "mask_iou_head", "clients' personal-mask IoU, final linear layer"),
    ("selection/selection_heatmap.png", "selection_heatmap", "layers selected per client over rounds"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")

# a method's look in every figure of a study: name -> (colour, marker)
Styles = Mapping[str, tuple[Any, str]]


def method_styles(names: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """One colour and marker per run variant, fixed by the sorted names of the whole study, so a
    method looks the same in the learning curves, accuracy vs bytes and accuracy vs compute."""
    ordered = sorted(set(names))
    return {name: (color, _MARKERS[i % len(_MARKERS)]) for i, (name, color)
            in enumerate(zip(ordered, _colors(len(ordered)), strict=True))}


def _save(fig: Any, path: Path) -> None:
    """PNG at 300 dpi and a vector PDF beside it (papers take either)."""
    fig.tight_layout()
    fig.savefig(path, dpi=300)
    fig.savefig(path.with_suffix(".pdf"))
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- learning curves


def mean_curves(groups: Mapping[str, Sequence[RunStats]], key: str = names.MEAN_ACC) -> \
        dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per variant: (rounds, mean, std over seeds) of ``key`` on the rounds every seed evaluated.

    Rounds are counted from 1 (MLflow step = 0-based round index).
    """
    curves = {}
    for name, members in groups.items():
        histories = [dict(metric_history(s.tracking_uri, s.run_id, key)
                          or metric_history(s.tracking_uri, s.run_id, names.LEGACY.get(key, key))) for s in members]
        steps = sorted(set.intersection(*(set(h) for h in histories)))
        if not steps:
            raise ValueError(f"variant {name}: its runs share no round with a {key!r} value")
        values = np.array([[h[step] for step in steps] for h in histories])
        curves[name] = (np.array(steps) + 1, values.mean(axis=0), values.std(axis=0))
    return curves


def plot_learning_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path,
                         styles: Styles | None = None, labels: Mapping[str, str] | None = None) -> None:
    """Mean over seeds per round (rounds 1..R); a ± std band only where the seeds differ (none with one seed)."""
    plt = _pyplot()
    styles = styles or method_styles(list(curves))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    banded = False
    for name, (rounds, mean, std) in curves.items():
        color, marker = styles[name]
        ax.plot(rounds, 100 * mean, color=color, label=(labels or {}).get(name, name), marker=marker,
                markevery=max(1, len(rounds) // 10), markersize=4)
        if np.any(std > 0):
            banded = True
            ax.fill_between(rounds, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.2, linewidth=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("mean client test accuracy (%)")
    ax.set_title("learning curves" + (" (band: ± std over seeds)" if banded else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, ncol=2 if len(curves) > 6 else 1)
    _save(fig, path)


# ---------------------------------------------------------------------------- accuracy vs p


def fedselect_points(selection: Selection) -> dict[str, list[tuple[float, float, float, str]]]:
    """FedSelect variants as lines of (p, final mean, final std, variant): one line per setting of
    the other options that differ between variants (e.g. mask_search), points sorted by p.

    Options are the runs' recorded params (see :mod:`analysis.paper`): a variant whose runs did
    not record p is left out (logged), and an option a variant did not record is labelled so.
    """
    variants = []
    for name, (algorithm, options) in variant_options(selection.groups).items():
        if algorithm != "fedselect":
            continue
        p = option_value(options, "p")
        if p is NOT_RECORDED:
            log.info("accuracy vs p: left out %s, whose runs did not record algo.p", name)
            continue
        final = np.array([s.final_acc for s in selection.groups[name]])
        rest = {k: v for k, v in options.items() if k != "p"}
        variants.append((rest, (float(p), float(final.mean()), float(final.std()), name)))
    keys = sorted({k for rest, _ in variants for k in rest})
    differing = [k for k in keys if len({rest.get(k) for rest, _ in variants}) > 1]
    lines: dict[str, list[tuple[float, float, float, str]]] = {}
    for rest, point in variants:
        label = ", ".join(f"{k}={rest.get(k, 'not recorded')}" for k in differing) or "FedSelect (this study)"
        lines.setdefault(label, []).append(point)
    return {label: sorted(points) for label, points in lines.items()}


def plot_accuracy_vs_p(selection: Selection, path: Path) -> str | None:
    """FedSelect paper Figure 2; returns the reason when there is nothing to plot."""
    lines = fedselect_points(selection)
    ps = {p for points in lines.values() for p, *_ in points}
    if len(ps) < 2:
        return f"needs FedSelect runs at 2 or more personalization rates p (found: {sorted(ps) or 'none'})"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for color, (label, points) in zip(_colors(len(lines) + 1), lines.items(), strict=False):
        p, mean, std, _ = (np.array(v) for v in zip(*points, strict=True))
        ax.errorbar(p.astype(float), 100 * mean.astype(float), yerr=100 * std.astype(float), color=color,
                    marker="o", capsize=3, label=label)
    paper = selection.paper
    column = paper.column if paper is not None and paper.table is FEDSELECT_TABLE1 else None
    if column is not None:
        rows = [r for r in FEDSELECT_TABLE1.rows if r.algorithm == "fedselect" and "p" in r.options]
        ax.plot([r.options["p"] for r in rows], [r.values[column] for r in rows], "k--", marker="s",
                label=f"paper, Table 1 ({column})")
    ax.set_xlabel("personalization rate p")
    ax.set_ylabel("final mean client test accuracy (%)")
    ax.set_title("accuracy vs personalization rate (± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


# ------------------------------------------------------------------------ accuracy vs cost


def _scatter(ax: Any, xs: Sequence[float], rows: Sequence[Mapping[str, Any]], styles: Styles | None = None,
             labels: Mapping[str, str] | None = None) -> None:
    styles = styles or method_styles([r["run"] for r in rows])
    for x, row in zip(xs, rows, strict=True):
        color, marker = styles[row["run"]]
        label = (labels or {}).get(row["run"], row["run"])
        ax.errorbar([x], [100 * row["final_acc_mean"]], yerr=[100 * row["final_acc_std"]], color=color,
                    marker=marker, capsize=3, linestyle="none", label=label)
        ax.annotate(label, (x, 100 * row["final_acc_mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.grid(alpha=0.3)


def plot_accuracy_vs_bytes(rows: Sequence[Mapping[str, Any]], path: Path, styles: Styles | None = None,
                           labels: Mapping[str, str] | None = None) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "bytes_up_per_client_round", "MB up per client per round"),
                           (axes[1], "bytes_down_per_client_round", "MB down per client per round")):
        _scatter(ax, [r[key] / 1e6 for r in rows], rows, styles, labels)
        ax.set_xlabel(label)
    axes[0].set_ylabel("final mean client test accuracy (%)")
    fig.suptitle("accuracy vs communication (± std over seeds)")
    _save(fig, path)


def plot_accuracy_vs_compute(rows: Sequence[Mapping[str, Any]], path: Path, styles: Styles | None = None,
                             labels: Mapping[str, str] | None = None) -> str | None:
    """Only variants whose runs log ``compute_backward_mean``; returns the reason when none do."""
    with_compute = [r for r in rows if r.get("compute_backward_per_client_round") is not None]
    if not with_compute:
        return "no run logs compute_backward_mean"
    missing = [r["run"] for r in rows if r.get("compute_backward_per_client_round") is None]
    if missing:
        log.info("accuracy vs compute: left out variants that log no compute: %s", ", ".join(missing))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _scatter(ax, [r["compute_backward_per_client_round"] for r in with_compute], with_compute, styles, labels)
    ax.set_xlabel("estimated backward GFLOPs per client per round (compute_backward_mean)")
    ax.set_ylabel("final mean client test accuracy (%)")
    ax.set_title("accuracy vs compute (± std over seeds)")
    _save(fig, path)
    return None


# ------------------------------------------------------------------------------- artifacts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def collect_artifacts(stats: Sequence[RunStats], out_dir: Path) -> list[dict[str, Any]]:
    """Copy the runs' figure artifacts (:data:`RUN_ARTIFACTS`) that exist into ``out_dir``."""
    from mlflow.tracking import MlflowClient

    found = []
    clients: dict[str, Any] = {}
    for s in sorted(stats, key=lambda s: (s.group, s.seed)):
        client = clients.setdefault(s.tracking_uri, MlflowClient(s.tracking_uri))
        listed: dict[str, set[str]] = {}
        for artifact, kind, caption in RUN_ARTIFACTS:
            folder = artifact.rsplit("/", 1)[0]
            if folder not in listed:
                infos = with_retry("list artifacts", client.list_artifacts, s.run_id, folder)
                listed[folder] = {i.path for i in infos}
            if artifact not in listed[folder]:
                continue
            target = out_dir / f"{_slug(s.group)}-seed{_slug(s.seed)}-{kind}.png"
            with tempfile.TemporaryDirectory() as tmp:
                local = with_retry("download artifact", client.download_artifacts, s.run_id, artifact, tmp)
                shutil.copyfile(local, target)
            found.append({"kind": kind, "run": s.group, "seed": s.seed, "run_id": s.run_id,
                          "file": target.name, "caption": f"{s.group}, seed {s.seed}: {caption}"})
    return found


# ------------------------------------------------------------------------------------ main


def display_names(selection: Selection) -> dict[str, str]:
    """Each run variant's legend name: the study's display name (``FedSelect (p = 0.5)``), else the
    ``display`` tag its runs were logged with, else the variant name."""
    names_ = {name: next((s.tags["display"] for s in members if "display" in s.tags), name)
              for name, members in selection.groups.items()}
    if selection.study is not None:
        names_.update({name: selection.study.display(name) for name in names_ if name in selection.study.runs})
    return names_


def make_figures(selection: Selection, out_dir: Path) -> dict[str, Any]:
    """Write every figure there is data for into ``out_dir``; returns (and writes) the index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"figures": [], "skipped": [], "artifacts": []}

    def done(name: str, caption: str) -> None:
        index["figures"].append({"name": name, "file": f"{name}.png", "caption": caption})

    def skipped(name: str, reason: str) -> None:
        log.info("figure %s skipped: %s", name, reason)
        index["skipped"].append({"name": name, "reason": reason})

    # one look per method across the study's figures
    styles = method_styles([*selection.groups, *(r["run"] for r in selection.rows)])
    labels = display_names(selection)
    plot_learning_curves(mean_curves(selection.groups), out_dir / "learning_curves.png", styles, labels)
    done("learning_curves", "Mean client test accuracy per round (rounds 1..R; MLflow step = round - 1); line: "
                            "mean over seeds, band: ± std over seeds (none with one seed).")
    reason = plot_accuracy_vs_p(selection, out_dir / "accuracy_vs_p.png")
    if reason:
        skipped("accuracy_vs_p", reason)
    else:
        done("accuracy_vs_p", "Final mean client accuracy of FedSelect against its personalization rate p "
                              "(FedSelect paper, Figure 2); error bars: ± std over seeds.")
    plot_accuracy_vs_bytes(selection.rows, out_dir / "accuracy_vs_bytes.png", styles, labels)
    done("accuracy_vs_bytes", "Final mean client accuracy against bytes uploaded (left) and downloaded (right) "
                              "per client per round.")
    reason = plot_accuracy_vs_compute(selection.rows, out_dir / "accuracy_vs_compute.png", styles, labels)
    if reason:
        skipped("accuracy_vs_compute", reason)
    else:
        done("accuracy_vs_compute", "Final mean client accuracy against estimated backward GFLOPs per client per "
                                    "round (runs logging compute_backward_mean only).")
    artifacts_dir = out_dir / "artifacts"
    artifacts_dir.mkdir(exist_ok=True)
    index["artifacts"] = [{**a, "file": f"artifacts/{a['file']}"} for a in collect_artifacts(selection.stats,
                                                                                              artifacts_dir)]
    if not index["artifacts"]:
        skipped("artifacts", "no run has a mask IoU or layer-selection heatmap artifact")
    atomic_write_text(out_dir / "index.json", json.dumps(index, indent=2) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_args(parser)
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the PNGs and index.json")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # one progress bar per copied artifact would bury the log lines that matter
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        index = make_figures(load_selection(ns), ns.out_dir)
    except (ValueError, FileNotFoundError) as exc:
        print(f"figures: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(index['figures'])} figures and {len(index['artifacts'])} run artifacts to {ns.out_dir}; "
          f"skipped: {', '.join(s['name'] for s in index['skipped']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
