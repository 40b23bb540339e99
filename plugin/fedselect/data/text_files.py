"""Text corpora of the user's own, read with Hugging Face ``datasets``, as token ids.

``data.dataset`` names the source (:mod:`fedselect.dataset_names`): ``csv:<file>``,
``jsonl:<file>``, ``parquet:<file>``, ``disk:<folder written by save_to_disk>`` or ``hf:<hub
name>`` (online). ``data.text_column`` and ``data.label_column`` name the columns; labels are
kept in order: ``data.labels`` if given, else the column's ``ClassLabel`` names, else its sorted
distinct values. The test split is ``data.test_file`` (csv/jsonl/parquet), a ``test`` split of a
saved or hub dataset, or else ``data.test_fraction`` of each label's rows drawn with
``data.split_seed`` (fixed, so every method and seed of a study tests on the same rows). A
``kind: column`` partition's column becomes the samples' domain ids.

Texts are tokenized once with the model's tokenizer and the int64 tensors cached like the
Amazon reviews (:mod:`fedselect.data.text`), keyed on the source files' sizes and times, the
tokenizer files' content and every option above. ``datasets`` keeps its own Arrow cache under
``<cache_dir>/hf-datasets``; nothing is written next to the data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedselect.dataset_names import TEXT_FILE_KINDS

from .sources import DataNotFoundError, default_cache_dir
from .text import TextData, hash_tokenizer, read_text_cache, write_text_cache

_FORMAT = 1


@dataclass(frozen=True)
class TextFileOptions:
    """How a corpus is read and split (the ``data`` keys of the same names)."""

    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] | None = None
    test_file: str | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    encoding: str = "utf-8"
    domain_column: str | None = None


def _source(name: str) -> tuple[str, str]:
    kind, _, rest = name.partition(":")
    kind = kind.lower()
    if kind not in TEXT_FILE_KINDS or not rest:
        raise ValueError(f"not a text corpus name: {name!r}")
    return kind, rest


def _listing(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of a file, or of every file under a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _cache_key(name: str, paths: Sequence[Path], options: TextFileOptions, tok_folder: Path, max_length: int) -> str:
    h = hashlib.sha1(f"fedselect-textfile-v{_FORMAT}\0{name}\0{max_length}\0{sorted(asdict(options).items())}"
                     .encode())
    for path in paths:
        h.update(f"\0{path.resolve()}\0{_listing(path)}".encode())
    hash_tokenizer(h, tok_folder)
    return h.hexdigest()[:16]


def _read_splits(kind: str, location: str, options: TextFileOptions, cache: Path) -> dict[str, Any]:
    """The corpus's splits as ``datasets.Dataset`` objects: {"train": ..., "test": ... (if fixed)}."""
    import datasets

    datasets.disable_progress_bars()
    hf_cache = str(cache / "hf-datasets")
    if kind == "disk":
        loaded = datasets.load_from_disk(location)
    elif kind == "hf":
        loaded = datasets.load_dataset(location, cache_dir=hf_cache)
    else:
        files = {"train": location, **({"test": options.test_file} if options.test_file else {})}
        extra = {"encoding": options.encoding} if kind in ("csv", "jsonl", "json") else {}
        loaded = datasets.load_dataset(TEXT_FILE_KINDS[kind], data_files=files, cache_dir=hf_cache, **extra)
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if "train" not in loaded:
        raise ValueError(f"dataset {kind}:{location} has no 'train' split (splits: {', '.join(loaded)})")
    return {k: loaded[k] for k in ("train", "test") if k in loaded}


def _column(split: Any, column: str, key: str, where: str) -> list[Any]:
    if column not in split.column_names:
        raise ValueError(f"config key '{key}': {where} has no column {column!r} "
                         f"(columns: {', '.join(split.column_names)})")
    return list(split[column])


def label_names(train: Any, values: Sequence[Any], options: TextFileOptions) -> list[str]:
    """The labels in order: ``data.labels``, else the column's ClassLabel names, else its sorted values."""
    if options.labels is not None:
        return list(options.labels)
    feature = train.features.get(options.label_column)
    if getattr(feature, "names", None):
        return [str(n) for n in feature.names]
    distinct = set(values)
    ordered = sorted(distinct, key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float))
                                              else str(v)))
    return [str(v) for v in ordered]


