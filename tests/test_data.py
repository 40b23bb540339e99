"""Tests of fedselect.data: image loading and caching, partitions, summaries and plots.

The loader tests write tiny ImageFolder trees with PIL into tmp_path; partition tests use
synthetic label arrays. Only ``test_real_cifar10`` touches real data, and skips without it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedselect.data import (
    DataCacheError,
    DataNotFoundError,
    Partition,
    default_cache_dir,
    dirichlet_partition,
    domain_partition,
    load_image_dataset,
    make_partition,
    partition_key,
    partition_summary,
    pathological_partition,
    plot_partition,
    resolve_data_root,
    sources,
)
from fedselect.data import torchvision_source as tvs

# deliberately not in alphabetical order: labels must follow the sorted folder names
CLASSES = ["zebra", "ant", "cat"]
SIZE = 6


def _pixel(label: int, index: int, split: int) -> tuple[int, int, int]:
    """A colour that encodes (label, index, split), so decoding order can be checked exactly."""
    return (label * 40 + split, index * 3, 200 - label)


def make_tree(
    folder: Path, classes: Sequence[str] = CLASSES, n_train: int = 4, n_test: int = 2, mode: str = "RGB"
) -> Path:
    """Write ``folder/{train,test}/<class>/<i>.png`` with solid colours given by :func:`_pixel`."""
    for split_id, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        for cls in classes:
            label = sorted(classes).index(cls)
            d = folder / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = _pixel(label, i, split_id)
                value = colour if mode == "RGB" else colour[0]
                Image.new(mode, (SIZE, SIZE), value).save(d / f"img_{i:03d}.png")
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# ---------------------------------------------------------------- sources


def test_imagefolder_decode_shapes_labels_and_order(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_tree(tmp_path / "mydata")
    data = load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)

    assert data.classes == ["ant", "cat", "zebra"]
    assert data.name == "mydata"
    assert data.source == f"imagefolder:{folder.resolve()}"
    assert data.train_x.shape == (12, 3, SIZE, SIZE) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (6, 3, SIZE, SIZE)
    assert data.train_y.dtype == torch.int64
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_y.tolist() == [0] * 2 + [1] * 2 + [2] * 2
    assert (data.num_classes, data.in_channels) == (3, 3)
    assert (data.image_size, data.image_shape) == (SIZE, (SIZE, SIZE))
    # every pixel decoded exactly, in ImageFolder order (class, then file name)
    for split_id, (x, y) in enumerate(((data.train_x, data.train_y), (data.test_x, data.test_y))):
        per_class = len(y) // 3
        for n in range(len(y)):
            expected = torch.tensor(_pixel(int(y[n]), n % per_class, split_id), dtype=torch.uint8)
            assert torch.equal(x[n, :, 0, 0], expected)
            assert torch.equal(x[n], expected.view(3, 1, 1).expand(3, SIZE, SIZE))
    expected_mean = data.train_x.double().div(255).mean(dim=(0, 2, 3))
    expected_std = data.train_x.double().div(255).std(dim=(0, 2, 3), unbiased=False)
    assert np.allclose(data.mean, expected_mean.numpy(), atol=1e-9)
    assert np.allclose(data.std, expected_std.numpy(), atol=1e-9)


def test_named_dataset_found_as_imagefolder_under_root(tmp_path: Path, cache_dir: Path) -> None:
    make_tree(tmp_path / "root" / "cifar10")
    data = load_image_dataset("CIFAR10", tmp_path / "root", cache_dir=cache_dir, download=False)
    assert data.name == "cifar10"
    assert len(data.train_y) == 12 and data.classes == ["ant", "cat", "zebra"]


def test_root_from_environment(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "envroot" / "mnist", mode="L")
    monkeypatch.setenv("FEDSELECT_DATA_ROOT", str(tmp_path / "envroot"))
    data = load_image_dataset("mnist", cache_dir=cache_dir, download=False)
    # grayscale files give one channel
    assert data.train_x.shape == (12, 1, SIZE, SIZE)
    assert data.in_channels == 1 and len(data.mean) == 1
    assert data.train_x[4, 0, 0, 0] == _pixel(1, 0, 0)[0]


def test_resolve_data_root_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSELECT_DATA_ROOT", raising=False)
    monkeypatch.delenv("FEDSELECT_CACHE_DIR", raising=False)
    assert resolve_data_root(None) == Path("data")
    assert resolve_data_root("rel/dir") == Path("rel/dir")
    monkeypatch.setenv("FEDSELECT_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root("explicit") == Path("explicit")
    assert default_cache_dir() == Path.home() / ".cache" / "fedselect"
    monkeypatch.setenv("FEDSELECT_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"


def test_decode_images_pool_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_tree(tmp_path / "d", n_train=7, n_test=1)
    paths = sorted(str(p) for p in (folder / "train").rglob("*.png"))
    serial = sources.decode_images(paths, workers=1)
    # force the worker-pool path on a small list
    monkeypatch.setattr(sources, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(sources, "_CHUNK_FILES", 4)
    pooled = sources.decode_images(paths, workers=2)
    assert pooled.shape == (21, SIZE, SIZE, 3)
    assert np.array_equal(serial, pooled)


def test_mixed_sizes_rejected(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_tree(tmp_path / "d")
    Image.new("RGB", (SIZE + 1, SIZE)).save(folder / "train" / "ant" / "odd.png")
    with pytest.raises(ValueError, match="odd.png"):
        load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)


def test_cache_hit_skips_decoding(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_tree(tmp_path / "d")
    first = load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)
    files = list(cache_dir.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("d-")
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]

    def no_decode(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(sources, "decode_images", no_decode)
    second = load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert (second.classes, second.mean, second.std, second.source, second.name) == (
        first.classes, first.mean, first.std, first.source, first.name)


def test_cache_invalidated_when_a_file_is_added(tmp_path: Path, cache_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_tree(tmp_path / "d")
    load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)
    Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(folder / "train" / "cat" / "img_999.png")
    calls = []
    real = sources.decode_images

    def counting(paths: Sequence[str], **kwargs: int) -> np.ndarray:
        calls.append(len(paths))
        return real(paths, **kwargs)

    monkeypatch.setattr(sources, "decode_images", counting)
    data = load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)
    assert calls == [19]
    assert len(data.train_y) == 13 and int((data.train_y == 1).sum()) == 5
    assert len(list(cache_dir.glob("*.pt"))) == 2


def test_corrupt_cache_gives_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_tree(tmp_path / "d")
    load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.pt")
    cache_file.write_bytes(b"not a torch file")
    with pytest.raises(DataCacheError, match=str(cache_file)):
        load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)
    # a loadable file with the wrong contents is as bad as an unreadable one
    torch.save({"format": 1, "train_x": torch.zeros(2)}, cache_file)
    with pytest.raises(DataCacheError, match=str(cache_file)):
        load_image_dataset(f"imagefolder:{folder}", cache_dir=cache_dir)


def test_missing_data_without_download(tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "empty-root"
    root.mkdir()
    with pytest.raises(DataNotFoundError) as err:
        load_image_dataset("mnist", root, download=False, cache_dir=cache_dir)
    message = str(err.value)
    assert str(root) in message
    assert "FEDSELECT_DATA_ROOT" in message and "network" in message
    assert "mnist/train/<class>" in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_data_offline_download_does_not_hang(tmp_path: Path, cache_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    checked = []

    def offline(hosts: Sequence[tuple[str, int]], timeout: float = 3.0) -> bool:
        checked.append(list(hosts))
        return False

    monkeypatch.setattr(tvs, "network_available", offline)
    with pytest.raises(DataNotFoundError, match="no network"):
        load_image_dataset("cifar10", tmp_path, download=True, cache_dir=cache_dir)
    assert checked and checked[0][0][1] in (80, 443)


class _FakeTorchvision:
    """Stands in for a torchvision dataset class: files 'exist' only after a download."""

    url = "https://example.invalid/data.tar.gz"
    downloaded = False
    fail_download = False
    layout = "cifar"

    def __init__(self, root: str, train: bool, download: bool) -> None:
        cls = type(self)
        if download:
            if cls.fail_download:
                raise OSError("HTTP Error 503")
            cls.downloaded = True
        if not cls.downloaded:
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        n = 5 if train else 3
        if cls.layout == "cifar":  # numpy N x H x W x C, list of targets
            self.data = np.full((n, 4, 4, 3), 7 if train else 9, dtype=np.uint8)
            self.targets = [i % 2 for i in range(n)]
        else:  # MNIST-style: tensor N x H x W, tensor of targets
            self.data = torch.full((n, 4, 4), 7, dtype=torch.uint8)
            self.targets = torch.arange(n) % 2
        self.classes = ["a", "b"]


@pytest.mark.parametrize("layout", ["cifar", "mnist"])
def test_torchvision_source_download(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                     layout: str) -> None:
    fake = type("Fake", (_FakeTorchvision,), {"layout": layout})
    monkeypatch.setattr(tvs, "torchvision_class", lambda name: fake)
    monkeypatch.setattr(tvs, "network_available", lambda hosts, timeout=3.0: True)
    data = load_image_dataset("cifar10", tmp_path, download=True, cache_dir=cache_dir)
    assert fake.downloaded and data.source == "torchvision:CIFAR10"
    channels = 3 if layout == "cifar" else 1
    assert data.train_x.shape == (5, channels, 4, 4) and data.test_x.shape == (3, channels, 4, 4)
    assert data.train_y.dtype == torch.int64 and data.train_y.tolist() == [0, 1, 0, 1, 0]
    assert data.classes == ["a", "b"]
    assert data.mean == pytest.approx((7 / 255,) * channels) and data.std == pytest.approx((0.0,) * channels)


def test_torchvision_download_failure(tmp_path: Path, cache_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake = type("Fake", (_FakeTorchvision,), {"fail_download": True})
    monkeypatch.setattr(tvs, "torchvision_class", lambda name: fake)
    monkeypatch.setattr(tvs, "network_available", lambda hosts, timeout=3.0: True)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataNotFoundError, match="download failed: HTTP Error 503"):
        load_image_dataset("cifar10", tmp_path, download=True, cache_dir=cache_dir)
    assert socket.getdefaulttimeout() == before


def test_missing_imagefolder_and_unknown_name(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match="nowhere"):
        load_image_dataset(f"imagefolder:{tmp_path / 'nowhere'}", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="imagenet"):
        load_image_dataset("imagenet", tmp_path, cache_dir=cache_dir)


def _idx_gz(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: magic, dims), gzip'd as torchvision's download leaves it."""
    import gzip
    import struct

    magic = 0x08 << 8 | array.ndim  # type 0x08: unsigned bytes
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_its_raw_gz_files_offline(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only torchvision's downloaded .gz files under <root>/MNIST/raw: read offline by name, extracted once
    into the cache (the data folder is left as it was), with download=True never probing the network."""
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    _idx_gz(raw / "train-images-idx3-ubyte.gz", train_x)
    _idx_gz(raw / "train-labels-idx1-ubyte.gz", np.arange(6) % 10)
    _idx_gz(raw / "t10k-images-idx3-ubyte.gz", test_x)
    _idx_gz(raw / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1]))
    before = sorted(p.name for p in raw.iterdir())

    def no_network(*_args: object, **_kwargs: object) -> bool:
        raise AssertionError("the network was probed although the archives are here")

    monkeypatch.setattr(tvs, "network_available", no_network)
    for download in (False, True):
        data = load_image_dataset("mnist", tmp_path, download=download, cache_dir=cache_dir)
        assert data.train_x.shape == (6, 1, 28, 28) and data.test_y.tolist() == [3, 1, 4, 1]
        assert torch.equal(data.train_x[:, 0], torch.as_tensor(train_x, dtype=torch.uint8))
    assert sorted(p.name for p in raw.iterdir()) == before
    assert list((cache_dir / "torchvision").glob("MNIST-*/MNIST/raw/train-images-idx3-ubyte"))


# ---------------------------------------------------------------- partitions


def synthetic_labels(num_classes: int = 10, train_per: int = 100, test_per: int = 30,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = rng.permutation(np.repeat(np.arange(num_classes), train_per))
    test = rng.permutation(np.repeat(np.arange(num_classes), test_per))
    return train, test


def assert_disjoint(index_lists: Sequence[np.ndarray]) -> None:
    joined = np.concatenate(index_lists)
    assert len(np.unique(joined)) == len(joined), "a sample is given to two clients"


def assert_same(a: Partition, b: Partition) -> None:
    assert a.spec == b.spec and a.kind == b.kind and a.num_classes == b.num_classes
    assert all(np.array_equal(x, y) for x, y in zip(a.train_indices, b.train_indices, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.test_indices, b.test_indices, strict=True))


def test_pathological_partition() -> None:
    train, test = synthetic_labels()
    p = pathological_partition(train, test, num_clients=20, classes_per_client=3, train_per_class=5,
                               test_per_class=2, seed=1)
    assert p.num_clients == 20 and p.kind == "pathological" and p.num_classes == 10
    assert p.spec["seed"] == 1 and p.spec["classes_per_client"] == 3
    usage = np.zeros(10, dtype=int)
    for tr_idx, te_idx in zip(p.train_indices, p.test_indices, strict=True):
        tr_classes, tr_counts = np.unique(train[tr_idx], return_counts=True)
        te_classes, te_counts = np.unique(test[te_idx], return_counts=True)
        assert len(tr_classes) == 3 and (tr_counts == 5).all()
        assert np.array_equal(tr_classes, te_classes) and (te_counts == 2).all()
        usage[tr_classes] += 1
    # 60 class slots over 10 classes: each class serves exactly 6 clients
    assert (usage == 6).all()
    assert_disjoint(p.train_indices)
    assert_disjoint(p.test_indices)
    # varied combinations, not the same few class sets repeated
    assert len({tuple(np.unique(train[i])) for i in p.train_indices}) > 5

    again = pathological_partition(train, test, num_clients=20, classes_per_client=3, train_per_class=5,
                                   test_per_class=2, seed=1)
    assert_same(p, again)
    other = pathological_partition(train, test, num_clients=20, classes_per_client=3, train_per_class=5,
                                   test_per_class=2, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(p.train_indices, other.train_indices, strict=True))


def test_pathological_balance_when_uneven() -> None:
    train, test = synthetic_labels()
    p = pathological_partition(train, test, num_clients=7, classes_per_client=4, train_per_class=3,
                               test_per_class=1, seed=0)
    usage = np.bincount(np.concatenate([np.unique(train[i]) for i in p.train_indices]), minlength=10)
    assert usage.sum() == 28 and usage.max() - usage.min() <= 1


def test_pathological_not_enough_samples() -> None:
    train, test = synthetic_labels(train_per=10)
    with pytest.raises(ValueError, match=r"class \d+.*need 12.*has 10"):
        pathological_partition(train, test, num_clients=20, classes_per_client=3, train_per_class=2,
                               test_per_class=1, seed=0)
    with pytest.raises(ValueError, match="test_per_class"):
        pathological_partition(train, test, num_clients=10, classes_per_client=1, train_per_class=1,
                               test_per_class=31, seed=0)


def _patho(**overrides: float) -> dict:
    return {"num_clients": 2, "classes_per_client": 2, "train_per_class": 1, "test_per_class": 1, **overrides}


@pytest.mark.parametrize(
    ("kind", "params", "name"),
    [
        ("pathological", _patho(num_clients=0), "num_clients"),
        ("pathological", _patho(num_clients=2.5), "num_clients"),
        ("pathological", _patho(classes_per_client=0), "classes_per_client"),
        ("pathological", _patho(classes_per_client=11), "classes_per_client"),
        ("pathological", _patho(train_per_class=0), "train_per_class"),
        ("pathological", _patho(test_per_class=0), "test_per_class"),
        ("pathological", _patho(alpha=0.1), "alpha"),
        ("dirichlet", {"num_clients": 4, "alpha": 0}, "alpha"),
        ("dirichlet", {"num_clients": 4, "alpha": -1.0}, "alpha"),
        ("dirichlet", {"num_clients": 4, "alpha": 0.5, "min_train_per_client": 1000}, "min_train_per_client"),
        ("dirichlet", {"num_clients": 4, "alpha": 0.5, "test_per_client": 0}, "test_per_client"),
        ("dirichlet", {"num_clients": 4, "alpha": 0.5, "test_per_client": 10_000}, "test_per_client"),
        ("domain", {"num_clients": 0}, "num_clients"),
        ("domain", {"num_clients": 20, "train_per_client": 0}, "train_per_client"),
        ("spectral", {"num_clients": 2}, "spectral"),
    ],
)
def test_bad_parameters_name_the_parameter(kind: str, params: dict, name: str) -> None:
    train, test = synthetic_labels()
    with pytest.raises(ValueError, match=name):
        make_partition("synthetic", kind, train, test, seed=0, **params)


def test_domain_needs_enough_clients() -> None:
    train, test = synthetic_labels()
    with pytest.raises(ValueError, match="num_clients"):
        domain_partition(train, test, num_clients=3, seed=0)


def test_dirichlet_partition() -> None:
    train, test = synthetic_labels(train_per=200, test_per=40)
    p = dirichlet_partition(train, test, num_clients=8, alpha=0.3, seed=3)
    assert p.kind == "dirichlet" and p.spec["alpha"] == 0.3 and p.spec["min_train_per_client"] == 10
    assert_disjoint(p.train_indices)
    assert_disjoint(p.test_indices)
    # every train sample is dealt, every client has the minimum
    assert sum(len(i) for i in p.train_indices) == len(train)
    assert min(len(i) for i in p.train_indices) >= 10
    counts = p.class_counts(train, test)
    tr, te = np.array(counts["train"]), np.array(counts["test"])
    # a small alpha gives label skew: clients' class distributions differ a lot
    shares = tr / tr.sum(axis=1, keepdims=True)
    assert shares.max() > 0.4
    # test split follows the train proportions (test:train is 40:200 per class here)
    assert np.array_equal(te, np.floor(tr * 0.2 + 1e-9).astype(int))

    assert_same(p, dirichlet_partition(train, test, num_clients=8, alpha=0.3, seed=3))
    other = dirichlet_partition(train, test, num_clients=8, alpha=0.3, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(p.train_indices, other.train_indices, strict=True))


def test_dirichlet_fixed_test_size() -> None:
    train, test = synthetic_labels(train_per=200, test_per=40)
    p = dirichlet_partition(train, test, num_clients=8, alpha=1.0, seed=0, test_per_client=25)
    assert [len(i) for i in p.test_indices] == [25] * 8
    assert_disjoint(p.test_indices)
    tr = np.array(p.class_counts(train, test)["train"])
    te = np.array(p.class_counts(train, test)["test"])
    # proportional to the client's train classes, up to rounding
    assert np.abs(te - 25 * tr / tr.sum(axis=1, keepdims=True)).max() < 1.0


def test_domain_partition() -> None:
    rng = np.random.default_rng(0)
    train_domains = rng.integers(0, 3, size=300)
    test_domains = rng.integers(0, 3, size=90)
    p = domain_partition(train_domains, test_domains, num_clients=7, seed=5)
    assert p.num_clients == 7 and p.kind == "domain"
    for k in range(7):
        assert (train_domains[p.train_indices[k]] == k % 3).all()
        assert (test_domains[p.test_indices[k]] == k % 3).all()
    assert_disjoint(p.train_indices)
    assert_disjoint(p.test_indices)
    # clients of a domain share all its samples between them
    assert sum(len(i) for i in p.train_indices) == 300
    capped = domain_partition(train_domains, test_domains, num_clients=7, seed=5, train_per_client=20,
                              test_per_client=5)
    assert all(len(i) == 20 for i in capped.train_indices)
    assert all(len(i) == 5 for i in capped.test_indices)
    assert_same(p, domain_partition(train_domains, test_domains, num_clients=7, seed=5))
    via_make = make_partition("reviews", "domain", train_domains, test_domains, seed=5, num_clients=7)
    assert via_make.dataset == "reviews"
    assert_same(p, via_make)


def test_save_load_round_trip(tmp_path: Path) -> None:
    train, test = synthetic_labels()
    p = make_partition("synthetic", "pathological", train, test, seed=0, num_clients=5, classes_per_client=2,
                       train_per_class=4, test_per_class=3)
    path = tmp_path / "sub" / "part.json"
    p.save(path)
    assert [f.name for f in path.parent.iterdir()] == ["part.json"]
    loaded = Partition.load(path)
    assert loaded.dataset == "synthetic"
    assert_same(p, loaded)
    assert loaded.train_indices[0].dtype == np.int64
    assert loaded.key() == p.key() == partition_key("synthetic", p.spec)
    assert loaded.class_counts(train, test) == p.class_counts(train, test)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Partition.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{ truncated")
    with pytest.raises(ValueError, match="bad.json"):
        Partition.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="bad.json"):
        Partition.load(bad)


def test_class_counts_rejects_foreign_labels() -> None:
    train, test = synthetic_labels()
    p = make_partition("synthetic", "pathological", train, test, seed=0, num_clients=5, classes_per_client=2,
                       train_per_class=4, test_per_class=3)
    with pytest.raises(ValueError, match="another dataset"):
        p.class_counts(train[:10], test)


def test_partition_key() -> None:
    spec = {"kind": "pathological", "num_clients": 10, "seed": 0}
    key = partition_key("cifar10", spec)
    assert len(key) == 12 and key == partition_key("CIFAR10", dict(reversed(list(spec.items()))))
    assert key != partition_key("cifar10", {**spec, "seed": 1})
    assert key != partition_key("cifar100", spec)
    assert partition_key("x", {"seed": np.int64(3)}) == partition_key("x", {"seed": 3})


# ---------------------------------------------------------------- summary and plot


def test_summary_counts_and_plot(tmp_path: Path) -> None:
    train, test = synthetic_labels()
    names = [f"class{c}" for c in range(10)]
    p = make_partition("synthetic", "pathological", train, test, seed=0, num_clients=6, classes_per_client=2,
                       train_per_class=4, test_per_class=3)
    summary = partition_summary(p, train, test, names)
    json.dumps(summary)
    assert summary["dataset"] == "synthetic" and summary["kind"] == "pathological"
    assert summary["num_clients"] == 6 and summary["spec"] == p.spec
    assert summary["totals"] == {"train": 48, "test": 36}
    for k, client in enumerate(summary["clients"]):
        assert client["train_size"] == 8 and client["test_size"] == 6
        assert set(client["train_counts"]) == set(names)
        held = {c for c, n in client["train_counts"].items() if n}
        assert held == {names[c] for c in np.unique(train[p.train_indices[k]])}
        assert all(client["train_counts"][c] == 4 and client["test_counts"][c] == 3 for c in held)

    out = tmp_path / "plots" / "partition.png"
    plot_partition(summary, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ValueError, match="class_names"):
        partition_summary(p, train, test, names[:3])


def test_plot_many_clients(tmp_path: Path) -> None:
    train, test = synthetic_labels(train_per=500, test_per=100)
    p = dirichlet_partition(train, test, num_clients=100, alpha=0.5, seed=0, min_train_per_client=5)
    out = tmp_path / "many.png"
    plot_partition(partition_summary(p, train, test, [str(c) for c in range(10)]), out)
    with Image.open(out) as im:
        assert im.size[1] > im.size[0]  # grows with the number of clients


# ---------------------------------------------------------------- real data (skipped without it)


def _real_data_root() -> Path | None:
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    candidates = [os.environ.get("FEDSELECT_DATA_ROOT"), beside_checkout]
    for c in candidates:
        if c and (Path(c) / "cifar10" / "train").is_dir() and (Path(c) / "cifar10" / "test").is_dir():
            return Path(c)
    return None


@pytest.mark.integration
@pytest.mark.skipif(_real_data_root() is None, reason="the CIFAR-10 ImageFolder copy is not available")
def test_real_cifar10(tmp_path: Path) -> None:
    root = _real_data_root()
    data = load_image_dataset("cifar10", root, download=False, cache_dir=tmp_path)
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"]
    assert torch.bincount(data.train_y).tolist() == [5000] * 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert np.allclose(data.mean, (0.4914, 0.4822, 0.4465), atol=1e-3)
    cached = load_image_dataset("cifar10", root, download=False, cache_dir=tmp_path)
    assert torch.equal(cached.train_x, data.train_x) and torch.equal(cached.test_y, data.test_y)
