"""Image datasets by name: an ImageFolder tree (:mod:`fedselect.data.sources`) or torchvision's
files (:mod:`fedselect.data.torchvision_source`); see :func:`load_image_dataset` for the order."""

from __future__ import annotations

import os
from pathlib import Path

from .sources import (
    KNOWN_DATASETS,
    DataNotFoundError,
    ImageData,
    accepted_datasets,
    canonical_name,
    default_cache_dir,
    is_imagefolder_pair,
    load_imagefolder,
    resolve_data_root,
)
from .torchvision_source import load_torchvision


def load_image_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageData:
    """Load a whole image dataset as uint8 NCHW tensors with int64 labels.

    Args:
        name: ``cifar10``, ``cifar100``, ``fashionmnist``, ``mnist`` (case-insensitive) or
            ``imagefolder:<path>`` for any folder with ``train/`` and ``test/`` ImageFolder trees.
        root: data root (see :func:`resolve_data_root`); unused for ``imagefolder:``.
        download: let torchvision download a named dataset whose files are missing, if the
            download host answers within a few seconds.
        cache_dir: where decoded ImageFolder tensors are cached (see :func:`default_cache_dir`).

    Raises:
        DataNotFoundError: the files are missing and cannot (or may not) be downloaded.
        DataCacheError: a cache file for this exact source exists but is unreadable.
        ValueError: unknown dataset name, or an inconsistent ImageFolder tree.
    """
    cname = canonical_name(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if cname.startswith("imagefolder:"):
        folder = Path(cname.split(":", 1)[1]).expanduser()
        if not is_imagefolder_pair(folder):
            raise DataNotFoundError(f"dataset {name!r}: no ImageFolder tree at {folder} (expected "
                                    f"{folder}/train/<class>/<image> and {folder}/test/<class>/<image>)")
        # the folder's own name is the most useful short name ("cifar10" for .../cifar10)
        short = folder.resolve().name.lower() or "imagefolder"
        return load_imagefolder(short, folder, cache)
    if cname not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}: {accepted_datasets()}")
    data_root = resolve_data_root(root)
    folder = data_root / cname
    if is_imagefolder_pair(folder):
        return load_imagefolder(cname, folder, cache)
    return load_torchvision(cname, data_root, download=download, cache_dir=cache)
