"""Deterministic splits of a dataset's train and test samples over federated clients.

Every partitioner draws from one ``numpy.random.Generator`` seeded with ``seed``, so the same
labels, parameters and seed always give the same partition, on any machine. Clients never
share a sample: within each split, the per-client index arrays are disjoint.

Three kinds (see :func:`make_partition`):

* ``pathological``: each client holds ``classes_per_client`` classes with a fixed number of
  train and test samples per class (the FedRep / FedSelect setting).
* ``dirichlet``: per-class client proportions drawn from Dir(alpha) (label skew), with each
  client's test split following its train split's class proportions.
* ``domain``: clients spread round-robin over per-sample domain ids (feature shift).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PARTITION_KINDS",
    "Partition",
    "dirichlet_partition",
    "domain_partition",
    "make_partition",
    "partition_key",
    "pathological_partition",
]

_FILE_FORMAT = "fedselect-partition"
_FILE_VERSION = 1
# resampling Dir(alpha) until every client has enough samples: a bound so that an infeasible
# request fails with a message instead of looping forever
_MAX_DIRICHLET_TRIES = 1000

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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, separators=(",", ":"))
                fh.write("\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

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


def pathological_partition(
    train_labels: LabelArray,
    test_labels: LabelArray,
    *,
    num_clients: int,
    classes_per_client: int,
    train_per_class: int,
    test_per_class: int,
    seed: int,
) -> Partition:
    """Each client gets ``classes_per_client`` distinct classes, with ``train_per_class`` train
    and ``test_per_class`` test samples of each.

    Classes are dealt so that every class serves as many clients as any other, give or take one:
    each client takes the least-used classes, ties broken at random. This keeps the class
    combinations varied (unlike a fixed round-robin, which repeats the same few pairs).
    """
    _check_int("num_clients", num_clients, 1)
    _check_int("train_per_class", train_per_class, 1)
    _check_int("test_per_class", test_per_class, 1)
    _check_int("seed", seed, None)
    train = _labels(train_labels, "train_labels")
    test = _labels(test_labels, "test_labels")
    num_classes = _num_classes(train, test)
    _check_int("classes_per_client", classes_per_client, 1)
    if classes_per_client > num_classes:
        raise ValueError(
            f"classes_per_client={classes_per_client} exceeds the {num_classes} classes of the labels"
        )
    rng = np.random.default_rng(seed)

    usage = np.zeros(num_classes, dtype=np.int64)
    client_classes = []
    for _ in range(num_clients):
        order = np.lexsort((rng.random(num_classes), usage))
        chosen = np.sort(order[:classes_per_client])
        usage[chosen] += 1
        client_classes.append(chosen)

    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for k, classes in enumerate(client_classes):
        counts[k, classes] = 1
    train_idx = _deal_per_class(train, counts * train_per_class, "train", "train_per_class", rng)
    test_idx = _deal_per_class(test, counts * test_per_class, "test", "test_per_class", rng)
    spec = {"kind": "pathological", "num_clients": int(num_clients),
            "classes_per_client": int(classes_per_client), "train_per_class": int(train_per_class),
            "test_per_class": int(test_per_class), "seed": int(seed)}
    return Partition("", "pathological", spec, num_classes, train_idx, test_idx)


def dirichlet_partition(
    train_labels: LabelArray,
    test_labels: LabelArray,
    *,
    num_clients: int,
    alpha: float,
    seed: int,
    min_train_per_client: int = 10,
    test_per_client: int | None = None,
    train_per_client: int | None = None,
) -> Partition:
    """Label skew: every class's train samples are split over clients by proportions ~ Dir(alpha).

    All train samples are dealt, or, with ``train_per_client``, a class-balanced random pool of
    ``num_clients * train_per_client`` of them (CPU-sized studies; client sizes then vary around
    ``train_per_client`` as the Dirichlet draws make them); the draw is repeated until every client has at least
    ``min_train_per_client``. Each client's test split has its train split's class proportions,
    drawn disjointly from the test split: ``test_per_client`` samples if given, else the same
    fraction of its train size for every client, as large as the test split allows.
    """
    _check_int("num_clients", num_clients, 1)
    _check_int("min_train_per_client", min_train_per_client, 0)
    _check_int("seed", seed, None)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0 < alpha < np.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    for name, cap in (("test_per_client", test_per_client), ("train_per_client", train_per_client)):
        if cap is not None:
            _check_int(name, cap, 1)
    train = _labels(train_labels, "train_labels")
    test = _labels(test_labels, "test_labels")
    num_classes = _num_classes(train, test)
    if num_clients * min_train_per_client > len(train):
        raise ValueError(
            f"min_train_per_client={min_train_per_client} x num_clients={num_clients} exceeds the "
            f"{len(train)} train samples"
        )
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(train == c)) for c in range(num_classes)]
    if train_per_client is not None:
        pool = num_clients * train_per_client
        if pool > len(train):
            raise ValueError(f"train_per_client={train_per_client} x num_clients={num_clients} exceeds the "
                             f"{len(train)} train samples")
        sizes = np.array([len(idx) for idx in by_class], dtype=float)
        take = _largest_remainder(sizes / sizes.sum(), pool)
        by_class = [idx[:k] for idx, k in zip(by_class, take, strict=True)]
    train_counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for _ in range(_MAX_DIRICHLET_TRIES):
        for c, idx in enumerate(by_class):
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            train_counts[:, c] = _largest_remainder(props, len(idx))
        if train_counts.sum(axis=1).min() >= min_train_per_client:
            break
    else:
        raise ValueError(
            f"after {_MAX_DIRICHLET_TRIES} Dir(alpha={alpha}) draws some client still had fewer than "
            f"min_train_per_client={min_train_per_client} train samples: lower min_train_per_client, "
            f"raise alpha or use fewer clients"
        )
    train_idx = _deal_counts(by_class, train_counts)

    test_by_class = [rng.permutation(np.flatnonzero(test == c)) for c in range(num_classes)]
    available = np.array([len(i) for i in test_by_class])
    if test_per_client is not None:
        # a client left without train samples (min_train_per_client=0) gets no test samples either
        test_counts = np.stack([
            _largest_remainder(row / row.sum(), test_per_client) if row.sum() else np.zeros_like(row)
            for row in train_counts
        ])
        need = test_counts.sum(axis=0)
        short = np.flatnonzero(need > available)
        if short.size:
            c = int(short[0])
            raise ValueError(
                f"test_per_client={test_per_client} is too large: class {c} needs {int(need[c])} test "
                f"samples over all clients but the test split has {int(available[c])}"
            )
    else:
        # one fraction for all clients and classes keeps every client's test/train ratio alike
        dealt = train_counts.sum(axis=0)
        ratio = min((available[c] / dealt[c] for c in range(num_classes) if dealt[c]), default=0.0)
        test_counts = np.floor(train_counts * ratio + 1e-9).astype(np.int64)
    test_idx = _deal_counts(test_by_class, test_counts)
    spec = {"kind": "dirichlet", "num_clients": int(num_clients), "alpha": float(alpha),
            "min_train_per_client": int(min_train_per_client), "test_per_client": _opt_int(test_per_client),
            "seed": int(seed)}
    if train_per_client is not None:
        # only when set, so partitions saved before this option keep their key
        spec["train_per_client"] = int(train_per_client)
    return Partition("", "dirichlet", spec, num_classes, train_idx, test_idx)


def domain_partition(
    train_domains: LabelArray,
    test_domains: LabelArray,
    *,
    num_clients: int,
    seed: int,
    train_per_client: int | None = None,
    test_per_client: int | None = None,
) -> Partition:
    """Feature shift: client ``k`` holds samples of domain ``sorted(domains)[k % num_domains]``.

    Clients of the same domain split its (shuffled) samples evenly and disjointly; the optional
    caps keep at most that many train / test samples per client.
    """
    _check_int("num_clients", num_clients, 1)
    _check_int("seed", seed, None)
    for name, cap in (("train_per_client", train_per_client), ("test_per_client", test_per_client)):
        if cap is not None:
            _check_int(name, cap, 1)
    train = _labels(train_domains, "train_domains")
    test = _labels(test_domains, "test_domains")
    domains = np.unique(train)
    if num_clients < len(domains):
        raise ValueError(
            f"num_clients={num_clients} is less than the {len(domains)} domains of train_domains"
        )
    missing = np.setdiff1d(domains, np.unique(test))
    if missing.size:
        raise ValueError(f"test_domains has no samples of domain(s) {missing.tolist()}")
    rng = np.random.default_rng(seed)
    client_domain = [int(domains[k % len(domains)]) for k in range(num_clients)]
    train_idx: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    test_idx: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for d in domains:
        members = [k for k in range(num_clients) if client_domain[k] == d]
        splits = ((train, train_idx, train_per_client), (test, test_idx, test_per_client))
        for split_labels, out, cap in splits:
            pool = rng.permutation(np.flatnonzero(split_labels == d))
            for k, part in zip(members, np.array_split(pool, len(members)), strict=True):
                out[k] = np.sort(part[:cap] if cap is not None else part)
    spec = {"kind": "domain", "num_clients": int(num_clients), "train_per_client": _opt_int(train_per_client),
            "test_per_client": _opt_int(test_per_client), "seed": int(seed)}
    return Partition("", "domain", spec, 0, train_idx, test_idx)


_PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "pathological": pathological_partition,
    "dirichlet": dirichlet_partition,
    "domain": domain_partition,
}
PARTITION_KINDS = tuple(_PARTITIONERS)


def make_partition(
    dataset: str, kind: str, train_labels: LabelArray, test_labels: LabelArray, *, seed: int, **params: Any
) -> Partition:
    """Partition ``dataset`` with the partitioner of ``kind`` and the keyword ``params``.

    For ``kind="domain"``, ``train_labels`` / ``test_labels`` are the per-sample domain ids.

    Raises:
        ValueError: unknown ``kind``, a parameter ``kind`` does not take, or a bad value.
    """
    if kind not in _PARTITIONERS:
        raise ValueError(f"unknown partition kind {kind!r}: expected one of {', '.join(PARTITION_KINDS)}")
    fn = _PARTITIONERS[kind]
    # the label arrays are positional and the seed has its own keyword: neither comes via params
    fixed = {"train_labels", "test_labels", "train_domains", "test_domains", "seed"}
    accepted = [p for p in inspect.signature(fn).parameters if p not in fixed]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"partition kind {kind!r} takes no parameter(s) {unknown}; it takes {accepted}")
    partition = fn(train_labels, test_labels, seed=seed, **params)
    partition.dataset = dataset
    return partition


# ---------------------------------------------------------------- helpers


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
    """One client's index list from JSON as a 1-D int64 array."""
    arr = np.asarray(value, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("an index list is not a flat list of integers")
    return arr


def _largest_remainder(props: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``props`` that sum exactly to ``total`` (Hamilton's method)."""
    raw = props * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        # stable sort: equal remainders go to the lower client index, which keeps this deterministic
        counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
    return counts


def _deal_counts(by_class: Sequence[np.ndarray], counts: np.ndarray) -> list[np.ndarray]:
    """Give client k ``counts[k, c]`` consecutive samples of each (shuffled) class pool ``c``."""
    starts = np.vstack([np.zeros((1, counts.shape[1]), dtype=np.int64), np.cumsum(counts, axis=0)])
    out = []
    for k in range(counts.shape[0]):
        parts = [by_class[c][starts[k, c]:starts[k + 1, c]] for c in range(counts.shape[1])]
        out.append(np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64))
    return out


def _deal_per_class(
    labels: np.ndarray, counts: np.ndarray, split: str, param: str, rng: np.random.Generator
) -> list[np.ndarray]:
    """:func:`_deal_counts` from shuffled per-class pools, after checking each pool is big enough."""
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(counts.shape[1])]
    need = counts.sum(axis=0)
    for c in range(counts.shape[1]):
        if need[c] > len(by_class[c]):
            holders = int((counts[:, c] > 0).sum())
            raise ValueError(
                f"not enough {split} samples of class {c}: {holders} clients x {param}="
                f"{int(counts[:, c].max())} need {int(need[c])}, the {split} split has {len(by_class[c])}"
            )
    return _deal_counts(by_class, counts)


def _jsonable(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python ones, so it serializes canonically."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
