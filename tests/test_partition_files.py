"""Issue 17: a partition file is checked when it is read, and every error names the file:
unreadable bytes, non-integer or out-of-range indices, a client count other than the config's,
a sample held twice (by one client or by two)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedselect.config import ConfigError, load_config_dict
from fedselect.runner.federation import compute_partition, default_partition_path, get_partition

NUM_CLIENTS = 4


def fake_data() -> SimpleNamespace:
    """What partitioning reads of a dataset: its name and labels (4 classes; 160 train, 80 test)."""
    return SimpleNamespace(name="cifar10", train_y=torch.arange(160) % 4, test_y=torch.arange(80) % 4)


def config(tmp_path: Path, partition_file: Path | None = None, num_clients: int = NUM_CLIENTS):
    data = {"dataset": "cifar10", "partition_file": str(partition_file) if partition_file else None,
            "partition": {"num_clients": num_clients, "classes_per_client": 2, "train_per_class": 5,
                          "test_per_class": 3}}
    return load_config_dict({"data": data, "tracking": {"results_dir": str(tmp_path / "results")}})


@pytest.fixture
def good(tmp_path) -> tuple[Path, dict]:
    path = tmp_path / "p.json"
    compute_partition(config(tmp_path), fake_data()).save(path)
    return path, json.loads(path.read_text())


def rewrite(path: Path, raw: dict, **changes) -> Path:
    path.write_text(json.dumps({**raw, **changes}))
    return path


def refused(tmp_path: Path, path: Path, match: str, num_clients: int = NUM_CLIENTS) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        get_partition(config(tmp_path, path, num_clients), fake_data())
    text = str(info.value)
    assert "data.partition_file" in text and str(path) in text, text
    return text


def test_a_good_partition_file_is_accepted(tmp_path, good):
    path, _ = good
    assert get_partition(config(tmp_path, path), fake_data()).num_clients == NUM_CLIENTS


def test_random_bytes_name_the_file(tmp_path):
    path = tmp_path / "noise.json"
    path.write_bytes(bytes(range(256)) * 4)
    refused(tmp_path, path, "not UTF-8 text")
    path.write_text("{not json")
    refused(tmp_path, path, "corrupt or not a partition file")


def test_indices_must_be_integers_in_range(tmp_path, good):
    path, raw = good
    train = [list(t) for t in raw["train_indices"]]
    train[1][0] = 1e9
    refused(tmp_path, rewrite(path, raw, train_indices=train), "not a flat list of integers")
    train[1][0] = 1_000_000_000
    refused(tmp_path, rewrite(path, raw, train_indices=train), r"client 1's train index 1000000000 is outside "
                                                               r"the train split of 'cifar10' \(0..159\)")
    train[1][0] = -1
    refused(tmp_path, rewrite(path, raw, train_indices=train), "client 1's train index -1 is outside")


def test_client_count_must_match_the_config(tmp_path, good):
    path, raw = good
    three = rewrite(path, raw, train_indices=raw["train_indices"][:3], test_indices=raw["test_indices"][:3])
    refused(tmp_path, three, r"has 3 clients, the config 4 \(data.partition.num_clients\)")


def test_clients_must_not_share_samples(tmp_path, good):
    path, raw = good
    train = [list(t) for t in raw["train_indices"]]
    refused(tmp_path, rewrite(path, raw, train_indices=[train[0], train[0], *train[2:]]),
            r"train sample \d+ is held by clients 0 and 1")
    test = [list(t) for t in raw["test_indices"]]
    test[2] = test[2] + test[2][:1]
    refused(tmp_path, rewrite(path, raw, train_indices=train, test_indices=test),
            r"test sample \d+ is held by client 2 twice")


def test_spec_and_seed_must_match(tmp_path, good):
    path, raw = good
    refused(tmp_path, rewrite(path, raw, spec={**raw["spec"], "seed": 1}), "was made for cifar10")


def test_a_corrupt_cached_partition_names_its_file(tmp_path):
    cfg = config(tmp_path)
    cached = default_partition_path(cfg)
    get_partition(cfg, fake_data())  # computed and cached
    raw = json.loads(cached.read_text())
    raw["train_indices"][0] = raw["train_indices"][1]
    cached.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"partition file {cached}: train sample .* delete it"):
        get_partition(cfg, fake_data())
