"""Analysis on a hand-made set of MLflow runs: tables (exact means and stds), the paper's
numbers, paired differences, figures, the report, and `fedselect compare` selecting by
experiment, tag and run id."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from analysis import figures, paper, report, summarize
from analysis.paired import CSV_FIELDS
from analysis.runs import add_selection_args, load_selection
from fedselect import cli
from fedselect.tracking import RunTracker, write_run_record
from fedselect.tracking.compare import CompareError, RunStats, compare, table_rows

ROUNDS, CLIENTS = 2, 2
# variant -> algorithm, algo options, per seed: (mean_acc per round, best, std_acc, bytes up, bytes down)
RUNS = {
    "fedavg": ("fedavg", {}, {0: ([0.20, 0.30], 0.32, 0.10, 4e6, 2e6), 1: ([0.30, 0.40], 0.44, 0.20, 4e6, 2e6)}),
    "fedselect_p0.25": ("fedselect", {"p": 0.25, "mask_search": "gradltn"},
                        {0: ([0.5, 0.80], 0.80, 0.05, 2e6, 2e6), 1: ([0.6, 0.90], 0.90, 0.15, 2e6, 2e6)}),
    "fedselect_p0.75": ("fedselect", {"p": 0.75, "mask_search": "gradltn"},
                        {0: ([0.5, 0.70], 0.70, 0.10, 1e6, 1e6), 1: ([0.6, 0.70], 0.75, 0.10, 1e6, 1e6)}),
    "layersel_top": ("layersel", {"strategy": "top"},
                     {0: ([0.4, 0.50], 0.50, 0.10, 3e6, 3e6), 1: ([0.4, 0.60], 0.60, 0.10, 3e6, 3e6)}),
}
COMPUTE = {0: [2.0, 4.0], 1: [6.0, 8.0]}  # layersel_top's compute_backward_mean per round, by seed
# train_sample_passes_mean per round, same for both seeds (fedavg: an older run that logs none)
TRAIN_PASSES = {"fedselect_p0.25": [100.0, 300.0], "fedselect_p0.75": [100.0, 300.0], "layersel_top": [50.0, 70.0]}
EVAL_PASSES = {0: 20.0, 1: 40.0}  # layersel_top's eval_sample_passes_mean, logged at the last round only
# per-client accuracy: client 0 at mean - offset, client 1 at mean + offset
CLIENT_OFFSET = {"fedavg": 0.1, "fedselect_p0.25": 0.05, "fedselect_p0.75": 0.05, "layersel_top": 0.1}
PAIRED = [["fedselect_p0.25", "fedavg"], ["fedselect_p0.75", "fedselect_p0.25"]]


def _tiny_png(path: Path) -> Path:
    import numpy as np

    from fedselect.plots import plot_iou_heatmap

    plot_iou_heatmap(np.eye(2), path, title="t")
    return path


def _log_run(uri: str, experiment: str, variant: str, seed: int, tmp: Path, *, fail: bool = False) -> dict:
    algorithm, options, per_seed = RUNS[variant]
    accs, best, spread, up, down = per_seed[seed]
    tags = {"study": experiment, "run": variant, "algorithm": algorithm, "seed": str(seed)}
    params = {"algorithm": algorithm, "seed": seed, "algo": options, "train": {"rounds": ROUNDS},
              "data": {"partition": {"num_clients": CLIENTS}}}
    offset = CLIENT_OFFSET[variant]
    tracker = RunTracker(tracking_uri=uri, experiment=experiment, run_name=f"{variant}-seed{seed}", tags=tags)
    try:
        with tracker:
            tracker.log_params(params)
            for step, acc in enumerate(accs):
                metrics = {"mean_acc": acc, "std_acc": spread, "bytes_up": up * (step + 1) / ROUNDS,
                           "bytes_down": down * (step + 1) / ROUNDS}
                metrics.update({"acc_client_0": acc - offset, "acc_client_1": acc + offset})
                if variant == "layersel_top":
                    metrics["compute_backward_mean"] = COMPUTE[seed][step]
                if variant in TRAIN_PASSES:
                    metrics["train_sample_passes_mean"] = TRAIN_PASSES[variant][step]
                if variant == "layersel_top" and step == ROUNDS - 1:
                    metrics["eval_sample_passes_mean"] = EVAL_PASSES[seed]
                tracker.log_metrics(metrics, step=step)
            if fail:
                raise RuntimeError("killed")
            tracker.log_metrics({"final_mean_acc": accs[-1], "best_mean_acc": best, "wall_seconds": 10.0 + seed},
                                step=ROUNDS)
            if algorithm == "fedselect":
                tracker.log_artifact(_tiny_png(tmp / "mask_iou_model.png"), artifact_path="masks")
            if algorithm == "layersel":
                tracker.log_artifact(_tiny_png(tmp / "selection_heatmap.png"), artifact_path="selection")
    except RuntimeError:
        assert fail
    record = {"algorithm": algorithm, "dataset": "cifar10", "seed": seed, "rounds": ROUNDS, "final_mean_acc": accs[-1],
              "best_mean_acc": best, "per_client_acc": [accs[-1] - offset, accs[-1] + offset], "bytes_up": up,
              "bytes_down": down, "wall_seconds": 10.0 + seed, "mlflow_run_id": tracker.run_id, "tracking_uri": uri}
    if algorithm == "fedselect":  # what run.log_mask_artifacts adds to the record
        record.update(mask_iou_model_mean=0.5 + 0.1 * seed, mask_iou_head_mean=0.25, personal_fraction=[0.2, 0.4])
    return record


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """study_a: four variants x two seeds (records written); study_b: fedavg seed 0 twice, plus a failed run."""
    root = tmp_path_factory.mktemp("analysis")
    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    records = []
    for variant in RUNS:
        for seed in (0, 1):
            record = _log_run(uri, "study_a", variant, seed, root)
            path = root / "runs" / f"{variant}-seed{seed}.json"
            write_run_record(path, record)
            records.append(path)
    first = _log_run(uri, "study_b", "fedavg", 0, root)["mlflow_run_id"]
    second = _log_run(uri, "study_b", "fedavg", 0, root)["mlflow_run_id"]
    failed = _log_run(uri, "study_b", "fedselect_p0.25", 1, root, fail=True)["mlflow_run_id"]
    study = {"study": "study_a", "description": "hand-made runs", "seeds": [0, 1],
             "base": {"data": {"dataset": "cifar10", "partition": {"kind": "pathological", "num_clients": CLIENTS}},
                      "train": {"rounds": ROUNDS}},
             "paper": {"table": "fedselect_table1", "column": "s2", "runs": {"layersel_top": None}},
             "paired": PAIRED,
             "runs": {v: {"algorithm": a, "algo": o} if o else {"algorithm": a} for v, (a, o, _) in RUNS.items()}}
    study_file = root / "study_a.yaml"
    study_file.write_text(yaml.safe_dump(study))
    return {"uri": uri, "root": root, "records": records, "study": study_file, "b_runs": (first, second, failed)}


def _selection(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_selection_args(parser)
    return load_selection(parser.parse_args(argv))


def _row(markdown: str, run: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {run} |"))


# ------------------------------------------------------------------------------------ tables


def test_summary_means_and_stds_over_seeds_are_exact(store, tmp_path):
    md, out_csv = tmp_path / "summary.md", tmp_path / "summary.csv"
    argv = [*map(str, store["records"]), "--study", str(store["study"]), "--title", "A", "--out-md", str(md),
            "--out-csv", str(out_csv), "--out-paired-csv", str(tmp_path / "summary_paired.csv")]
    assert summarize.main(argv) == 0
    text = md.read_text()
    # fedavg: final 0.30/0.40, best 0.32/0.44, spread 0.10/0.20, 4 MB up / (2 clients x 2 rounds)
    # columns after wall s: train passes, eval adapt passes, backward GFLOPs, paper; fedavg logs no passes
    # mean of the last evals (both rounds here): fedavg 0.25 and 0.35
    assert _row(text, "fedavg") == ("| fedavg | fedavg | 2 | 35.00 ± 5.00 | 38.00 ± 6.00 | 30.00 ± 5.00 | 15.00 "
                                    "| 1.000 | 0.500 "
                                    "| 10 |  |  |  | FedAvg [s2] | 33.54 | +1.46 |")
    assert _row(text, "fedselect_p0.25").startswith("| fedselect_p0.25 | fedselect | 2 | 85.00 ± 5.00 | 85.00 ± 5.00 "
                                                     "| 70.00 ± 5.00 ")
    assert _row(text, "fedselect_p0.25").endswith("| 200 |  |  | FedSelect (p=0.25) [s2] | 84.22 | +0.78 |")
    # eval adapt passes: mean over the rounds that log it, then over seeds: (20 + 40) / 2
    # compute: mean over rounds, then over seeds: (3 + 7) / 2; no paper row (declared null)
    assert _row(text, "layersel_top").endswith("| 10 | 60 | 30 | 5 |  |  |  |")
    assert "| best-round acc (%) | mean of last 2 evals (%) | client spread (pp) |" in text
    assert "| wall s | train sample passes / client / round | eval adapt passes / client / eval |" in text
    assert "Sample passes: one forward + backward pass of one training sample" in text
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(out_csv.read_text()))}
    assert list(rows) == ["fedselect_p0.25", "fedselect_p0.75", "layersel_top", "fedavg"]  # best final first
    fa = rows["fedavg"]
    assert float(fa["final_acc_mean"]) == pytest.approx(0.35, abs=1e-12)
    assert float(fa["final_acc_std"]) == pytest.approx(0.05, abs=1e-12)
    assert float(fa["best_acc_std"]) == pytest.approx(0.06, abs=1e-12)
    assert float(fa["last_acc_mean"]) == pytest.approx(0.30) and fa["last_evals"] == "2"
    assert float(fa["bytes_up_per_client_round"]) == pytest.approx(1e6)
    assert float(fa["wall_seconds"]) == pytest.approx(10.5)
    assert fa["compute_backward_per_client_round"] == ""
    assert fa["train_passes_per_client_round"] == "" and fa["eval_passes_per_client_eval"] == ""
    assert float(rows["layersel_top"]["compute_backward_per_client_round"]) == pytest.approx(5.0)
    assert float(rows["layersel_top"]["train_passes_per_client_round"]) == pytest.approx(60.0)
    assert float(rows["layersel_top"]["eval_passes_per_client_eval"]) == pytest.approx(30.0)
    assert rows["fedselect_p0.75"]["eval_passes_per_client_eval"] == ""
    assert float(rows["fedselect_p0.75"]["diff_vs_paper_pp"]) == pytest.approx(70.0 - 85.91)


def test_summary_pairs_runs_by_seed_and_client(store, tmp_path):
    md, paired_csv = tmp_path / "summary.md", tmp_path / "summary_paired.csv"
    outs = ["--out-md", str(md), "--out-csv", str(tmp_path / "summary.csv"), "--out-paired-csv", str(paired_csv)]
    assert summarize.main([*map(str, store["records"]), "--study", str(store["study"]), *outs]) == 0
    section = md.read_text().split("## Paired differences\n", 1)[1]
    assert "treating clients as independent, hence optimistic" in section
    # p0.75 - p0.25: final -0.10, -0.20 per seed; t(0.975, 1) = 12.706, se = 0.05; best -0.10, -0.15;
    # clients (offsets cancel): -0.10, -0.10, -0.20, -0.20, t(0.975, 3) = 3.182, se = 0.0289
    # last evals (mean of both rounds): -0.05, -0.10
    assert _row(section, "fedselect_p0.75") == ("| fedselect_p0.75 | fedselect_p0.25 | 2 | -15.00 [-78.53, +48.53] "
                                                "| 0/2 | -7.50 [-39.27, +24.27] | 0/2 | -12.50 [-44.27, +19.27] "
                                                "| -15.00 [-24.19, -5.81] | 0/4 |")
    # p0.25 - fedavg: +0.50 on both seeds (no spread); clients 0.75 - 0.20, 0.85 - 0.40, ...
    assert _row(section, "fedselect_p0.25") == ("| fedselect_p0.25 | fedavg | 2 | +50.00 [+50.00, +50.00] | 2/2 "
                                                "| +40.00 [+40.00, +40.00] | 2/2 | +47.00 [+34.29, +59.71] "
                                                "| +50.00 [+40.81, +59.19] | 4/4 |")
    rows = list(csv.DictReader(io.StringIO(paired_csv.read_text())))
    assert [(r["a"], r["b"], r["seeds"], r["client_pairs"]) for r in rows] == [
        ("fedselect_p0.25", "fedavg", "2", "4"), ("fedselect_p0.75", "fedselect_p0.25", "2", "4")]
    assert float(rows[1]["final_diff_mean"]) == pytest.approx(-0.15)
    assert float(rows[1]["last_diff_mean"]) == pytest.approx(-0.075)
    assert float(rows[1]["final_diff_ci_low"]) == pytest.approx(-0.15 - 12.7062047 * 0.05)
    assert float(rows[1]["client_diff_ci_high"]) == pytest.approx(-0.15 + 3.1824463 * 0.05 / 3 ** 0.5)
    assert rows[0]["final_a_wins"] == "2" and rows[0]["client_a_wins"] == "4" and rows[0]["client_ties"] == "0"
    # without a study (no 'paired:' key) there is no section, and the CSV is a bare header
    assert summarize.main([*map(str, store["records"]), *outs]) == 0
    assert "Paired differences" not in md.read_text()
    assert paired_csv.read_text().splitlines() == [",".join(CSV_FIELDS)]


def test_variant_with_passes_logged_by_some_runs_only_is_an_error():
    def stats(seed: str, passes: float | None) -> RunStats:
        return RunStats(run_id=f"r{seed}", run_name="x", group="v", algorithm="fedavg", seed=seed, status="FINISHED",
                        final_acc=0.5, best_acc=0.5, client_spread=0.0, bytes_up_per_client_round=1.0,
                        bytes_down_per_client_round=1.0, wall_seconds=1.0, compute_backward=None, tracking_uri="x",
                        train_passes=passes)

    assert table_rows({"v": [stats("0", 10.0), stats("1", 30.0)]})[0]["train_passes_per_client_round"] == 20.0
    assert table_rows({"v": [stats("0", None), stats("1", None)]})[0]["train_passes_per_client_round"] is None
    with pytest.raises(CompareError, match="variant v: only 1 of 2 runs log train_sample_passes_mean"):
        table_rows({"v": [stats("0", 10.0), stats("1", None)]})


def test_paper_matching_and_spec_errors():
    table = paper.FEDSELECT_TABLE1
    assert paper.match_row(table, "fedselect", {"p": "0.5", "mask_search": "gradltn"}).method == "FedSelect (p=0.50)"
    assert paper.match_row(table, "fedselect", {"p": "0.5", "mask_search": "grow"}).method.startswith("FedSelectv2")
    assert paper.match_row(table, "local", {}) is None
    assert paper.match_row(paper.LAYERSEL_TABLE1, "layersel", {"strategy": "top"}).values["budget_2"] == 93.61
    assert paper.difference_pp(0.877, (87.46, 87.99)) == 0.0
    assert paper.difference_pp(0.80, (87.46, 87.99)) == pytest.approx(80 - 87.46)
    with pytest.raises(paper.PaperSpecError, match="paper.table"):
        paper.parse_paper_spec({"table": "nope"}, ["a"])
    with pytest.raises(paper.PaperSpecError, match="paper.column"):
        paper.parse_paper_spec({"table": "fedselect_table1", "column": "s3"}, ["a"])
    with pytest.raises(paper.PaperSpecError, match="paper.runs.b"):
        paper.parse_paper_spec({"table": "fedselect_table1", "runs": {"b": "FedAvg"}}, ["a"])
    with pytest.raises(paper.PaperSpecError, match="no method 'FedX'"):
        paper.parse_paper_spec({"table": "fedselect_table1", "runs": {"a": "FedX"}}, ["a"])
    spec = paper.parse_paper_spec({"table": "layersel_table1", "column": "budget_1",
                                   "runs": {"a": {"column": "budget_2"}, "b": "Top"}}, ["a", "b"])
    assert paper.paper_entry(spec, "a", "layersel", {"strategy": "rgn"})[0].method == "RGN"
    assert paper.paper_entry(spec, "a", "layersel", {"strategy": "rgn"})[1] == "budget_2"
    assert paper.paper_entry(spec, "b", "layersel", {"strategy": "snr"})[0].method == "Top"


# ----------------------------------------------------------------------------------- figures


def test_figures_and_report_are_written_from_the_store(store, tmp_path):
    selection = _selection([*map(str, store["records"]), "--study", str(store["study"])])
    out = tmp_path / "figures"
    index = figures.make_figures(selection, out)
    names = {f["name"] for f in index["figures"]}
    assert names == {"learning_curves", "accuracy_vs_p", "accuracy_vs_bytes", "accuracy_vs_compute"}
    for fig in index["figures"]:
        assert (out / fig["file"]).stat().st_size > 1000, fig
    kinds = sorted((a["run"], a["seed"], a["kind"]) for a in index["artifacts"])
    assert kinds == sorted([(v, s, "mask_iou_model") for v in ("fedselect_p0.25", "fedselect_p0.75") for s in "01"]
                           + [("layersel_top", s, "selection_heatmap") for s in "01"])
    assert all((out / a["file"]).stat().st_size > 0 for a in index["artifacts"])
    curves = figures.mean_curves({"fedavg": selection.groups["fedavg"]})
    rounds, mean, std = curves["fedavg"]
    assert list(rounds) == [1, 2] and mean == pytest.approx([0.25, 0.35]) and std == pytest.approx([0.05, 0.05])

    md = tmp_path / "summary.md"
    assert summarize.main([*map(str, store["records"]), "--study", str(store["study"]), "--out-md", str(md),
                           "--out-csv", str(tmp_path / "s.csv")]) == 0
    report_path = tmp_path / "report.md"
    assert report.main([*map(str, store["records"]), "--study", str(store["study"]), "--summary", str(md),
                        "--figures", str(out), "--out", str(report_path)]) == 0
    text = report_path.read_text()
    assert "## Setting" in text and "pathological partition over 2 clients" in text
    assert "FedSelect (arXiv 2306.13264), Table 1, column s2" in text
    assert "| fedavg | fedavg | 2 | 35.00 ± 5.00" in text
    assert "![learning_curves](figures/learning_curves.png)" in text
    assert "figures/artifacts/fedselect_p0.25-seed0-mask_iou_model.png" in text
    assert "`fedselect compare --experiment study_a" in text
    assert "| fedselect_p0.25 | 2 | 0.550 | 0.250 | 0.300 |" in text  # mask IoU and personal fraction, seed means
    # the summary's paired differences: a section of their own after the results, with what the interval means
    paired_at = text.index("## Paired differences")
    assert text.index("## Results") < paired_at < text.index("## Figures")
    assert "95% Student-t interval" in text[paired_at:] and "| fedselect_p0.75 | fedselect_p0.25 | 2 |" in text
    with pytest.raises(paper.PaperSpecError, match="paper.column' is missing"):
        paper.parse_paper_spec({"table": "fedselect_table1"}, ["a"])


def test_figures_without_p_sweep_or_compute_are_skipped_with_reasons(store, tmp_path):
    selection = _selection(["--tracking-uri", store["uri"], "--experiment", "study_a", "--tag", "run=fedavg"])
    index = figures.make_figures(selection, tmp_path)
    skipped = {s["name"]: s["reason"] for s in index["skipped"]}
    assert "2 or more personalization rates" in skipped["accuracy_vs_p"]
    assert skipped["accuracy_vs_compute"] == "no run logs compute_backward_mean"
    assert not (tmp_path / "accuracy_vs_p.png").exists() and (tmp_path / "learning_curves.png").stat().st_size > 0


# ----------------------------------------------------------------------------------- compare


def test_compare_selects_by_experiment_tag_and_run_id(store):
    uri = store["uri"]
    by_experiment = compare(uri, experiment="study_a")
    names = [line.split(" | ")[0][2:] for line in by_experiment.splitlines() if line.startswith("| ")]
    assert names == ["run", "fedselect_p0.25", "fedselect_p0.75", "layersel_top", "fedavg"]
    by_tag = compare(uri, tags={"algorithm": "fedselect", "study": "study_a"}, fmt="csv")
    assert [r["run"] for r in csv.DictReader(io.StringIO(by_tag))] == ["fedselect_p0.25", "fedselect_p0.75"]
    rec = [json.loads(p.read_text()) for p in store["records"][:2]]  # fedavg seeds 0 and 1
    by_id = list(csv.DictReader(io.StringIO(compare(uri, run_ids=[r["mlflow_run_id"] for r in rec], fmt="csv"))))
    assert [(r["run"], r["seeds"]) for r in by_id] == [("fedavg", "2")]
    assert float(by_id[0]["final_acc_mean"]) == pytest.approx(0.35)
    by_algorithm = compare(uri, experiment="study_a", group_by=["algorithm"], fmt="csv")
    assert {r["run"]: r["seeds"] for r in csv.DictReader(io.StringIO(by_algorithm))} == {
        "fedselect": "4", "layersel": "2", "fedavg": "2"}
    # a repeated config keeps the later run, and says so; the failed run is left out unless asked for
    first, second, failed = store["b_runs"]
    text = compare(uri, experiment="study_b")
    assert f"kept the later, {second}" in text and "fedselect_p0.25" not in text
    everything = compare(uri, experiment="study_b", any_status=True, group_by=["run", "seed"], fmt="csv")
    assert [r["run"] for r in csv.DictReader(io.StringIO(everything))] == ["fedselect_p0.25/1", "fedavg/0"]
    # runs of two experiments: variants are prefixed with their study
    both = compare(uri, tags={"run": "fedavg"}, fmt="csv")
    assert sorted(r["run"] for r in csv.DictReader(io.StringIO(both))) == ["study_a/fedavg", "study_b/fedavg"]


def test_compare_command_and_its_errors(store, tmp_path, capsys):
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--experiment", "study_a", "--tag",
                     "run=fedavg", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run,algorithm,seeds,final_acc_mean")
    missing = f"sqlite:///{(tmp_path / 'none.db').as_posix()}"
    assert cli.main(["compare", "--tracking-uri", missing, "--experiment", "x"]) == 2
    assert "no MLflow sqlite store" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--tag", "run=nothing"]) == 2
    assert "no MLflow runs with status FINISHED match tags={'run': 'nothing'}" in capsys.readouterr().err
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--run-id", "0" * 32]) == 2
    assert "0" * 32 in capsys.readouterr().err
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--tag", "oops"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(CompareError, match="none of the 8 runs has a tag or param 'nope'"):
        compare(store["uri"], experiment="study_a", group_by=["nope"])
    # the analysis scripts: nothing chosen, or a record pointing at a missing store
    assert summarize.main(["--out-md", str(tmp_path / "a.md"), "--out-csv", str(tmp_path / "a.csv")]) == 2
    assert "no runs chosen" in capsys.readouterr().err
    record = json.loads(store["records"][0].read_text()) | {"tracking_uri": missing}
    write_run_record(tmp_path / "r.json", record)
    assert figures.main([str(tmp_path / "r.json"), "--out-dir", str(tmp_path / "f")]) == 2
    assert "no MLflow sqlite store" in capsys.readouterr().err


@pytest.mark.parametrize("module", [summarize, figures, report])
def test_scripts_help_says_what_they_read_and_write(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    out = capsys.readouterr().out
    assert "Reads:" in out and "Writes" in out


def test_compare_help_says_what_it_reads_and_writes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "Reads:" in out and "Writes:" in out and "--experiment" in out


def test_reproduce_command_names_a_study_outside_configs_by_its_file(tmp_path):
    from analysis.report import reproduce_command

    repo = Path(__file__).resolve().parents[1]
    assert reproduce_command(repo / "configs" / "default.yaml", "default", repo / "results") == \
        "snakemake all --cores 2 --config study=default"
    mine = tmp_path / "mine.yaml"
    assert reproduce_command(mine, "mine", tmp_path / "out") == \
        f"snakemake all --cores 2 --config study_file={mine} results_dir={tmp_path / 'out'}"
    # a study of configs/ written into another results folder needs that folder too
    assert "results_dir=" in reproduce_command(repo / "configs" / "default.yaml", "default", tmp_path)
    assert reproduce_command(repo / "configs" / "default.yaml", "default", repo / "results",
                             ["train.rounds=2", "algo.x=[1, 2]"]) == \
        "snakemake all --cores 2 --config study=default set='train.rounds=2,algo.x=[1, 2]'"


def test_one_seed_prints_n_1_not_a_zero_spread():
    from fedselect.tracking.tables import markdown_table

    row = {"run": "fedavg", "algorithm": "fedavg", "seeds": 1, "final_acc_mean": 0.5, "final_acc_std": 0.0,
           "best_acc_mean": 0.6, "best_acc_std": 0.0, "client_spread": 0.1, "bytes_up_per_client_round": 1e6,
           "bytes_down_per_client_round": 1e6, "wall_seconds": 3.0}
    one = markdown_table([row])
    assert "50.00 (n = 1)" in one and "± 0.00" not in one
    assert "50.00 ± 1.00" in markdown_table([{**row, "seeds": 2, "final_acc_std": 0.01}])


def test_a_method_keeps_its_colour_and_marker_across_figures(tmp_path):
    import numpy as np

    styles = figures.method_styles(["fedselect_p0.5", "fedavg", "local"])
    assert styles == figures.method_styles(["local", "fedavg", "fedselect_p0.5", "fedavg"])
    assert len({s for s in styles.values()}) == 3
    curves = {"fedavg": (np.array([1, 2]), np.array([0.2, 0.3]), np.zeros(2))}  # one seed: no band
    figures.plot_learning_curves(curves, tmp_path / "lc.png", styles)
    assert (tmp_path / "lc.png").stat().st_size > 0 and (tmp_path / "lc.pdf").stat().st_size > 0
