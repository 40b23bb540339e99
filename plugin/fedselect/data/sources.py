"""Image datasets as in-memory uint8 tensors, from local ImageFolder trees or torchvision.

A dataset name resolves in this order (see :func:`load_image_dataset`):

1. ``imagefolder:<path>``: ``<path>/train/<class>/*`` and ``<path>/test/<class>/*``.
2. a named dataset (``cifar10``, ``cifar100``, ``fashionmnist``, ``mnist``): an ImageFolder
   tree at ``<root>/<name>/{train,test}`` if there is one, else torchvision's own files under
   ``<root>``, else a torchvision download (only when asked to and the host answers).

Decoding tens of thousands of PNG files takes seconds to tens of seconds, so the decoded
tensors of an ImageFolder source are cached once per content version in ``cache_dir``.
Nothing is ever written next to the data: the data folder may be read-only and shared.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fedselect.dataset_names import IMAGE_ALIASES, IMAGE_DATASETS, accepted_datasets
from fedselect.files import atomic_writer
from fedselect.load_errors import load_failure
from fedselect.options import ConfigError

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_ROOT_ENV",
    "IMG_EXTENSIONS",
    "KNOWN_DATASETS",
    "DataCacheError",
    "DataNotFoundError",
    "ImageData",
    "accepted_datasets",
    "canonical_name",
    "channel_stats",
    "decode_images",
    "default_cache_dir",
    "resolve_data_root",
]

DATA_ROOT_ENV = "FEDSELECT_DATA_ROOT"
CACHE_DIR_ENV = "FEDSELECT_CACHE_DIR"

# canonical name -> torchvision class name (one table for the config's check and the loaders)
KNOWN_DATASETS = IMAGE_DATASETS
_ALIASES = IMAGE_ALIASES

# torchvision's IMG_EXTENSIONS, so a tree that ImageFolder reads is read here the same way
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# bump when the cache file layout changes, so old files are never misread
_CACHE_FORMAT = 1
# below this many files a worker pool costs more than it saves
_POOL_MIN_FILES = 2000
_CHUNK_FILES = 1000


class DataNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for and could not be downloaded."""


class DataCacheError(ConfigError):
    """A decoded-tensor cache file exists but cannot be read; the message names the file.

    A :class:`ConfigError` because the way on is the user's (delete the file): the command line
    reports it in one line, exit status 2, like a bad config key.
    """


@dataclass
class ImageData:
    """A whole image dataset (train and test split) held in memory."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`classes`)."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Channels per image (1 for grayscale, 3 for colour)."""
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        """Side length of the (square) images, as the model builders take it; the height if not square."""
        return int(self.train_x.shape[2])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])


def resolve_data_root(root: str | os.PathLike[str] | None) -> Path:
    """The data root: ``root`` if given, else ``$FEDSELECT_DATA_ROOT``, else ``./data``.

    The path is returned as given (a relative path stays relative to the working directory).
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path("data")


def default_cache_dir() -> Path:
    """Where decoded tensors are cached: ``$FEDSELECT_CACHE_DIR``, else ``~/.cache/fedselect``."""
    env = os.environ.get(CACHE_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedselect"


def canonical_name(name: str) -> str:
    """Lower-case canonical dataset name; ``imagefolder:<path>`` keeps its path's spelling."""
    if name.lower().startswith("imagefolder:"):
        return "imagefolder:" + name.split(":", 1)[1]
    key = name.strip().lower()
    return _ALIASES.get(key, key)


# ---------------------------------------------------------------- ImageFolder sources


def is_imagefolder_pair(folder: Path) -> bool:
    """Whether ``folder`` has both a ``train`` and a ``test`` subfolder."""
    return (folder / "train").is_dir() and (folder / "test").is_dir()


# one image file: (path, label, size in bytes, mtime in ns)
FileEntry = tuple[str, int, int, int]


