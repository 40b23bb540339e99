"""Summary table of a study from its run records (one JSON per run and seed).

    python -m analysis.summarize --title default --out-md summary.md --out-csv summary.csv results/default/runs/*.json

Per run variant: final-round and best-round mean client accuracy as mean +- std over seeds,
the spread over clients (std of per-client final accuracy, averaged over seeds), bytes sent
per client per round, and wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def run_name(path: Path, record: dict) -> str:
    return SEED_SUFFIX.sub("", path.stem) if SEED_SUFFIX.search(path.stem) else record["algorithm"]


def summarize(paths: list[Path]) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        record = json.loads(path.read_text())
        groups[run_name(path, record)].append(record)
    rows = []
    for name, records in groups.items():
        final = np.array([r["final_mean_acc"] for r in records])
        best = np.array([r["best_mean_acc"] for r in records])
        spread = np.array([np.std(r["per_client_acc"]) for r in records])
        clients = len(records[0]["per_client_acc"])
        rounds = records[0]["rounds"]
        rows.append({
            "run": name,
            "algorithm": records[0]["algorithm"],
            "seeds": len(records),
            "final_acc_mean": float(final.mean()),
            "final_acc_std": float(final.std()),
            "best_acc_mean": float(best.mean()),
            "best_acc_std": float(best.std()),
            "client_spread": float(spread.mean()),
            "bytes_up_per_client_round": float(np.mean([r["bytes_up"] for r in records])) / (clients * rounds),
            "bytes_down_per_client_round": float(np.mean([r["bytes_down"] for r in records])) / (clients * rounds),
            "wall_seconds": float(np.mean([r["wall_seconds"] for r in records])),
        })
    return sorted(rows, key=lambda row: -row["final_acc_mean"])


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "| run | algorithm | seeds | final acc (%) | best-round acc (%) | client spread (pp) "
             "| MB up / client / round | MB down / client / round | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['algorithm']} | {r['seeds']} | {100 * r['final_acc_mean']:.2f} ± "
            f"{100 * r['final_acc_std']:.2f} | {100 * r['best_acc_mean']:.2f} ± {100 * r['best_acc_std']:.2f} | "
            f"{100 * r['client_spread']:.2f} | {r['bytes_up_per_client_round'] / 1e6:.3f} | "
            f"{r['bytes_down_per_client_round'] / 1e6:.3f} | {r['wall_seconds']:.0f} |")
    lines += ["", "Accuracy: mean over clients of each client's per-sample test accuracy on its own test split; "
              "± is the std over seeds; client spread is the std over clients of the final accuracy, "
              "averaged over seeds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", type=Path, help="run record JSON files")
    parser.add_argument("--title", default="study summary")
    parser.add_argument("--out-md", type=Path, required=True)
    parser.add_argument("--out-csv", type=Path, required=True)
    ns = parser.parse_args(argv)
    rows = summarize(ns.records)
    ns.out_md.write_text(markdown(rows, ns.title))
    with ns.out_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
