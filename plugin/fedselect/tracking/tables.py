"""The study tables as text: Markdown (with the notes that say what each column means) and CSV.

Rows are those of :func:`fedselect.tracking.compare.table_rows`, optionally with the paper's
columns (``paper_method``, ``paper_acc``, ``diff_vs_paper_pp``) added by the analysis.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

FIELDS: tuple[str, ...] = (
    "run", "algorithm", "seeds", "final_acc_mean", "final_acc_std", "best_acc_mean", "best_acc_std",
    "last_acc_mean", "last_acc_std", "last_evals", "client_spread", "bytes_up_per_client_round",
    "bytes_down_per_client_round", "wall_seconds",
    "compute_backward_per_client_round", "train_passes_per_client_round", "eval_passes_per_client_eval",
    "paper_method", "paper_acc", "diff_vs_paper_pp",
)


def _pct(mean: float, std: float, seeds: int) -> str:
    """Mean ± std over seeds in percent; with one seed there is no spread to show, so "(n = 1)"."""
    return f"{100 * mean:.2f} (n = 1)" if seeds == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _passes(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown_table(rows: Sequence[Mapping[str, Any]], *, title: str | None = None,
                   notes: Sequence[str] = ()) -> str:
    """The rows as a Markdown table; eval passes, compute and paper columns appear only when some row has them."""
    has_eval = any(r.get("eval_passes_per_client_eval") is not None for r in rows)
    has_compute = any(r.get("compute_backward_per_client_round") is not None for r in rows)
    has_paper = any("paper_acc" in r for r in rows)
    has_last = bool(rows) and all("last_acc_mean" in r for r in rows)
    header = ["run", "algorithm", "seeds", "final acc (%)", "best-round acc (%)", "client spread (pp)",
              "MB up / client / round", "MB down / client / round", "wall s", "train sample passes / client / round"]
    if has_last:
        header.insert(5, f"mean of last {min(r['last_evals'] for r in rows)} evals (%)")
    if has_eval:
        header.append("eval adapt passes / client / eval")
    if has_compute:
        header.append("backward GFLOPs / client / round")
    if has_paper:
        header += ["paper method", "paper (%)", "final − paper (pp)"]
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["run"], r["algorithm"], str(r["seeds"]), _pct(r["final_acc_mean"], r["final_acc_std"], r["seeds"]),
                 _pct(r["best_acc_mean"], r["best_acc_std"], r["seeds"]), f"{100 * r['client_spread']:.2f}",
                 f"{r['bytes_up_per_client_round'] / 1e6:.3f}", f"{r['bytes_down_per_client_round'] / 1e6:.3f}",
                 f"{r['wall_seconds']:.0f}", _passes(r.get("train_passes_per_client_round"))]
        if has_last:
            cells.insert(5, _pct(r["last_acc_mean"], r["last_acc_std"], r["seeds"]))
        if has_eval:
            cells.append(_passes(r.get("eval_passes_per_client_eval")))
        if has_compute:
            value = r.get("compute_backward_per_client_round")
            cells.append("" if value is None else f"{value:.4g}")
        if has_paper:
            diff = r.get("diff_vs_paper_pp")
            cells += [r.get("paper_method") or "", r.get("paper_acc") or "",
                      "" if diff is None else f"{diff:+.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Accuracy: mean over clients of each client's per-sample test accuracy on its own test split, "
              "at the final round and at the best evaluated round; ± is the std over seeds (population, ddof = 0); "
              "client spread is the std over clients of the final accuracy, averaged over seeds; bytes are the "
              "run's totals divided by (clients × rounds)."]
    if has_last:
        lines.append("Mean of last evals: per run, the mean client accuracy averaged over its last evaluated rounds "
                     "(final included; fewer where a run evaluated fewer times), then mean ± std over seeds: "
                     "less noisy than one round.")
    passes = ("Sample passes: one forward + backward pass of one training sample, whatever part of the model trains; "
              "train: per sampled client per round, mask search and layer scoring included (`train_sample_passes_mean`"
              ", averaged over rounds; empty where runs do not log it)")
    if has_eval:
        passes += ("; eval adapt: per client per evaluation, spent adapting the model before it is evaluated "
                   "(FedBABU's fine-tuning; `eval_sample_passes_mean`, averaged over evaluated rounds)")
    lines.append(passes + ".")
    if has_compute:
        lines.append("Backward GFLOPs: the run's estimate of its clients' backward compute (`compute_backward_mean`, "
                     "mean over the round's clients; layer selection: `fedselect.core.compute`), averaged over rounds.")
    if has_paper:
        lines.append("Paper: the number the paper reports for the matching method; the difference is our final "
                     "mean minus it (for a range, the distance to its nearest end; 0 inside).")
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV with the columns of :data:`FIELDS`; accuracies as fractions, bytes in bytes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in FIELDS})
    return buf.getvalue()