def _scan_split(split_dir: Path, class_names: Sequence[str] | None) -> tuple[list[str], list[FileEntry]]:
    """List (class names, [(path, label, size, mtime_ns)]) in torchvision ImageFolder order.

    ``class_names`` fixes the label of each class (the train split's); a test class not among
    them is an error rather than a silently shifted label.
    """
    with os.scandir(split_dir) as it:
        found = sorted(e.name for e in it if e.is_dir())
    if class_names is None:
        class_names = found
        if not class_names:
            raise ValueError(f"no class folders in {split_dir}")
    else:
        extra = sorted(set(found) - set(class_names))
        if extra:
            raise ValueError(f"{split_dir} has class folders not in the train split: {extra}")
    label_of = {c: i for i, c in enumerate(class_names)}
    files: list[FileEntry] = []
    for cls in class_names:
        if cls in found:
            files.extend((path, label_of[cls], size, mtime)
                         for path, size, mtime in _walk_images(split_dir / cls))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return list(class_names), files


def _walk_images(directory: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of the image files under ``directory``: its own files by name, then
    its subfolders by name. One ``scandir`` per folder, so 60,000 files take a fraction of a second.
    """
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    out: list[tuple[str, int, int]] = []
    subdirs = []
    for e in entries:
        if e.is_dir():
            subdirs.append(e.path)
        elif e.name.lower().endswith(IMG_EXTENSIONS):
            st = e.stat()
            out.append((e.path, st.st_size, st.st_mtime_ns))
    for sub in subdirs:
        out.extend(_walk_images(Path(sub)))
    return out


def _source_key(folder: Path, listing: Sequence[FileEntry]) -> str:
    """Hash of the resolved folder and every file's path, label, size and mtime."""
    h = hashlib.sha1()
    h.update(f"fedselect-imagefolder-v{_CACHE_FORMAT}\0{folder.resolve()}\0".encode())
    # every listed path was built by joining onto ``folder``, so slicing gives the relative path
    # (os.path.relpath would cost half a second on 60,000 files)
    cut = len(os.path.join(str(folder), ""))
    h.update("\n".join(f"{p[cut:]}\0{label}\0{size}\0{mtime}" for p, label, size, mtime in listing).encode())
    return h.hexdigest()[:16]


def load_imagefolder(name: str, folder: Path, cache_dir: Path) -> ImageData:
    """Load ``folder/{train,test}`` from the cache if it matches the files, else decode and cache."""
    classes, train_files = _scan_split(folder / "train", None)
    _, test_files = _scan_split(folder / "test", classes)
    source = f"imagefolder:{folder.resolve()}"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    cache_file = cache_dir / f"{safe}-{_source_key(folder, train_files + test_files)}.pt"
    if cache_file.exists():
        return _read_cache(cache_file, name)

    images = decode_images([f[0] for f in train_files + test_files])
    n_train = len(train_files)
    # NHWC -> NCHW copies straight from the decoded array, one split at a time, to keep the
    # peak memory at twice the dataset
    train_x = torch.from_numpy(images[:n_train]).permute(0, 3, 1, 2).contiguous()
    test_x = torch.from_numpy(images[n_train:]).permute(0, 3, 1, 2).contiguous()
    del images
    train_y = torch.tensor([f[1] for f in train_files], dtype=torch.int64)
    test_y = torch.tensor([f[1] for f in test_files], dtype=torch.int64)
    mean, std = channel_stats(train_x)
    data = ImageData(name, train_x, train_y, test_x, test_y, classes, mean, std, source)
    _write_cache(cache_file, data)
    return data


def _read_cache(path: Path, name: str) -> ImageData:
    """Read and check a cache file; anything wrong with it raises :class:`DataCacheError`."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise DataCacheError(
            f"cannot read the dataset cache file {path}: {load_failure(exc)}. Delete it to rebuild it."
        ) from None
    try:
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT:
            raise ValueError("not a fedselect dataset cache (format mismatch)")
        tensors = {k: blob[k] for k in ("train_x", "train_y", "test_x", "test_y")}
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{k} is not a tensor")
        if tensors["train_x"].dtype != torch.uint8 or tensors["train_x"].dim() != 4:
            raise ValueError("train_x is not a uint8 NCHW tensor")
        if tensors["train_x"].shape[0] != tensors["train_y"].shape[0]:
            raise ValueError("train_x and train_y differ in length")
        if tensors["test_x"].shape[0] != tensors["test_y"].shape[0]:
            raise ValueError("test_x and test_y differ in length")
        return ImageData(
            name=name,
            classes=[str(c) for c in blob["classes"]],
            mean=tuple(float(v) for v in blob["mean"]),
            std=tuple(float(v) for v in blob["std"]),
            source=str(blob["source"]),
            **tensors,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataCacheError(
            f"the dataset cache file {path} is malformed ({exc}). Delete it to rebuild it."
        ) from None


def _write_cache(path: Path, data: ImageData) -> None:
    """Write atomically: a reader sees either no file or the whole file, never a partial one."""
    blob: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "name": data.name,
        "train_x": data.train_x,
        "train_y": data.train_y,
        "test_x": data.test_x,
        "test_y": data.test_y,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "source": data.source,
    }
    save_cache_blob(path, blob)


def save_cache_blob(path: Path, blob: dict[str, Any]) -> None:
    """``torch.save`` a dataset cache atomically: readers see no file or the whole file."""
    try:
        # parallel writers never share a temporary file, and the file gets the usual umask
        # permissions, so a shared cache stays readable
        with atomic_writer(path, "wb", fsync=False) as fh:
            torch.save(blob, fh)
    except OSError as exc:
        # an unwritable cache only costs time on the next load; the data itself is fine
        warnings.warn(f"could not write the dataset cache {path}: {exc}", RuntimeWarning, stacklevel=4)


def _decode_chunk(paths: Sequence[str]) -> np.ndarray:
    """Decode image files into one uint8 N x H x W x C array (C=3 if any is colour, else 1)."""
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            if im.mode in ("1", "L", "LA", "I", "I;16", "F"):
                arr = np.asarray(im.convert("L"))[:, :, None]
            else:
                arr = np.asarray(im.convert("RGB"))
        if arrays and arr.shape[:2] != arrays[0].shape[:2]:
            raise ValueError(f"{p} is {arr.shape[1]}x{arr.shape[0]} pixels, unlike the images before it "
                             f"({arrays[0].shape[1]}x{arrays[0].shape[0]}); all images must be one size")
        arrays.append(arr)
    channels = max(a.shape[2] for a in arrays)
    if channels == 3:
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return np.stack(arrays)


def _pool_context() -> Any:
    """The multiprocessing context of the decoding pool."""
    # fork skips re-importing torch in every worker; the workers only touch PIL and numpy
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def decode_images(paths: Sequence[str], *, workers: int | None = None) -> np.ndarray:
    """Decode image files (all the same size) into a uint8 N x H x W x C array, in order.

    Grayscale images give C=1; if any image is in colour, all are returned as RGB (C=3).
    Large lists are decoded by a pool of ``workers`` processes (default: ``os.cpu_count()``).
    """
    if not paths:
        raise ValueError("no image files to decode")
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(paths) < _POOL_MIN_FILES:
        chunks = [_decode_chunk(paths)]
    else:
        size = min(_CHUNK_FILES, math.ceil(len(paths) / workers))
        pieces = [paths[i:i + size] for i in range(0, len(paths), size)]
        # a first decode takes tens of seconds: show it (on stderr, off when not a terminal)
        with _pool_context().Pool(workers) as pool, tqdm(total=len(paths), desc="decoding images", unit="img",
                                                          leave=False, disable=None) as bar:
            chunks = []
            for chunk in pool.imap(_decode_chunk, pieces):
                chunks.append(chunk)
                bar.update(len(chunk))
    shape = chunks[0].shape[1:3]
    channels = max(c.shape[3] for c in chunks)
    out = np.empty((len(paths), *shape, channels), dtype=np.uint8)
    pos = 0
    for chunk in chunks:
        if chunk.shape[1:3] != shape:
            raise ValueError(f"images differ in size: {paths[pos]} is {chunk.shape[2]}x{chunk.shape[1]}, "
                             f"{paths[0]} is {shape[1]}x{shape[0]}; all images must be one size")
        out[pos:pos + len(chunk)] = chunk  # broadcasts a C=1 chunk to C=3
        pos += len(chunk)
    return out


def channel_stats(x: torch.Tensor, batch: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NCHW ``x`` scaled to [0, 1].

    Accumulated in float64 over batches, so 50,000 images never need a float copy at once.
    """
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], batch):
        part = x[i:i + batch].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += (part * part).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0.0)
    return tuple(float(v) / 255.0 for v in mean), tuple(math.sqrt(float(v)) / 255.0 for v in var)
