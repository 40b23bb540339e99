"""Summary table of a study, read from MLflow through its run records (one JSON per run and seed).

    python -m analysis.summarize --study configs/default.yaml --title default \\
        --out-md summary.md --out-csv summary.csv [--out-paired-csv summary_paired.csv] \\
        results/default/runs/*.json

Reads: the run records (for their MLflow run ids and tracking URIs), the MLflow runs (tags,
params, metrics), the study YAML (optional; its 'paper:' key adds the paper's number and our
difference, its 'paired:' key the paired differences). Instead of records,
--experiment/--tag/--run-id choose runs of a store.
Writes: the Markdown table (--out-md) and the CSV (--out-csv; accuracies as fractions, bytes);
for a study with a 'paired:' key, a "Paired differences" section in the Markdown and, with
--out-paired-csv, its CSV (differences A - B as fractions).

Per run variant: final-round and best-round mean client accuracy as mean +- std over seeds,
the spread over clients (std of per-client final accuracy, averaged over seeds), bytes sent
per client per round, wall time, training sample passes and backward compute where runs log
them. Per 'paired:' pair [A, B]: A minus B per seed (final and best round) with the mean and a
95% Student-t interval over seeds, and over (seed, client) pairs of final per-client accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.paired import paired_csv, paired_markdown, paired_results
from analysis.runs import add_selection_args, load_selection
from fedselect.files import atomic_write_text
from fedselect.tracking.tables import csv_text, markdown_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_args(parser)
    parser.add_argument("--title", default="study summary", help="heading of the Markdown table")
    parser.add_argument("--out-md", type=Path, required=True, help="Markdown table to write")
    parser.add_argument("--out-csv", type=Path, required=True, help="CSV table to write")
    parser.add_argument("--out-paired-csv", type=Path, help="CSV of the paired differences to write (the study's "
                                                            "'paired:' pairs; only a header without them)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        selection = load_selection(ns)
        pairs = selection.study.paired if selection.study is not None else []
        paired, paired_notes = paired_results(pairs, selection.groups)
    except (ValueError, FileNotFoundError) as exc:
        print(f"summarize: error: {exc}", file=sys.stderr)
        return 2
    notes = list(selection.notes)
    if selection.paper is not None:
        table = selection.paper.table
        notes.append(f"paper numbers from {table.source} (its setting: {table.setting}).")
    text = markdown_table(selection.rows, title=ns.title, notes=notes)
    section = paired_markdown(paired, paired_notes)
    if section:
        text += "\n" + "\n".join(section) + "\n"
    atomic_write_text(ns.out_md, text)
    atomic_write_text(ns.out_csv, csv_text(selection.rows))
    if ns.out_paired_csv is not None:
        atomic_write_text(ns.out_paired_csv, paired_csv(paired))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
