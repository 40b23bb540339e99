"""Named image datasets from torchvision's own files: as they are, from their downloaded archives
offline, or downloaded.

Order for ``cifar10``, ``cifar100``, ``fashionmnist``, ``mnist`` under the data root:

1. torchvision's extracted files (``cifar-10-batches-py/``, ``MNIST/raw/train-images-idx3-ubyte``);
2. the archives a download leaves or a distribution package ships (``cifar-10-python.tar.gz``,
   ``MNIST/raw/*.gz``), extracted once into the cache folder (never next to the data, which
   may be read-only) and read from there, with no network;
3. a download, only when ``download`` is true and the host answers within a few seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import socket
import tarfile
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedselect.files import atomic_writer

from .sources import DATA_ROOT_ENV, KNOWN_DATASETS, DataNotFoundError, ImageData, channel_stats

CONNECT_TIMEOUT_S = 3.0
# seconds without a byte before a download counts as stalled
DOWNLOAD_STALL_S = 60.0
# torchvision's extracted layout per dataset, for messages
EXTRACTED = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
             "fashionmnist": "FashionMNIST/raw", "mnist": "MNIST/raw"}


def torchvision_class(name: str) -> Any:
    """The torchvision dataset class of canonical ``name`` (imported lazily: it is slow)."""
    import torchvision.datasets as tvd

    return getattr(tvd, KNOWN_DATASETS[name])


def download_hosts(cls: Any) -> list[tuple[str, int]]:
    """(host, port) of every download URL a torchvision dataset class declares."""
    urls: list[str] = []
    if isinstance(getattr(cls, "url", None), str):
        urls.append(cls.url)
    urls.extend(m for m in getattr(cls, "mirrors", []) if isinstance(m, str))
    hosts = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname:
            hosts.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    return hosts


def network_available(hosts: Sequence[tuple[str, int]], timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to any of ``hosts`` opens within ``timeout`` seconds (per host)."""
    return any(_connects(host, port, timeout) for host, port in hosts)


def _connects(host: str, port: int, timeout: float) -> bool:
    """Whether one TCP connection, DNS lookup included, opens within ``timeout`` seconds."""
    # socket timeouts do not cover the DNS lookup, which can stall for many seconds on a
    # machine without network; a daemon thread bounds the whole attempt
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, name=f"fedselect-netcheck-{host}", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _open_splits(cls: Any, root: Path, *, download: bool) -> tuple[Any, Any]:
    return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)


def local_archives(cls: Any, root: Path) -> list[Path]:
    """The dataset's downloaded archives under ``root`` (all of them, or none)."""
    if getattr(cls, "filename", None) and getattr(cls, "base_folder", None):  # CIFAR: one tar.gz in root
        archive = root / cls.filename
        return [archive] if archive.is_file() else []
    raw = root / cls.__name__ / "raw"  # MNIST-style: one .gz per file in <root>/<Name>/raw
    # resources: (file name or URL, md5); the file name is the URL's last part
    archives = [raw / str(entry[0]).rsplit("/", 1)[-1] for entry in getattr(cls, "resources", [])]
    return archives if archives and all(a.is_file() for a in archives) else []


def extract_into_cache(cls: Any, archives: Sequence[Path], cache_dir: Path) -> Path:
    """Extract the archives once into ``cache_dir/torchvision/<key>`` (keyed on their names, sizes and
    modification times) and return that folder as a torchvision root."""
    digest = hashlib.sha256()
    for archive in archives:
        stat = archive.stat()
        digest.update(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns};".encode())
    target = cache_dir / "torchvision" / f"{cls.__name__}-{digest.hexdigest()[:16]}"
    done = target / ".extracted"
    if done.exists():
        return target
    for archive in archives:
        try:
            if archive.name.endswith((".tar.gz", ".tgz")):
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(target, filter="data")
            else:  # one gzip'd file: <root>/<Name>/raw/<file>.gz -> <target>/<Name>/raw/<file>
                out = target / cls.__name__ / "raw" / archive.name.removesuffix(".gz")
                out.parent.mkdir(parents=True, exist_ok=True)
                with gzip.open(archive, "rb") as src, atomic_writer(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise DataNotFoundError(f"cannot extract {archive}: {exc}") from exc
    done.touch()
    return target


def load_torchvision(name: str, root: Path, *, download: bool, cache_dir: Path) -> ImageData:
    """Load a named dataset from torchvision's files under ``root``: extracted, from its archives
    (extracted into ``cache_dir``), or downloaded if allowed."""
    cls = torchvision_class(name)
    try:
        train, test = _open_splits(cls, root, download=False)
    except RuntimeError as missing:
        archives = local_archives(cls, root)
        if archives:
            extracted = extract_into_cache(cls, archives, cache_dir)
            try:
                train, test = _open_splits(cls, extracted, download=False)
            except (RuntimeError, ValueError, OSError) as exc:
                raise DataNotFoundError(f"dataset {name!r}: its archives {', '.join(map(str, archives))} "
                                        f"did not give torchvision's files ({exc})") from exc
        else:
            train, test = _download(cls, name, root, download=download, missing=missing)
    train_x, train_y = torchvision_tensors(train)
    test_x, test_y = torchvision_tensors(test)
    mean, std = channel_stats(train_x)
    return ImageData(name, train_x, train_y, test_x, test_y, [str(c) for c in train.classes], mean, std,
                     f"torchvision:{KNOWN_DATASETS[name]}")


def _download(cls: Any, name: str, root: Path, *, download: bool, missing: Exception) -> tuple[Any, Any]:
    if not download:
        raise DataNotFoundError(missing_message(name, root, reason="download=False")) from missing
    hosts = download_hosts(cls)
    if not network_available(hosts):
        where = ", ".join(f"{h}:{p}" for h, p in hosts) or "its download host"
        raise DataNotFoundError(missing_message(
            name, root, reason=f"no network: could not connect to {where} within {CONNECT_TIMEOUT_S:g} s"
        )) from missing
    # torchvision's urlopen has no timeout: a connection that opens but then stalls (a proxy,
    # a dead mirror) would hang forever; the default socket timeout turns that into an error
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_STALL_S)
    try:
        return _open_splits(cls, root, download=True)
    except Exception as exc:  # urllib, HTTP and checksum errors all mean "not downloaded"
        raise DataNotFoundError(missing_message(name, root, reason=f"download failed: {exc}")) from exc
    finally:
        socket.setdefaulttimeout(previous)


def torchvision_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW images, int64 labels) of a torchvision dataset object."""
    x = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8)
    # CIFAR keeps N x H x W x C numpy arrays, MNIST-style sets N x H x W tensors
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return x.contiguous(), y


def missing_message(name: str, root: Path, *, reason: str = "") -> str:
    """What :class:`DataNotFoundError` says: where it looked, what it expected, how to fix it."""
    archive = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
               "fashionmnist": "FashionMNIST/raw/*.gz", "mnist": "MNIST/raw/*.gz"}[name]
    return (
        f"dataset {name!r} not found under the data root {root} (resolved: {root.resolve()}). Expected "
        f"either an ImageFolder tree {root}/{name}/train/<class>/<image> and "
        f"{root}/{name}/test/<class>/<image>, torchvision's files {root}/{EXTRACTED[name]}, or their "
        f"downloaded archives {root}/{archive}. Set the root with the data root option or the "
        f"environment variable {DATA_ROOT_ENV}. Downloading needs network access"
        + (f" ({reason})." if reason else ".")
    )
