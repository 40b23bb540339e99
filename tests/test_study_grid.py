"""Studies written with grid:/zip: axes: names, display names, pairs, paper columns, overrides,
validation when the DAG is built, and the rewritten studies giving the same run configs as before."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedselect.study import StudyError, data_key, load_study, run_config, split_overrides, validate_study

from .conftest import REPO

BEFORE = json.loads((Path(__file__).parent / "data" / "study_run_configs_before_grid.json").read_text())
BASE = {"data": {"dataset": "cifar10", "partition": {"kind": "pathological", "num_clients": 2,
                                                     "classes_per_client": 2, "train_per_class": 4,
                                                     "test_per_class": 4}},
        "model": {"name": "cnn"}, "train": {"rounds": 1, "local_epochs": 1}}


def write_study(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "g", "seeds": [0], "base": BASE, **study}, sort_keys=False))
    return path


def test_grid_names_values_and_displays(tmp_path):
    path = write_study(tmp_path, {
        "labels": {"data.partition.classes_per_client": "s"},
        "grid": {"data.partition.classes_per_client": [2, 4]},
        "runs": {"fedavg": {"algorithm": "fedavg"},
                 "fedselect": {"algorithm": "fedselect", "grid": {"algo.p": [0.25, 0.5]}}}})
    study = load_study(path)
    assert study.run_names() == ["fedavg_s2", "fedselect_p0.25_s2", "fedselect_p0.5_s2",
                                 "fedavg_s4", "fedselect_p0.25_s4", "fedselect_p0.5_s4"]
    config = run_config(study, "fedselect_p0.5_s4", 0)
    assert config["algo"] == {"p": 0.5} and config["data"]["partition"]["classes_per_client"] == 4
    assert study.display("fedselect_p0.5_s4") == "FedSelect (p = 0.5, s = 4)"
    assert config["tracking"]["run_name"] == "FedSelect (p = 0.5, s = 4), seed 0"
    assert config["tracking"]["tags"]["run"] == "fedselect_p0.5_s4"
    # one partition per data setting: the runs of one s share it, the two s differ
    assert data_key(study, "fedavg_s2") == data_key(study, "fedselect_p0.5_s2") != data_key(study, "fedavg_s4")


def test_mapping_values_zip_and_name_template(tmp_path):
    path = write_study(tmp_path, {"runs": {
        "sel": {"algorithm": "layersel", "name": "{algo.strategy}_{algo.budget}",
                "grid": {"algo.budget": {"b25": 0.25, "b50": 0.5}, "algo.strategy": ["ilp", "top"]}},
        "v2": {"algorithm": "fedselect", "algo": {"mask_search": "grow"},
               "zip": {"algo.grow_every": {"e1": 1, "e3": 3}, "algo.p": [0.1, 0.2]},
               "display": "FedSelectv2 (e = {algo.grow_every})"}}})
    study = load_study(path)
    assert study.run_names() == ["ilp_b25", "top_b25", "ilp_b50", "top_b50", "v2_e1_p0.1", "v2_e3_p0.2"]
    assert run_config(study, "v2_e3_p0.2", 0)["algo"] == {"mask_search": "grow", "grow_every": 3, "p": 0.2}
    assert study.display("top_b50") == "Top (budget = 0.5)"
    assert study.display("v2_e1_p0.1") == "FedSelectv2 (e = 1)"


def test_pairs_and_paper_columns_expand_over_the_study_axes(tmp_path):
    path = write_study(tmp_path, {
        "labels": {"data.partition.classes_per_client": "s"},
        "grid": {"data.partition.classes_per_client": [2, 4]},
        "paper": {"table": "fedselect_table1", "column": "s{data.partition.classes_per_client}",
                  "runs": {"fedavg": "FedAvg"}},
        "paired": [["fedselect", "fedavg"]],
        "runs": {"fedavg": {"algorithm": "fedavg"}, "fedselect": {"algorithm": "fedselect"}}})
    study = load_study(path)
    assert study.paired == [("fedselect_s2", "fedavg_s2"), ("fedselect_s4", "fedavg_s4")]
    assert study.paper["runs"]["fedavg_s4"] == {"method": "FedAvg", "column": "s4"}
    assert study.paper["runs"]["fedselect_s2"] == {"column": "s2"}


@pytest.mark.parametrize("study, message", [
    ({"runs": {"a": {"algorithm": "fedavg", "grid": {"seed": [1, 2]}}}}, "runs.a.grid.seed"),
    ({"runs": {"a": {"algorithm": "fedavg", "zip": {"train.lr": [1, 2], "train.rounds": [1]}}}},
     "different lengths"),
    ({"runs": {"a": {"grid": {"train.lr": [0.1]}}}}, "has no 'algorithm'"),
    ({"runs": {"a": {"algorithm": "fedavg", "grid": {"device": ["cpu:0"]}}}}, "may only contain"),
    ({"runs": {"a_lr0.1": {"algorithm": "fedavg"}, "a": {"algorithm": "fedavg", "grid": {"train.lr": [0.1]}}}},
     "also made by entry"),
    ({"paired": [["a", "b"]], "runs": {"a": {"algorithm": "fedavg"}}}, "'b' is not a run"),
    ({"runs": {"a": {"algorithm": "fedavg", "name": "{algo.p}", "grid": {"train.lr": [0.1]}}}},
     "not an axis of this run"),
])
def test_malformed_axes_name_the_key(tmp_path, study, message):
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(write_study(tmp_path, study))


def test_a_typo_in_a_run_fails_validation_naming_run_and_key(tmp_path):
    path = write_study(tmp_path, {"runs": {"fedselect": {"algorithm": "fedselect", "grid": {"algo.pp": [0.5]}}}})
    with pytest.raises(StudyError, match=r"run 'fedselect_pp0.5': unknown config key 'algo.pp'"):
        validate_study(load_study(path))


def test_whole_study_overrides_apply_last(tmp_path):
    assert split_overrides("train.rounds=2, algo.x=[1, 2],data.y=z") == ["train.rounds=2", "algo.x=[1, 2]", "data.y=z"]
    path = write_study(tmp_path, {"runs": {"a": {"algorithm": "fedavg", "train": {"rounds": 5}}}})
    study = load_study(path, overrides=["train.rounds=2"])
    assert run_config(study, "a", 0)["train"]["rounds"] == 2
    with pytest.raises(StudyError, match="run 'a': unknown config key 'train.roundz'"):
        validate_study(load_study(path, overrides=["train.roundz=2"]))


def test_base_from_a_config_file(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "tracking": {"experiment": "other"}}))
    path = tmp_path / "s.yaml"
    path.write_text("study: s\nseeds: [0]\nbase: base.yaml\nruns: {a: {algorithm: fedavg}}\n")
    config = run_config(load_study(path), "a", 0)
    assert config["model"] == {"name": "cnn"} and config["tracking"]["experiment"] == "s"


def _comparable(config: dict) -> dict:
    """A run config without what the studies' naming sets (experiment, run name, display tags)."""
    config = json.loads(json.dumps(config))
    for key in ("run_name", "description", "experiment"):
        config["tracking"].pop(key, None)
    for key in ("display", "study", "run"):
        config["tracking"]["tags"].pop(key, None)
    return config


