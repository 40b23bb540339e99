"""A study's Markdown report: its setting, the summary table next to the paper's numbers, the figures.

    python -m analysis.report --study configs/default.yaml --summary results/default/summary.md \\
        --figures results/default/figures --out results/default/report.md results/default/runs/*.json

Reads: the study YAML (the setting, the runs, the optional 'paper:' key), the summary table
written by analysis.summarize (and its "Paired differences" section, for a study with a
'paired:' key: shown as a section of its own), the figures folder written by analysis.figures
(its index.json), and the run records (optional: which MLflow run holds each run and seed).
Needs no MLflow.
Writes: --out, a Markdown file whose figure links are relative to it (keep it next to the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.paper import PaperSpec, read_study_paper
from fedselect.config import ExperimentConfig, build_dataclass
from fedselect.files import atomic_write_text
from fedselect.study import Study, load_study, run_config
from fedselect.tracking import read_run_record

SEED_SUFFIX = re.compile(r"-seed\d+$")


def _fmt(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "—"


def _changes(base: Mapping[str, Any], merged: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys whose value in ``merged`` differs from ``base``."""
    out: dict[str, Any] = {}
    for key, value in merged.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out.update(_changes(base[key], value, f"{dotted}."))
        elif base.get(key) != value:
            out[dotted] = value
    return out


def setting_section(study: Study, paper: PaperSpec | None, classes: Sequence[str] | None = None) -> list[str]:
    """What was run: the base config (defaults filled in), the labels in order (from the run records),
    the variants with their display names, the seeds, the paper's setting."""
    # the base with defaults filled in; a run's own changes are listed per run below
    config: ExperimentConfig = build_dataclass(ExperimentConfig, study.base)
    part, train = config.data.partition, config.train
    lines = ["## Setting", "", study.description or "", "",
             f"- data: {config.data.dataset}, {part.kind} partition over {part.num_clients} clients "
             f"({_fmt({k: v for k, v in part.partition_params().items() if k != 'num_clients'})})",
             f"- model: {config.model.name} (initial weights: {config.model.weights or 'random'})",
             f"- schedule: rounds {train.rounds}, local epochs {train.local_epochs}, participation "
             f"{train.participation}, batch {train.batch_size}, lr {train.lr}, momentum {train.momentum}, "
             f"weight decay {train.weight_decay}, augmentation {'on' if train.augment else 'off'}, evaluation "
             f"every {train.eval_every} round(s)",
             *([f"- labels, in order (id = position): {', '.join(classes)}"] if classes else []),
             f"- seeds: {', '.join(str(s) for s in study.seeds)}; device: {config.device}", "",
             "| run | shown as | algorithm | algorithm options | other settings changed from the base |",
             "|---|---|---|---|---|"]
    for run in study.run_names():
        merged = run_config(study, run, study.seeds[0])
        other = {k: v for k, v in _changes(study.base, merged).items()
                 if k.split(".")[0] not in ("algo", "algorithm", "seed", "tracking")}
        lines.append(f"| {run} | {study.display(run)} | {merged['algorithm']} | {_fmt(merged.get('algo', {}))} "
                     f"| {_fmt(other)} |")
    lines.append("")
    if paper is not None:
        column = f", column {paper.column} ({paper.table.columns[paper.column]})" if paper.column else ""
        lines += [f"Compared with {paper.table.source}{column}. The paper's setting: {paper.table.setting}. "
                  "Differences in setting (model, rounds, scale) are the first suspects for any gap.", ""]
    return lines


def _table_body(summary_md: str) -> list[str]:
    """The summary file without its title line (the report has its own headings)."""
    lines = summary_md.rstrip("\n").splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):
        lines.pop(0)
    return lines


def figures_section(figures_dir: Path, out: Path) -> list[str]:
    index_path = figures_dir / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no figure index {index_path}: run analysis.figures first") from None
    rel = Path(os.path.relpath(figures_dir, out.parent))
    lines = ["## Figures", ""]
    for fig in index["figures"]:
        lines += [f"### {fig['name'].replace('_', ' ')}", "", f"![{fig['name']}]({(rel / fig['file']).as_posix()})",
                  "", fig["caption"], ""]
    for skip in index["skipped"]:
        lines.append(f"- not drawn: {skip['name'].replace('_', ' ')} ({skip['reason']})")
    if index["skipped"]:
        lines.append("")
    artifacts = index["artifacts"]
    if artifacts:
        kinds = list(dict.fromkeys(a["kind"] for a in artifacts))
        lines += ["## Run figures (MLflow artifacts)", "",
                  "Mask IoU heatmaps: IoU of the clients' personal masks (FedSelect paper, Figure 1); "
                  "selection heatmaps: which layers each client trained, over rounds.", "",
                  "| run | seed | " + " | ".join(k.replace("_", " ") for k in kinds) + " |",
                  "|---|---|" + "---|" * len(kinds)]
        cells: dict[tuple[str, str], dict[str, str]] = {}
        for a in artifacts:
            image = f"![{a['caption']}]({(rel / a['file']).as_posix()})"
            cells.setdefault((a["run"], a["seed"]), {})[a["kind"]] = image
        for (run, seed), by_kind in cells.items():
            lines.append(f"| {run} | {seed} | " + " | ".join(by_kind.get(k, "") for k in kinds) + " |")
        lines.append("")
    return lines


