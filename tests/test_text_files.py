"""A user's own text corpus through Hugging Face datasets: CSV, JSONL, Parquet and save_to_disk
folders, labels in order, fixed and seeded test splits, a column partition, UTF-8 text, errors
that name the key; and the whole pipeline (`fedselect run`, a Snakemake study) on a CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedselect.config import ConfigError, load_config_dict
from fedselect.data import DataNotFoundError, TextFileOptions, load_text_files
from fedselect.models.text import load_minilm_tokenizer, minilm_path

from .conftest import REPO

TOPICS = ["sport", "politics", "science"]  # deliberately unsorted: default order is sorted
WORDS = {"sport": "match goal team £{i} café", "politics": "vote parliament law é{i}",
         "science": "atom cell theory 日本{i}"}


def rows(n_per_label: int = 10) -> list[dict[str, str]]:
    out = []
    for i in range(n_per_label):
        for j, topic in enumerate(TOPICS):
            out.append({"text": WORDS[topic].format(i=i), "label": topic, "domain": f"site{(i + j) % 3}"})
    return out


def write_csv(path: Path, data: list[dict[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    return path


def write_jsonl(path: Path, data: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def load(name: str, cache: Path, **options: object):
    return load_text_files(name, TextFileOptions(**options), tokenizer_folder=minilm_path(), cache_dir=cache,
                           max_length=16)


def test_csv_labels_split_and_utf8(tmp_path, cache):
    path = write_csv(tmp_path / "topics.csv", rows())
    data = load(f"csv:{path}", cache)
    assert data.classes == sorted(TOPICS)
    assert data.name == "topics" and data.num_classes == 3
    # a seeded 20 % of each label's rows in test
    assert np.bincount(data.test_y.numpy()).tolist() == [2, 2, 2]
    assert np.bincount(data.train_y.numpy()).tolist() == [8, 8, 8]
    # UTF-8 read as UTF-8: each row's ids are the tokenizer's ids of the original text
    tokenizer = load_minilm_tokenizer(minilm_path())
    ids = tokenizer(WORDS["sport"].format(i=0), max_length=16, truncation=True, padding="max_length")["input_ids"]
    everything = torch.cat([data.train_x, data.test_x]).tolist()
    assert ids in everything
    # cached: the same tensors again, and a different seed gives a different split
    again = load(f"csv:{path}", cache)
    assert torch.equal(again.train_x, data.train_x) and len(list(cache.glob("text-csv-*.pt"))) == 1
    other = load(f"csv:{path}", cache, split_seed=1)
    assert not torch.equal(other.test_x, data.test_x)


def test_jsonl_with_fixed_test_file_labels_in_given_order_and_column_domains(tmp_path, cache):
    train = write_jsonl(tmp_path / "train.jsonl", rows(6))
    test = write_jsonl(tmp_path / "test.jsonl", rows(2))
    data = load(f"jsonl:{train}", cache, test_file=str(test), labels=tuple(TOPICS), domain_column="domain")
    assert data.classes == TOPICS
    assert len(data.train_y) == 18 and len(data.test_y) == 6
    assert data.test_y.tolist() == [0, 1, 2] * 2
    assert data.domains == ["site0", "site1", "site2"]
    assert sorted(set(data.train_domains.tolist())) == [0, 1, 2]


def test_parquet_and_save_to_disk_with_class_labels(tmp_path, cache):
    import datasets

    table = rows(5)
    datasets.Dataset.from_list(table).to_parquet(str(tmp_path / "t.parquet"))
    parquet = load(f"parquet:{tmp_path / 't.parquet'}", cache)
    assert parquet.classes == sorted(TOPICS) and len(parquet.train_y) + len(parquet.test_y) == 15
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["science", "sport", "politics"]),
                                  "domain": datasets.Value("string")})
    labelled = [{**r, "label": ["science", "sport", "politics"].index(r["label"])} for r in table]
    split = datasets.DatasetDict({"train": datasets.Dataset.from_list(labelled, features=features),
                                  "test": datasets.Dataset.from_list(labelled[:3], features=features)})
    split.save_to_disk(str(tmp_path / "saved"))
    saved = load(f"disk:{tmp_path / 'saved'}", cache)
    assert saved.classes == ["science", "sport", "politics"]   # the ClassLabel's own order
    assert len(saved.test_y) == 3 and saved.test_y.tolist() == [1, 2, 0]


def test_errors_name_the_key(tmp_path, cache):
    path = write_csv(tmp_path / "t.csv", rows(3))
    with pytest.raises(ValueError, match=r"'data.text_column'.*no column 'body' \(columns: text, label, domain\)"):
        load(f"csv:{path}", cache, text_column="body")
    with pytest.raises(ValueError, match=r"'data.labels'.*label 'science', not among"):
        load(f"csv:{path}", cache, labels=("sport", "politics"))
    with pytest.raises(DataNotFoundError, match=r"'data.dataset'.*nope.csv not found"):
        load(f"csv:{tmp_path / 'nope.csv'}", cache)


@pytest.mark.parametrize("dataset, message", [
    ("csvv:x.csv", "'data.dataset' 'csvv:x.csv' is unknown: expected one of cifar10"),
    ("imagenet", "amazon_reviews"),
    ("imagenet", "'csv:<file>'"),
])
def test_unknown_dataset_is_a_config_error(dataset, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("<", "<")):
        load_config_dict({"data": {"dataset": dataset}})


def test_check_config_refuses_an_unknown_dataset(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {dataset: 'tsv:x'}\n")
    exe = Path(sys.executable).with_name("fedselect")
    out = subprocess.run([str(exe), "check-config", "--config", str(config)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("fedselect: error:") and "data.dataset" in out.stderr
    assert "Traceback" not in out.stderr


def _corpus_config(tmp_path: Path) -> dict:
    """Layer selection with a tiny BERT written to a temp folder (its own tokenizer) on a 3-label CSV."""
    from .test_models_byo import write_tiny_bert

    path = write_csv(tmp_path / "topics.csv", rows(12))
    encoder = write_tiny_bert(tmp_path / "tiny-bert")
    return {"device": "cpu", "algorithm": "layersel", "algo": {"strategy": "top", "budget": 0.5},
            "data": {"dataset": f"csv:{path}", "max_length": 16, "cache_dir": str(tmp_path / "cache"),
                     "partition": {"kind": "column", "column": "domain", "num_clients": 3}},
            "model": {"name": "hf", "path": str(encoder), "pooling": "mean"},
            "train": {"rounds": 1, "local_epochs": 1, "batch_size": 8, "lr": 0.01, "augment": False},
            "tracking": {"results_dir": str(tmp_path / "results"), "experiment": "corpus"}}


@pytest.mark.integration
def test_run_and_study_on_a_users_csv(tmp_path):
    """`fedselect run` and a Snakemake study on a 3-label UTF-8 CSV, split by a column, with a tiny Hugging
    Face encoder from a temp folder (layer selection over its layers)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_corpus_config(tmp_path), allow_unicode=True))
    exe = Path(sys.executable).with_name("fedselect")
    out = subprocess.run([str(exe), "run", "--config", str(config), "--out", str(tmp_path / "rec.json"),
                          "--no-progress"], capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "rec.json").read_text())
    assert record["dataset"].startswith("csv:") and len(record["per_client_acc"]) == 3
    assert record["partition"]["kind"] == "column" and record["partition"]["column"] == "domain"
    assert 0.0 <= record["final_mean_acc"] <= 1.0
    assert record["model"] == "hf" and record["classes"] == sorted(TOPICS)
    # a study on the same corpus as JSONL, labels in the order given, split by labels (Dirichlet)
    jsonl = write_jsonl(tmp_path / "topics.jsonl", rows(12))
    study = tmp_path / "corpus.yaml"
    base = _corpus_config(tmp_path)
    base.pop("algorithm"), base.pop("algo")
    base["data"].update(dataset=f"jsonl:{jsonl}", labels=list(TOPICS),
                        partition={"kind": "dirichlet", "alpha": 1.0, "num_clients": 3})
    study.write_text(yaml.safe_dump({"study": "corpus", "seeds": [0], "base": base,
                                     "runs": {"top": {"algorithm": "layersel", "algo": {"strategy": "top",
                                                                                         "budget": 0.5}},
                                              "local": {"algorithm": "local"}}}, allow_unicode=True))
    snakemake = Path(sys.executable).with_name("snakemake")
    run = subprocess.run([str(snakemake), "all", "--cores", "2", "--config", f"study_file={study}",
                          f"results_dir={tmp_path / 'study'}"], capture_output=True, text=True, timeout=1200,
                         env=env, cwd=REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("top", "local"):
        record = json.loads((tmp_path / "study" / "corpus" / "runs" / f"{name}-seed0.json").read_text())
        assert record["classes"] == TOPICS and record["partition"]["kind"] == "dirichlet"
        assert len(record["per_client_acc"]) == 3 and 0.0 <= record["final_mean_acc"] <= 1.0
    summary = (tmp_path / "study" / "corpus" / "summary.md").read_text()
    assert "top" in summary and "local" in summary


@pytest.mark.integration
def test_cross_silo_on_a_users_csv_matches_simulation(tmp_path):
    """serve/join carry a text corpus: the descriptor says text (no image shape or statistics), the
    server builds the tiny BERT from the config, and the federation equals the simulation bit for bit."""
    from .test_cross_silo import assert_same_run, federate, simulate

    raw = _corpus_config(tmp_path)
    raw["algo"] = {"strategy": "top", "budget": 0.5}
    raw["seed"] = 0
    raw["deploy"] = {"peer_timeout_s": 5, "join_timeout_s": 120, "heartbeat_s": 0.5}
    federated, fleet = federate(tmp_path, raw, plugins=[])
    assert federated is not None, fleet
    simulated = simulate({**raw, "tracking": {**raw["tracking"], "experiment": "corpus-sim"}})
    assert_same_run(federated, simulated)
    assert federated["dataset"].startswith("csv:") and len(federated["per_client_acc"]) == 3