# the two CPU studies became one study with a grid over s; every other study kept its run names
RENAMED = {"fedselect_cpu_s2": ("fedselect_cpu", "_s2"), "fedselect_cpu_s4": ("fedselect_cpu", "_s4")}


@pytest.mark.parametrize("before", sorted(BEFORE))
def test_rewritten_studies_give_the_same_run_configs(before):
    name, suffix = RENAMED.get(before, (before, ""))
    study = load_study(REPO / "configs" / f"{name}.yaml")
    validate_study(study)
    runs = BEFORE[before]["runs"]
    for run, config in runs.items():
        assert _comparable(run_config(study, run + suffix, study.seeds[0])) == config, run
    if not suffix:  # same runs, same order, same pairs
        assert study.run_names() == list(runs)
        assert [list(p) for p in study.paired] == BEFORE[before]["paired"]
    else:
        assert {run + suffix for run in runs} <= set(study.run_names())
        assert [[a + suffix, b + suffix] for a, b in BEFORE[before]["paired"]] == \
            [list(p) for p in study.paired if p[0].endswith(suffix)]


def _snakemake(*config: str, timeout: int = 300) -> subprocess.CompletedProcess:
    snakemake = Path(sys.executable).with_name("snakemake")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(snakemake), "-n", "--config", *config], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.integration
def test_six_line_study_dry_runs_with_its_grid(tmp_path):
    """A study of six lines: a base config file, a grid over a data key and an algorithm option."""
    study_file = tmp_path / "six.yaml"
    study_file.write_text(f"study: six\nseeds: [0, 1]\nbase: {REPO / 'configs' / 'smoke.yaml'}\n"
                          "grid: {data.partition.classes_per_client: [1, 2]}\n"
                          "runs: {fedavg: {algorithm: fedavg},\n"
                          "       fedselect: {algorithm: fedselect, grid: {algo.p: [0.25, 0.5]}}}\n")
    assert len(study_file.read_text().splitlines()) == 6
    out = _snakemake(f"study_file={study_file}", f"results_dir={tmp_path / 'results'}")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert re.search(r"^train\s+12$", log, re.MULTILINE), log[-3000:]       # 6 runs x 2 seeds
    assert re.search(r"^partition\s+4$", log, re.MULTILINE), log[-3000:]    # 2 data settings x 2 seeds
    assert re.search(r"^data_cache\s+2$", log, re.MULTILINE), log[-3000:]
    planned = set(re.findall(r"runs/([A-Za-z0-9_.-]+)-seed0\.json", log))
    expected = {f"{r}_classes_per_client{s}" for r in ("fedavg", "fedselect_p0.25", "fedselect_p0.5")
                for s in (1, 2)}
    assert planned == expected


@pytest.mark.integration
def test_dry_run_fails_on_a_typo_naming_run_and_key(tmp_path):
    study_file = write_study(tmp_path, {"runs": {"fedavg": {"algorithm": "fedavg"},
                                                 "fedselect": {"algorithm": "fedselect", "algo": {"pp": 0.5}}}})
    out = _snakemake(f"study_file={study_file}", f"results_dir={tmp_path / 'results'}")
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "run 'fedselect': unknown config key 'algo.pp'" in log, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.integration
def test_dry_run_applies_whole_study_overrides(tmp_path):
    study_file = write_study(tmp_path, {"runs": {"fedavg": {"algorithm": "fedavg"}}})
    results = f"results_dir={tmp_path / 'results'}"
    ok = _snakemake(f"study_file={study_file}", results, "set=train.rounds=3,train.lr=0.05")
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    bad = _snakemake(f"study_file={study_file}", results, "set=train.roundz=3")
    assert bad.returncode != 0 and "run 'fedavg': unknown config key 'train.roundz'" in bad.stdout + bad.stderr