def mlflow_section(records: Sequence[Path], study: Study) -> list[str]:
    if not records:
        return []
    loaded = sorted((read_run_record(p) | {"_path": p} for p in records), key=lambda r: str(r["_path"]))
    uris = sorted({r["tracking_uri"] for r in loaded})
    lines = ["## MLflow", "", f"Experiment `{study.name}` in {', '.join(f'`{u}`' for u in uris)}; runs are tagged "
             "`study`, `run` (the variant), `algorithm`, `seed`, `dataset` and `partition`. Browse them with "
             f"`mlflow ui --backend-store-uri {uris[0]}`, or print this table with "
             f"`fedselect compare --experiment {study.name} --tracking-uri {uris[0]}`.", "",
             "| run record | MLflow run id | final acc (%) |", "|---|---|---|"]
    for r in loaded:
        lines.append(f"| {Path(r['_path']).stem} | `{r['mlflow_run_id']}` | {100 * r['final_mean_acc']:.2f} |")
    return lines + [""]


def masks_section(records: Sequence[Path]) -> list[str]:
    """Mask statistics the run records hold for mask-learning runs (FedSelect), per variant."""
    by_variant: dict[str, list[dict]] = {}
    for path in records:
        record = read_run_record(path)
        if "mask_iou_model_mean" in record:
            by_variant.setdefault(SEED_SUFFIX.sub("", Path(path).stem), []).append(record)
    if not by_variant:
        return []
    lines = ["## Personal masks", "",
             "Mean over client pairs of the IoU of their personal masks (off-diagonal mean; 1 = every client "
             "personalizes the same entries), and the clients' mean personal fraction; means over seeds.", "",
             "| run | seeds | mask IoU, whole model | mask IoU, final layer | personal fraction |",
             "|---|---|---|---|---|"]
    for variant, recs in sorted(by_variant.items()):
        iou_model = float(np.mean([r["mask_iou_model_mean"] for r in recs]))
        iou_head = float(np.mean([r.get("mask_iou_head_mean", float("nan")) for r in recs]))
        fraction = float(np.mean([np.mean(r.get("personal_fraction", [float("nan")])) for r in recs]))
        lines.append(f"| {variant} | {len(recs)} | {iou_model:.3f} | {iou_head:.3f} | {fraction:.3f} |")
    return lines + [""]


def reproduce_command(study_file: Path, name: str, results_dir: Path, overrides: Sequence[str] = ()) -> str:
    """The command that runs this study again: by name for ``configs/<name>.yaml`` into ``results/``,
    else by study file and results folder (the Snakefile's ``study_file=`` / ``results_dir=``), with
    the whole-study overrides it ran with (``set=``)."""
    repo = Path(__file__).resolve().parents[1]
    in_configs = Path(study_file).resolve() == (repo / "configs" / f"{name}.yaml").resolve()
    default_results = Path(results_dir).resolve() == (repo / "results").resolve()
    tail = f" set={shlex.quote(','.join(overrides))}" if overrides else ""
    if in_configs and default_results:
        return f"snakemake all --cores 2 --config study={name}{tail}"
    return f"snakemake all --cores 2 --config study_file={study_file} results_dir={results_dir}{tail}"


def build_report(study_file: Path, summary: Path, figures_dir: Path, out: Path,
                 records: Sequence[Path] = (), overrides: Sequence[str] = ()) -> str:
    study = load_study(study_file, overrides=overrides)
    paper = read_study_paper(study)
    lines = [f"# Study `{study.name}`", "",
             f"Reproduce: `{reproduce_command(study_file, study.name, out.parent.parent, overrides)}` "
             f"(study file `{study_file}`).", ""]
    classes = next((read_run_record(p).get("classes") for p in records), None)
    lines += setting_section(study, paper, classes)
    lines += ["## Results", ""] + _table_body(summary.read_text(encoding="utf-8")) + [""]
    lines += figures_section(figures_dir, out)
    lines += masks_section(records)
    lines += mlflow_section(records, study)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="*", type=Path, help="run record JSON files (optional)")
    parser.add_argument("--study", type=Path, required=True, help="the study YAML")
    parser.add_argument("--summary", type=Path, required=True, help="summary.md written by analysis.summarize")
    parser.add_argument("--figures", type=Path, required=True, help="folder written by analysis.figures")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a whole-study override the study ran with (the workflow's set=); repeatable")
    ns = parser.parse_args(argv)
    try:
        text = build_report(ns.study, ns.summary, ns.figures, ns.out, ns.records, ns.set)
    except (ValueError, FileNotFoundError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(ns.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
