"""Deterministic splits of a dataset's train and test samples over federated clients.

Every partitioner draws from one ``numpy.random.Generator`` seeded with ``seed``, so the same
labels, parameters and seed always give the same partition, on any machine. Clients never
share a sample: within each split, the per-client index arrays are disjoint.

Three kinds (the partitioners are in :mod:`fedselect.data.partitioners`, see ``make_partition``):

* ``pathological``: each client holds ``classes_per_client`` classes with a fixed number of
  train and test samples per class (the FedRep / FedSelect setting).
* ``dirichlet``: per-class client proportions drawn from Dir(alpha) (label skew), with each
  client's test split following its train split's class proportions.
* ``domain``: clients spread round-robin over per-sample domain ids (feature shift).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedselect.files import atomic_write_text

__all__ = ["Partition", "partition_key"]

_FILE_FORMAT = "fedselect-partition"
_FILE_VERSION = 1

# anything np.asarray turns into a 1-D integer array: numpy arrays, torch CPU tensors, lists
LabelArray = Any


@dataclass
class Partition:
    """Per-client train and test sample indices, with the parameters that produced them.

    ``num_classes`` is 0 for a ``domain`` partition, which is made without class labels.
    """

    dataset: str
    kind: str
    spec: dict[str, Any]
    num_classes: int
    train_indices: list[np.ndarray]
    test_indices: list[np.ndarray]

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.train_indices)

    def key(self) -> str:
        """:func:`partition_key` of this partition's dataset and spec."""
        return partition_key(self.dataset, self.spec)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what :meth:`save` writes)."""
        return {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "dataset": self.dataset,
            "kind": self.kind,
            "spec": self.spec,
            "num_classes": self.num_classes,
            "train_indices": [idx.tolist() for idx in self.train_indices],
            "test_indices": [idx.tolist() for idx in self.test_indices],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the partition as JSON, atomically (readers never see a partial file)."""
        atomic_write_text(path, json.dumps(self.to_dict(), separators=(",", ":")) + "\n", fsync=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        """Read a partition written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path`` (the message names it).
            ValueError: the file is not a valid partition file (the message names it).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"partition file {path} does not exist") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"partition file {path} is not a partition file: not UTF-8 text ({exc.reason} at "
                             f"byte {exc.start})") from None
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != _FILE_FORMAT:
                raise ValueError(f"not a {_FILE_FORMAT} file")
            if raw.get("version") != _FILE_VERSION:
                raise ValueError(f"unsupported version {raw.get('version')!r} (expected {_FILE_VERSION})")
            train = [_index_array(v) for v in raw["train_indices"]]
            test = [_index_array(v) for v in raw["test_indices"]]
            if len(train) != len(test):
                raise ValueError(f"{len(train)} train index lists but {len(test)} test index lists")
            if not isinstance(raw["spec"], dict):
                raise ValueError("spec is not an object")
            return cls(str(raw["dataset"]), str(raw["kind"]), raw["spec"], int(raw["num_classes"]),
                       train, test)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"partition file {path} is corrupt or not a partition file: {exc}") from exc

    def class_counts(self, train_labels: LabelArray, test_labels: LabelArray) -> dict[str, list[list[int]]]:
        """Samples per class per client: ``{"train": [[n_class0, ...] per client], "test": ...}``."""
        train = _labels(train_labels, "train_labels")
        test = _labels(test_labels, "test_labels")
        self.check_compatible(len(train), len(test))
        n = max(self.num_classes, int(train.max(initial=-1)) + 1, int(test.max(initial=-1)) + 1)
        return {
            "train": [np.bincount(train[idx], minlength=n).tolist() for idx in self.train_indices],
            "test": [np.bincount(test[idx], minlength=n).tolist() for idx in self.test_indices],
        }

    def validate(self, num_train: int, num_test: int, *, num_clients: int | None = None,
                 source: str | os.PathLike[str] | None = None) -> None:
        """Raise ValueError naming ``source`` unless the partition fits a dataset of these split sizes
        and ``num_clients`` clients: every index in range, no sample held twice (within or across
        clients) in a split."""
        where = "the partition" if source is None else f"partition file {source}"
        if num_clients is not None and self.num_clients != num_clients:
            raise ValueError(f"{where} has {self.num_clients} clients, the config {num_clients} "
                             "(data.partition.num_clients)")
        for split, lists, size in (("train", self.train_indices, num_train), ("test", self.test_indices, num_test)):
            for cid, idx in enumerate(lists):
                if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
                    bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
                    raise ValueError(f"{where}: client {cid}'s {split} index {bad} is outside the {split} split "
                                     f"of {self.dataset!r} (0..{size - 1}); was it made for another dataset?")
            _check_disjoint(lists, split, where)

    def check_compatible(self, num_train: int, num_test: int) -> None:
        """Raise ValueError if an index points past a split of the given sizes (wrong dataset)."""
        splits = (("train", self.train_indices, num_train), ("test", self.test_indices, num_test))
        for split, lists, size in splits:
            top = max((int(idx.max()) for idx in lists if idx.size), default=-1)
            if top >= size:
                raise ValueError(
                    f"partition of {self.dataset!r} ({self.kind}) indexes {split} sample {top}, but the "
                    f"{split} split has only {size} samples: it was made for another dataset"
                )


def partition_key(dataset: str, spec: dict[str, Any]) -> str:
    """Short stable hash of (dataset, spec) for file names: sha1 of canonical JSON, 12 hex digits."""
    canonical = json.dumps({"dataset": dataset.lower(), "spec": _jsonable(spec)}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------- partitioners


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _opt_int(value: int | None) -> int | None:
    """``int(value)``, keeping None (numpy integers would not serialize to JSON)."""
    return None if value is None else int(value)


def _labels(labels: LabelArray, name: str) -> np.ndarray:
    """``labels`` as a 1-D int64 array of non-negative ids; ValueError naming ``name`` otherwise."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {int(arr.min())}")
    return arr


def _num_classes(train: np.ndarray, test: np.ndarray) -> int:
    """Number of classes implied by the largest label of either split."""
    if train.size == 0:
        raise ValueError("train_labels is empty")
    return int(max(train.max(), test.max(initial=0))) + 1


def _index_array(value: Any) -> np.ndarray:
    """One client's index list from JSON as a 1-D int64 array (integers only: 1e9 or 2.5 is refused)."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError("an index list is not a flat list of integers")
    try:
        return np.asarray(value, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise ValueError("an index list holds an integer beyond int64") from None


def _check_disjoint(lists: list[np.ndarray], split: str, where: str) -> None:
    """ValueError if a sample index appears twice in ``lists`` (one client's, or two clients')."""
    owners = np.concatenate([np.full(idx.size, cid) for cid, idx in enumerate(lists)] or [np.empty(0, np.int64)])
    flat = np.concatenate(list(lists) or [np.empty(0, np.int64)])
    order = np.argsort(flat, kind="stable")
    repeated = np.flatnonzero(flat[order][1:] == flat[order][:-1])
    if repeated.size:
        i = repeated[0]
        index, first, second = int(flat[order][i]), int(owners[order][i]), int(owners[order][i + 1])
        whose = f"client {first} twice" if first == second else f"clients {first} and {second}"
        raise ValueError(f"{where}: {split} sample {index} is held by {whose}; clients must not share samples")


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python ones, so it serializes canonically."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
