"""Config: typed, validated, overridable; bad keys and values are named."""

from pathlib import Path

import pytest

from fedselect.config import ConfigError, apply_overrides, dump_config, load_config, load_config_dict

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_config_loads_with_defaults():
    config = load_config(ROOT / "configs" / "smoke.yaml")
    assert config.algorithm == "fedavg"
    assert config.data.partition.classes_per_client == 2
    assert config.train.weighted_aggregation is True


def test_round_trip_through_yaml():
    import yaml

    config = load_config(ROOT / "configs" / "smoke.yaml")
    again = load_config_dict(yaml.safe_load(dump_config(config)))
    assert again == config


def test_overrides_are_typed_and_nested():
    config = load_config(ROOT / "configs" / "smoke.yaml", ["train.lr=0.05", "algorithm=local", "seed=3"])
    assert config.train.lr == 0.05 and config.algorithm == "local" and config.seed == 3


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lrr=0.1", "train.lrr"),
        ("train.lr=-1", "train.lr"),
        ("train.participation=0", "train.participation"),
        ("train.rounds=abc", "train.rounds"),
        ("data.partition.kind=zipf", "data.partition.kind"),
        ("data.partition.classes_per_client=0", "data.partition.classes_per_client"),
        ("bogus=1", "bogus"),
        ("algorithm=nope", "algorithm"),
        ("algo.nonsense=1", "algo.nonsense"),
        ("train.augment=3", "train.augment"),
        ("device=tpu", "device"),
        ("data.image_size=4", "data.image_size"),
        ("train.norm_stats=global", "train.norm_stats"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs" / "smoke.yaml", [override])


def test_dirichlet_requires_alpha():
    with pytest.raises(ConfigError, match="data.partition.alpha"):
        load_config_dict({"data": {"partition": {"kind": "dirichlet", "classes_per_client": None,
                                                 "train_per_class": None, "test_per_class": None}}})


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("study_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(study_file):
    """Each study (and each of its runs) and each run config in configs/ passes validation."""
    import yaml

    from fedselect.study import load_study, run_config

    raw = yaml.safe_load(study_file.read_text())
    if "runs" not in raw:
        load_config(study_file)
        return
    study = load_study(study_file)
    for run in study.runs:
        for seed in study.seeds:
            load_config_dict(run_config(study, run, seed))


def test_study_runs_that_change_the_data_get_their_own_partitions(tmp_path):
    """Runs may vary the data; runs with one data section share its partition, others get their own."""
    from fedselect.study import StudyError, data_key, load_study

    path = tmp_path / "s.yaml"
    path.write_text("study: s\nseeds: [0]\nruns:\n  a: {algorithm: fedavg, data: {dataset: mnist}}\n"
                    "  b: {algorithm: local, data: {dataset: mnist}}\n  c: {algorithm: fedavg}\n")
    study = load_study(path)
    assert data_key(study, "a") == data_key(study, "b") != data_key(study, "c")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: bad\nseeds: [0]\nruns:\n  a: {algorithm: fedavg, dat: {dataset: mnist}}\n")
    with pytest.raises(StudyError, match="runs.a"):
        load_study(bad)
