"""Text data: review parsing, the fixed split, the token cache, load_dataset and the domain partition."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedselect.data import (
    DataNotFoundError,
    TextData,
    TokenTransform,
    load_dataset,
    load_text_dataset,
    make_partition,
)
from fedselect.data.text import read_reviews

from .conftest import shared_data_root

DOMAINS = ["books", "dvd", "electronics", "kitchen_housewares"]


def _review(text: bytes) -> bytes:
    return b"<review>\n<title>\nt\n</title>\n<review_text>\n" + text + b"\n</review_text>\n</review>\n"


def _fake_tree(root: Path, per_file: int = 10) -> Path:
    """<root>/amazon-reviews/{kitchen,books}/{positive,negative}.review, latin-1 bytes included."""
    for domain in ("kitchen", "books"):  # written unsorted: ids must follow sorted names
        folder = root / "amazon-reviews" / domain
        folder.mkdir(parents=True)
        for label in ("positive", "negative"):
            body = b"".join(_review(f"{domain} {label} review {i}".encode()) for i in range(per_file))
            (folder / f"{label}.review").write_bytes(b"<data>\n" + body + b"</data>\n")
    return root


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real data set, loaded twice through one fresh cache: (miss, hit, seconds of each)."""
    data_root = shared_data_root()
    if data_root is None or not (data_root / "amazon-reviews").is_dir():
        pytest.skip("offline amazon-reviews copy not found (set FEDSELECT_DATA_ROOT)")
    cache = tmp_path_factory.mktemp("text-cache")
    start = time.perf_counter()
    first = load_dataset("amazon_reviews", data_root, cache_dir=cache)
    miss = time.perf_counter() - start
    start = time.perf_counter()
    second = load_dataset("amazon-reviews", data_root, cache_dir=cache)
    hit = time.perf_counter() - start
    return {"first": first, "second": second, "miss": miss, "hit": hit}


def test_read_reviews_latin1_entities_and_multiline(tmp_path: Path) -> None:
    path = tmp_path / "x.review"
    path.write_bytes(_review(b"Caf\xe9 &quot;ok&quot;\n\nsecond line") + _review(b"Guzm\xef\xbf\xbdn"))
    assert read_reviews(path) == ['Café "ok"\n\nsecond line', "Guzm\ufffdn"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"<review_text>\nno end\n", "never closed"),
     (b"text\n</review_text>\n", "without an opening"),
     (b"<review_text>\n<review_text>\n", "inside the review text"),
     (b"<data>\n</data>\n", "holds no")],
)
def test_read_reviews_malformed_names_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.review"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_reviews(path)
    assert str(path) in str(info.value)


def test_fake_tree_split_domains_labels_and_cache(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path / "data")
    data = load_text_dataset("reviews", root, cache_dir=tmp_path / "cache", max_length=8)
    assert isinstance(data, TextData)
    assert data.domains == ["books", "kitchen"] and data.classes == ["negative", "positive"]
    assert data.train_x.shape == (32, 8) and data.test_x.shape == (8, 8)
    assert data.train_x.dtype == torch.int64 and data.pad_id == 0 and data.num_classes == 2
    # every 5th review of each file (positions 4 and 9) is a test review, in file order
    assert data.test_y.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert data.test_domains.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data.train_domains.tolist() == [0] * 16 + [1] * 16
    assert (data.train_x[:, 0] == 101).all() and (data.test_x != data.pad_id).sum(1).min() >= 3
    files = list((tmp_path / "cache").glob("amazon_reviews-T8-*.pt"))
    assert len(files) == 1
    again = load_dataset("amazon-reviews", root, cache_dir=tmp_path / "cache", max_length=8)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_domains, data.test_domains)
    load_text_dataset("reviews", root, cache_dir=tmp_path / "cache", max_length=16)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # max_length is part of the key


def test_domain_subset_and_errors(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path / "data")
    one = load_text_dataset("reviews", root, cache_dir=tmp_path / "cache", max_length=8, domains=["kitchen"])
    assert one.domains == ["kitchen"] and one.train_domains.unique().tolist() == [0]
    with pytest.raises(DataNotFoundError, match="'toys'"):
        load_text_dataset("reviews", root, cache_dir=tmp_path / "cache", domains=["toys"])
    (root / "amazon-reviews" / "books" / "negative.review").unlink()
    with pytest.raises(DataNotFoundError, match=r"books/negative\.review"):
        load_text_dataset("reviews", root, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="max_length"):
        load_text_dataset("reviews", root, max_length=1000)
    with pytest.raises(ValueError, match="unknown text dataset"):
        load_text_dataset("imdb", root)


def test_missing_root_names_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match="no download") as info:
        load_dataset("amazon_reviews", missing, cache_dir=tmp_path / "cache")
    assert str(missing / "amazon-reviews") in str(info.value)


def test_load_dataset_dispatches_images(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="cifar10"):
        load_dataset("cifar10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="takes no options"):
        load_dataset("cifar10", tmp_path, max_length=64)


def test_token_transform_is_identity() -> None:
    x = torch.randint(0, 100, (4, 7))
    assert TokenTransform()(x, train=True, generator=torch.Generator()) is x


def test_real_reviews_counts_and_balance(reviews: dict) -> None:
    data = reviews["first"]
    assert data.domains == DOMAINS
    assert data.train_x.shape == (6400, 128) and data.test_x.shape == (1600, 128)
    for split, y, d in (("train", data.train_y, data.train_domains), ("test", data.test_y, data.test_domains)):
        per_domain = 1600 if split == "train" else 400
        assert torch.bincount(d).tolist() == [per_domain] * 4
        for k in range(4):
            assert torch.bincount(y[d == k]).tolist() == [per_domain // 2] * 2
    # real text came through: no row is only [CLS] [SEP] padding
    assert (data.train_x != data.pad_id).sum(dim=1).min() > 2


def test_real_reviews_cache_hit(reviews: dict) -> None:
    first, second = reviews["first"], reviews["second"]
    for name in ("train_x", "train_y", "test_x", "test_y", "train_domains", "test_domains"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert (second.domains, second.pad_id, second.max_length) == (first.domains, first.pad_id, first.max_length)
    assert reviews["hit"] < reviews["miss"] / 5


def test_real_reviews_domain_partition(reviews: dict) -> None:
    data = reviews["first"]
    train_d, test_d = data.train_domains.numpy(), data.test_domains.numpy()
    part = make_partition(data.name, "domain", train_d, test_d, num_clients=8, seed=0)
    seen = []
    for k in range(8):
        domains = np.unique(np.concatenate([train_d[part.train_indices[k]], test_d[part.test_indices[k]]]))
        assert domains.tolist() == [k % 4]
        seen.append(len(part.train_indices[k]))
    assert seen == [800] * 8
