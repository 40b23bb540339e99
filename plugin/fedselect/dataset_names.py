"""What ``data.dataset`` may name, without importing torch: the config validates it and the loaders
dispatch on it (:mod:`fedselect.data`).

* a named image dataset (``cifar10``, ``cifar100``, ``fashionmnist``, ``mnist``; aliases below);
* ``imagefolder:<path>``: ``<path>/train/<class>/*`` and ``<path>/test/<class>/*``;
* ``amazon_reviews`` (aliases ``amazon-reviews``, ``reviews``): the multi-domain reviews folder;
* a text corpus read with Hugging Face ``datasets``: ``csv:<file>``, ``jsonl:<file>`` (or
  ``json:``), ``parquet:<file>``, ``disk:<folder written by save_to_disk>``, ``hf:<hub name>``
  (online only).
"""

from __future__ import annotations

from typing import Literal

# canonical name -> torchvision class name
IMAGE_DATASETS: dict[str, str] = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "fashionmnist": "FashionMNIST",
                                  "mnist": "MNIST"}
IMAGE_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashion-mnist": "fashionmnist",
                 "fashion_mnist": "fashionmnist", "fmnist": "fashionmnist"}
# canonical text dataset name -> folder under the data root
TEXT_DATASETS: dict[str, str] = {"amazon_reviews": "amazon-reviews"}
TEXT_ALIASES = {"amazon-reviews": "amazon_reviews", "reviews": "amazon_reviews"}
# prefix -> the Hugging Face datasets builder that reads it (None: not a builder: a folder or a hub name)
TEXT_FILE_KINDS: dict[str, str | None] = {"csv": "csv", "jsonl": "json", "json": "json", "parquet": "parquet",
                                          "disk": None, "hf": None}

Kind = Literal["image", "imagefolder", "text", "text_file"]


def accepted_datasets() -> str:
    """What a ``data.dataset`` may name, for error messages."""
    return ("expected one of " + ", ".join([*sorted(IMAGE_DATASETS), *TEXT_DATASETS]) + ", 'imagefolder:<path>', "
            "or a text corpus read with Hugging Face datasets: " +
            ", ".join(f"'{k}:<{'hub name' if k == 'hf' else 'folder' if k == 'disk' else 'file'}>'"
                      for k in TEXT_FILE_KINDS))


def classify(name: str) -> tuple[Kind, str] | None:
    """(kind, canonical name) of a dataset name, or None when it names nothing we read."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix.lower() == "imagefolder" and rest:
        return "imagefolder", "imagefolder:" + rest
    if sep and prefix.lower() in TEXT_FILE_KINDS and rest:
        return "text_file", f"{prefix.lower()}:{rest}"
    key = name.strip().lower()
    key = IMAGE_ALIASES.get(key, TEXT_ALIASES.get(key, key))
    if key in IMAGE_DATASETS:
        return "image", key
    if key in TEXT_DATASETS:
        return "text", key
    return None


def is_text(name: str) -> bool:
    """Whether ``name`` is a text dataset (token ids, a text model)."""
    kind = classify(name)
    return kind is not None and kind[0] in ("text", "text_file")
