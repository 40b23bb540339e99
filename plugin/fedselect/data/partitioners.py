"""The partitioners: pathological (FedRep / FedSelect), Dirichlet label skew, domains.

Every partitioner draws from one ``numpy.random.Generator`` seeded with ``seed``, so the same
labels, parameters and seed always give the same partition, on any machine (see
:mod:`fedselect.data.partition` for the :class:`Partition` they return).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .partition import LabelArray, Partition, _check_int, _labels, _num_classes, _opt_int

# resampling Dir(alpha) until every client has enough samples: a bound so that an infeasible
# request fails with a message instead of looping forever
_MAX_DIRICHLET_TRIES = 1000


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
    test_counts = _dirichlet_test_counts(train_counts, np.array([len(i) for i in test_by_class]), test_per_client)
    test_idx = _deal_counts(test_by_class, test_counts)
    spec = {"kind": "dirichlet", "num_clients": int(num_clients), "alpha": float(alpha),
            "min_train_per_client": int(min_train_per_client), "test_per_client": _opt_int(test_per_client),
            "seed": int(seed)}
    if train_per_client is not None:
        # only when set, so partitions saved before this option keep their key
        spec["train_per_client"] = int(train_per_client)
    return Partition("", "dirichlet", spec, num_classes, train_idx, test_idx)

def _dirichlet_test_counts(train_counts: np.ndarray, available: np.ndarray, test_per_client: int | None) -> np.ndarray:
    """Clients x classes test counts following each client's train proportions (see dirichlet_partition)."""
    num_classes = train_counts.shape[1]
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
    return test_counts


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
    # the same split over the values of a named data column (the loader turns them into domain ids)
    "column": domain_partition,
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
