"""Datasets and their federated partitions.

* :mod:`fedselect.data.sources`: whole image datasets as uint8 tensors (local ImageFolder trees,
  torchvision files or downloads), with a decoded-tensor cache.
* :mod:`fedselect.data.partition`: deterministic per-client index splits (pathological,
  Dirichlet, domain) and their JSON files.
* :mod:`fedselect.data.summary`: per-client count summaries and a figure of a partition.
"""

from .partition import (
    PARTITION_KINDS,
    Partition,
    dirichlet_partition,
    domain_partition,
    make_partition,
    partition_key,
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
    load_image_dataset,
    resolve_data_root,
)
from .summary import partition_summary, plot_partition

__all__ = [
    "CACHE_DIR_ENV",
    "DATA_ROOT_ENV",
    "KNOWN_DATASETS",
    "PARTITION_KINDS",
    "DataCacheError",
    "DataNotFoundError",
    "ImageData",
    "Partition",
    "decode_images",
    "default_cache_dir",
    "dirichlet_partition",
    "domain_partition",
    "load_image_dataset",
    "make_partition",
    "partition_key",
    "partition_summary",
    "pathological_partition",
    "plot_partition",
    "resolve_data_root",
]
