"""Paper rows are matched on the options a run recorded, never on today's defaults.

Runs log every resolved option of their algorithm as ``algo.<field>`` params; runs from before
that hold only the options their config set. An option a run did not record is unknown: such a
run matches a paper row only when the row does not constrain that option, and otherwise is
reported as "options not recorded".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis import paper, summarize
from analysis.runs import variant_options
from fedselect.tracking import RunTracker, write_run_record
from fedselect.tracking.compare import RunStats

REPO = Path(__file__).resolve().parents[1]
TABLE = paper.FEDSELECT_TABLE1
# what a FedSelect run logs today (every option, defaults filled in; an excerpt), as MLflow strings
RESOLVED = {"p": "0.5", "mask_search": "gradltn", "gradltn_iterations": "5", "search_every": "1"}


def test_a_run_with_the_options_recorded_matches_its_row():
    assert paper.match_row(TABLE, "fedselect", RESOLVED).method == "FedSelect (p=0.50)"
    assert paper.unrecorded_options(TABLE, "fedselect", RESOLVED) == []
    assert paper.option_value(RESOLVED, "search_every") == 1


def test_a_run_without_an_option_is_not_matched_by_guessing_its_default():
    # today's default of mask_search is gradltn, but an old run that did not record it may have used another
    old = {"p": "0.5"}
    assert paper.option_value(old, "mask_search") is paper.NOT_RECORDED
    assert paper.match_row(TABLE, "fedselect", old) is None
    assert paper.unrecorded_options(TABLE, "fedselect", old) == ["mask_search"]
    # nothing recorded at all: every FedSelect row is undecided
    assert paper.match_row(TABLE, "fedselect", {}) is None
    assert paper.unrecorded_options(TABLE, "fedselect", {}) == ["mask_search", "p"]
    # a recorded option that contradicts a row excludes it, whatever is unknown: grow rules out the p rows
    assert paper.match_row(TABLE, "fedselect", {"mask_search": "grow"}).method.startswith("FedSelectv2")
    assert paper.unrecorded_options(TABLE, "fedselect", {"mask_search": "grow"}) == []
    # a row that constrains no option matches without any recorded
    assert paper.match_row(TABLE, "fedavg", {}).method == "FedAvg"
    assert paper.match_row(paper.LAYERSEL_TABLE1, "layersel", {"budget": "0.5"}) is None
    assert paper.unrecorded_options(paper.LAYERSEL_TABLE1, "layersel", {"budget": "0.5"}) == ["strategy"]


def test_paper_columns_say_which_options_were_not_recorded():
    spec = paper.parse_paper_spec({"table": "fedselect_table1", "column": "s2", "runs": {"named": "FedRep"}},
                                  ["new", "old", "named"])
    rows = [{"run": "new", "final_acc_mean": 0.85}, {"run": "old", "final_acc_mean": 0.85},
            {"run": "named", "final_acc_mean": 0.80}]
    paper.add_paper_columns(rows, spec, {"new": ("fedselect", RESOLVED), "old": ("fedselect", {"p": "0.5"}),
                                         "named": ("fedselect", {})})
    new, old, named = rows
    assert (new["paper_method"], new["paper_acc"]) == ("FedSelect (p=0.50) [s2]", "85.64")
    assert new["diff_vs_paper_pp"] == pytest.approx(85.0 - 85.64)
    assert (old["paper_method"], old["paper_acc"], old["diff_vs_paper_pp"]) == (
        "options not recorded: mask_search", "", None)
    # a method named under paper.runs needs no options
    assert named["paper_method"] == "FedRep [s2]"


def _stats(seed: str, options: dict[str, str], algorithm: str = "fedselect") -> RunStats:
    return RunStats(run_id=f"r{seed}", run_name=f"v-seed{seed}", group="v", algorithm=algorithm, seed=seed,
                    status="FINISHED", final_acc=0.5, best_acc=0.5, client_spread=0.0, bytes_up_per_client_round=1.0,
                    bytes_down_per_client_round=1.0, wall_seconds=1.0, compute_backward=None, tracking_uri="x",
                    params={f"algo.{k}": v for k, v in options.items()})


def test_variant_options_keep_only_what_every_run_recorded():
    # seed 0 logged before resolved options were recorded, seed 1 after: mask_search is unknown for seed 0
    both = {"v": [_stats("0", {"p": "0.5"}), _stats("1", RESOLVED)]}
    assert variant_options(both) == {"v": ("fedselect", {"p": "0.5"})}
    assert variant_options({"v": [_stats("0", RESOLVED), _stats("1", RESOLVED)]}) == {"v": ("fedselect", RESOLVED)}
    assert variant_options({"v": [_stats("0", {"p": "0.5"}), _stats("1", {"p": "0.25"})]}) == {"v": ("mixed", {})}
    assert variant_options({"v": [_stats("0", {}), _stats("1", {}, "fedavg")]}) == {"v": ("mixed", {})}


def test_paper_module_does_not_import_the_algorithms():
    code = "import sys, analysis.paper; sys.exit('torch' in sys.modules or 'fedselect.algorithms' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


def _log(uri: str, variant: str, options: dict, tmp: Path) -> Path:
    tags = {"study": "opts", "run": variant, "algorithm": "fedselect", "seed": "0"}
    params = {"algorithm": "fedselect", "seed": 0, "algo": options, "train": {"rounds": 1},
              "data": {"partition": {"num_clients": 2}}}
    with RunTracker(tracking_uri=uri, experiment="opts", run_name=f"{variant}-seed0", tags=tags) as tracker:
        tracker.log_params(params)
        tracker.log_metrics({"mean_acc": 0.86, "std_acc": 0.0, "bytes_up": 2.0, "bytes_down": 2.0}, step=0)
        tracker.log_metrics({"final_mean_acc": 0.86, "best_mean_acc": 0.86, "wall_seconds": 1.0}, step=1)
    record = {"algorithm": "fedselect", "dataset": "cifar10", "seed": 0, "rounds": 1, "final_mean_acc": 0.86,
              "best_mean_acc": 0.86, "per_client_acc": [0.86, 0.86], "bytes_up": 2.0, "bytes_down": 2.0,
              "wall_seconds": 1.0, "mlflow_run_id": tracker.run_id, "tracking_uri": uri, "algo_options": options}
    path = tmp / "runs" / f"{variant}-seed0.json"
    write_run_record(path, record)
    return path


def test_summary_matches_recorded_options_and_reports_unrecorded_ones(tmp_path):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    resolved = {"p": 0.5, "mask_search": "gradltn", "gradltn_iterations": 5, "search_every": 1}
    records = [_log(uri, "resolved", resolved, tmp_path), _log(uri, "old", {"p": 0.5}, tmp_path)]
    study = {"study": "opts", "description": "old and new runs", "seeds": [0],
             "paper": {"table": "fedselect_table1", "column": "s2"},
             "base": {"data": {"dataset": "cifar10", "partition": {"kind": "pathological", "num_clients": 2}},
                      "train": {"rounds": 1}},
             "runs": {"resolved": {"algorithm": "fedselect", "algo": resolved},
                      "old": {"algorithm": "fedselect", "algo": {"p": 0.5}}}}
    study_file = tmp_path / "opts.yaml"
    study_file.write_text(yaml.safe_dump(study))
    md = tmp_path / "summary.md"
    assert summarize.main([*map(str, records), "--study", str(study_file), "--out-md", str(md),
                           "--out-csv", str(tmp_path / "summary.csv")]) == 0
    lines = {line.split(" | ")[0][2:]: line for line in md.read_text().splitlines() if line.startswith("| ")}
    assert lines["resolved"].endswith("| FedSelect (p=0.50) [s2] | 85.64 | +0.36 |")
    assert lines["old"].endswith("| options not recorded: mask_search |  |  |")
    assert json.loads(records[0].read_text())["algo_options"] == resolved