def _label_ids(values: Sequence[Any], names: list[str], *, class_label: bool, where: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        label = names[value] if class_label and isinstance(value, int) and 0 <= value < len(names) else str(value)
        if label not in index:
            raise ValueError(f"config key 'data.labels': {where} row {row} has label {label!r}, not among "
                             f"{names}")
        ids.append(index[label])
    return np.asarray(ids, dtype=np.int64)


def stratified_test_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask: ``round(fraction * n_c)`` rows of each label c, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        test[rng.permutation(rows)[: int(round(fraction * len(rows)))]] = True
    return test


def load_text_files(name: str, options: TextFileOptions, *, tokenizer_folder: str | os.PathLike[str],
                    cache_dir: str | os.PathLike[str] | None = None, max_length: int = 128) -> TextData:
    """Read, split, label and tokenize a corpus (cached); see the module docstring."""
    kind, location = _source(name)
    paths = [] if kind == "hf" else [Path(location).expanduser()]
    if options.test_file:
        paths.append(Path(options.test_file).expanduser())
    for key, path in zip(("data.dataset", "data.test_file"), paths, strict=False):
        if not path.exists():
            raise DataNotFoundError(f"config key '{key}': {path} not found (resolved: {path.resolve()})")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tok = Path(tokenizer_folder)
    short = (Path(location).stem if kind != "hf" else location.replace("/", "_")) or kind
    cache_file = cache / f"text-{kind}-{short}-T{max_length}-{_cache_key(name, paths, options, tok, max_length)}.pt"
    if cache_file.exists():
        return read_text_cache(cache_file, short)
    data = _build(kind, location, short, options, tok, cache, max_length)
    write_text_cache(cache_file, data)
    return data


def _build(kind: str, location: str, short: str, options: TextFileOptions, tok: Path, cache: Path,
           max_length: int) -> TextData:
    splits = _read_splits(kind, location, options, cache)
    train = splits["train"]
    texts = _column(train, options.text_column, "data.text_column", f"{kind}:{location}")
    raw_labels = _column(train, options.label_column, "data.label_column", f"{kind}:{location}")
    names = label_names(train, raw_labels, options)
    class_label = bool(getattr(train.features.get(options.label_column), "names", None))
    labels = _label_ids(raw_labels, names, class_label=class_label, where=f"{kind}:{location}")
    domains = (_column(train, options.domain_column, "data.partition.column", f"{kind}:{location}")
               if options.domain_column else None)
    if "test" in splits:
        test = splits["test"]
        where = options.test_file or f"{kind}:{location} (test split)"
        texts = texts + _column(test, options.text_column, "data.text_column", where)
        labels = np.concatenate([labels, _label_ids(_column(test, options.label_column, "data.label_column", where),
                                                    names, class_label=class_label, where=where)])
        if domains is not None:
            domains += _column(test, options.domain_column, "data.partition.column", where)
        is_test = np.arange(len(texts)) >= train.num_rows
    else:
        is_test = stratified_test_rows(labels, options.test_fraction, options.split_seed)
    from fedselect.models.text import load_minilm_tokenizer  # models import slowly; only needed here

    tokenizer = load_minilm_tokenizer(tok)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {tok} has no pad token")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError(f"config key 'data.text_column': column {options.text_column!r} holds non-text values")
    ids = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length",
                    return_tensors="pt")["input_ids"].to(torch.int64)
    domain_names = sorted({str(d) for d in domains}) if domains is not None else ["all"]
    domain_ids = torch.tensor([domain_names.index(str(d)) for d in domains] if domains is not None
                              else [0] * len(texts), dtype=torch.int64)
    test = torch.as_tensor(is_test)
    y = torch.as_tensor(labels)
    source = f"{kind}:{location if kind == 'hf' else Path(location).resolve()}"
    return TextData(name=short, train_x=ids[~test].contiguous(), train_y=y[~test], test_x=ids[test].contiguous(),
                    test_y=y[test], classes=names, source=source,
                    train_domains=domain_ids[~test], test_domains=domain_ids[test], domains=domain_names,
                    pad_id=int(tokenizer.pad_token_id), max_length=max_length)
