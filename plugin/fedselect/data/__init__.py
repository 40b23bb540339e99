"""Datasets and their federated partitions.

* :mod:`fedselect.data.sources`: whole image datasets as uint8 tensors (local ImageFolder trees,
  torchvision files or downloads), with a decoded-tensor cache.
* :mod:`fedselect.data.partition`: deterministic per-client index splits (pathological,
  Dirichlet, domain) and their JSON files.
* :mod:`fedselect.data.summary`: per-client count summaries and a figure of a partition.
* :mod:`fedselect.data.text`: text datasets (the multi-domain Amazon reviews) as token ids.

:func:`load_dataset` picks the loader by name: text datasets go to :func:`load_text_dataset`,
everything else to :func:`load_image_dataset`.
"""

from __future__ import annotations

import os
from typing import Any

from fedselect.dataset_names import classify

from .images import load_image_dataset
from .partition import Partition, partition_key
from .partitioners import (
    PARTITION_KINDS,
    dirichlet_partition,
    domain_partition,
    make_partition,
    pathological_partition,
)
from .sources import (
    CACHE_DIR_ENV,
    DATA_ROOT_ENV,
    KNOWN_DATASETS,
    DataCacheError,
    DataNotFoundError,
    ImageData,
    decode_images,
    default_cache_dir,
    resolve_data_root,
)
from .summary import partition_summary, plot_partition
from .text import TEXT_DATASETS, TextData, TokenTransform, canonical_text_name, load_text_dataset
from .text_files import TextFileOptions, load_text_files

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_ROOT_ENV",
    "KNOWN_DATASETS",
    "PARTITION_KINDS",
    "TEXT_DATASETS",
    "DataCacheError",
    "DataNotFoundError",
    "ImageData",
    "Partition",
    "TextData",
    "TokenTransform",
    "decode_images",
    "default_cache_dir",
    "dirichlet_partition",
    "domain_partition",
    "load_dataset",
    "load_image_dataset",
    "load_text_dataset",
    "load_text_files",
    "TextFileOptions",
    "make_partition",
    "partition_key",
    "partition_summary",
    "pathological_partition",
    "plot_partition",
    "resolve_data_root",
]


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    **text_options: Any,
) -> ImageData | TextData:
    """Load a dataset by name: ``amazon_reviews`` (aliases ``amazon-reviews``, ``reviews``) as
    :class:`TextData`, any other name through :func:`load_image_dataset` as :class:`ImageData`.

    Args:
        text_options: keyword options of :func:`load_text_dataset` (``max_length``, ``domains``,
            ``tokenizer_path``) or, for a corpus (``csv:``, ``jsonl:``, ...), of :func:`load_text_files`
            (``options``, ``tokenizer_folder``, ``max_length``); an image dataset takes none.

    Raises:
        DataNotFoundError: the dataset's files are missing (and, for images, not downloadable).
        ValueError: an unknown name, or text options given for an image dataset.
    """
    if classify(name) is not None and classify(name)[0] == "text_file":
        return load_text_files(name, text_options.pop("options", TextFileOptions()), cache_dir=cache_dir,
                               **text_options)
    if canonical_text_name(name) is not None:
        return load_text_dataset(name, root, download=download, cache_dir=cache_dir, **text_options)
    if text_options:
        raise ValueError(f"dataset {name!r} is an image dataset; it takes no options {sorted(text_options)}")
    return load_image_dataset(name, root, download=download, cache_dir=cache_dir)
