"""Text datasets as token-id tensors: the multi-domain Amazon reviews (Blitzer, Dredze & Pereira, 2007).

Layout under the data root (see :func:`fedselect.data.sources.resolve_data_root`)::

    <root>/amazon-reviews/<domain>/{positive,negative}.review

Every domain folder holding both files is a domain (books, dvd, electronics, kitchen_housewares
in the released set); domain ids follow the sorted folder names. The files are pseudo-XML in
latin-1: the text of a review is the lines between a ``<review_text>`` line and the next
``</review_text>`` line. HTML entities (``&quot;``) are unescaped, and the sequence ``ï¿½`` (the
UTF-8 bytes of U+FFFD read as latin-1, left where the original character was lost) becomes U+FFFD,
which the BERT tokenizer drops instead of spelling out three junk characters.

Train/test split: fixed and independent of the run seed, so every method and seed evaluates on
the same test pool. Within each (domain, label) file, every 5th review in file order (positions
4, 9, 14, ...) goes to test: 20%, i.e. 1600 train and 400 test reviews per domain of 2000.

Reviews are tokenized once with the MiniLM tokenizer (truncated and padded to ``max_length``) and
the int64 tensors are cached in the cache folder, keyed on the review files' sizes and mtimes,
the tokenizer files' content, ``max_length`` and the split rule. Nothing is written next to the data.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedselect.dataset_names import TEXT_ALIASES, TEXT_DATASETS
from fedselect.load_errors import load_failure

from .sources import DataCacheError, DataNotFoundError, default_cache_dir, resolve_data_root, save_cache_blob

__all__ = [
    "AMAZON_FOLDER",
    "DEFAULT_MAX_LENGTH",
    "TEST_EVERY",
    "TEXT_DATASETS",
    "TextData",
    "TokenTransform",
    "canonical_text_name",
    "load_text_dataset",
    "read_reviews",
]

AMAZON_FOLDER = TEXT_DATASETS["amazon_reviews"]
_TEXT_ALIASES = TEXT_ALIASES

CLASSES = ["negative", "positive"]
"""Label order: 0 = negative, 1 = positive (the file names)."""
DEFAULT_MAX_LENGTH = 128
TEST_EVERY = 5
"""Every TEST_EVERY-th review of a file (1-based) goes to test."""

# bump when the cache layout or the parsing changes, so old files are never misread
_CACHE_FORMAT = 1
_OPEN, _CLOSE = "<review_text>", "</review_text>"
_MOJIBAKE_REPLACEMENT = "\xef\xbf\xbd"  # U+FFFD's UTF-8 bytes decoded as latin-1
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TextData:
    """A whole text dataset (train and test split) as padded token ids, held in memory.

    Carries the attributes the run code reads on :class:`~fedselect.data.sources.ImageData`
    (``name``, the four tensors, ``classes``, ``source``, ``num_classes``) plus per-sample domain
    ids for the domain partition. It has no ``in_channels``/``image_size``/``mean``/``std``: the
    model builders default those, and the MiniLM builder ignores them.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str
    train_domains: torch.Tensor
    test_domains: torch.Tensor
    domains: list[str]
    pad_id: int
    max_length: int

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`classes`)."""
        return len(self.classes)


class TokenTransform:
    """The text counterpart of :class:`fedselect.engine.ImageTransform`: token ids pass unchanged.

    The engine calls ``transform(x, train=..., generator=...)`` before ``model(x)``; the model
    takes the int64 ids itself, and no augmentation is drawn (so no random numbers are used).
    """

    def __call__(self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        return x


def canonical_text_name(name: str) -> str | None:
    """The canonical text dataset name of ``name``, or None when it names no text dataset."""
    key = name.strip().lower()
    key = _TEXT_ALIASES.get(key, key)
    return key if key in TEXT_DATASETS else None


def read_reviews(path: str | os.PathLike[str]) -> list[str]:
    """The review texts of one ``.review`` file, in file order.

    Raises:
        ValueError: A ``<review_text>`` block is nested or never closed (the message names the
            file and line), or the file holds no review at all.
    """
    file = Path(path)
    texts: list[str] = []
    current: list[str] | None = None
    opened_at = 0
    with open(file, encoding="latin-1") as fh:  # latin-1 decodes every byte: never a decode error
        for number, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            tag = line.strip()
            if tag == _OPEN:
                if current is not None:
                    raise ValueError(f"{file}:{number}: {_OPEN} inside the review text opened at line {opened_at}")
                current, opened_at = [], number
            elif tag == _CLOSE:
                if current is None:
                    raise ValueError(f"{file}:{number}: {_CLOSE} without an opening {_OPEN}")
                text = html.unescape("\n".join(current).strip()).replace(_MOJIBAKE_REPLACEMENT, "\ufffd")
                texts.append(text)
                current = None
            elif current is not None:
                current.append(line)
    if current is not None:
        raise ValueError(f"{file}:{opened_at}: {_OPEN} never closed")
    if not texts:
        raise ValueError(f"{file} holds no {_OPEN} block")
    return texts


def load_text_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    domains: Sequence[str] | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
) -> TextData:
    """Load a text dataset as int64 token ids [N, max_length], with labels and domain ids.

    Args:
        name: ``amazon_reviews`` (aliases ``amazon-reviews``, ``reviews``; case-insensitive).
        root: data root (see :func:`~fedselect.data.sources.resolve_data_root`).
        download: accepted for symmetry with image datasets; this data set has no download.
        cache_dir: where token tensors are cached (see :func:`~fedselect.data.sources.default_cache_dir`).
        max_length: tokens per review after truncation and padding (2 to 512, MiniLM's limit).
        domains: the domain folders to use (default: all); domain ids follow their sorted names.
        tokenizer_path: a Hugging Face tokenizer folder (default: the installed MiniLM's).

    Raises:
        DataNotFoundError: the dataset folder, a domain folder or a review file is missing.
        DataCacheError: a cache file for this exact source exists but is unreadable.
        ValueError: unknown name, bad ``max_length`` or ``domains``, or a malformed review file.
    """
    cname = canonical_text_name(name)
    if cname is None:
        raise ValueError(f"unknown text dataset {name!r}: expected one of {', '.join(sorted(TEXT_DATASETS))}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 512:
        raise ValueError(f"max_length must be an int in [2, 512], got {max_length!r}")
    folder = resolve_data_root(root) / TEXT_DATASETS[cname]
    chosen = _domain_folders(folder, domains)
    listing = [_stat(folder / d / f"{label}.review") for d in chosen for label in CLASSES]

    from fedselect.models.text import minilm_path  # models import slowly; only needed here

    tok_folder = Path(tokenizer_path).expanduser() if tokenizer_path is not None else minilm_path()
    key = _cache_key(folder, listing, tok_folder, max_length)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{cname}-T{max_length}-{key}.pt"
    if cache_file.exists():
        return read_text_cache(cache_file, cname)

    texts: list[str] = []
    labels: list[int] = []
    domain_ids: list[int] = []
    is_test: list[bool] = []
    for domain_id, domain in enumerate(chosen):
        for label, label_name in enumerate(CLASSES):
            reviews = read_reviews(folder / domain / f"{label_name}.review")
            texts.extend(reviews)
            labels.extend([label] * len(reviews))
            domain_ids.extend([domain_id] * len(reviews))
            is_test.extend((i + 1) % TEST_EVERY == 0 for i in range(len(reviews)))

    from fedselect.models.text import load_minilm_tokenizer

    tokenizer = load_minilm_tokenizer(tok_folder)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer in {tok_folder} has no pad token")
    ids = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length",
                    return_tensors="pt")["input_ids"].to(torch.int64)
    test = torch.tensor(is_test, dtype=torch.bool)
    y = torch.tensor(labels, dtype=torch.int64)
    d = torch.tensor(domain_ids, dtype=torch.int64)
    data = TextData(
        name=cname, train_x=ids[~test].contiguous(), train_y=y[~test], test_x=ids[test].contiguous(),
        test_y=y[test], classes=list(CLASSES), source=f"text:{folder.resolve()}", train_domains=d[~test],
        test_domains=d[test], domains=list(chosen), pad_id=int(tokenizer.pad_token_id), max_length=max_length,
    )
    write_text_cache(cache_file, data)
    return data


# ---------------------------------------------------------------- files


def _domain_folders(folder: Path, domains: Sequence[str] | None) -> list[str]:
    """Sorted names of the domain folders to load; every one must hold both review files."""
    if not folder.is_dir():
        raise DataNotFoundError(
            f"text dataset folder not found: {folder} (resolved: {folder.resolve()}). Expected "
            f"{folder}/<domain>/positive.review and negative.review. There is no download for this "
            f"data set: copy it there, or set the data root option or $FEDSELECT_DATA_ROOT."
        )
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if domains is None:
        chosen = [d for d in found if any((folder / d / f"{c}.review").is_file() for c in CLASSES)]
        if not chosen:
            raise DataNotFoundError(f"no domain folder with positive.review / negative.review under {folder}")
    else:
        if isinstance(domains, str) or not domains:
            raise ValueError(f"domains must be a non-empty list of folder names, got {domains!r}")
        chosen = sorted(set(domains))
        if len(chosen) != len(domains):
            raise ValueError(f"domains lists a folder twice: {list(domains)}")
        unknown = [d for d in chosen if d not in found]
        if unknown:
            raise DataNotFoundError(f"domain folder(s) {unknown} not found under {folder}; found: {found}")
    for d in chosen:
        for c in CLASSES:
            if not (folder / d / f"{c}.review").is_file():
                raise DataNotFoundError(f"review file missing: {folder / d / f'{c}.review'}")
    return chosen


def _stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return f"{path.parent.name}/{path.name}", st.st_size, st.st_mtime_ns


def _cache_key(folder: Path, listing: Sequence[tuple[str, int, int]], tok_folder: Path, max_length: int) -> str:
    """Hash of the source files' (path, size, mtime), the tokenizer files' bytes and the options."""
    h = hashlib.sha1()
    h.update(f"fedselect-text-v{_CACHE_FORMAT}\0{folder.resolve()}\0{max_length}\0{TEST_EVERY}\0".encode())
    h.update("\n".join(f"{p}\0{size}\0{mtime}" for p, size, mtime in listing).encode())
    hash_tokenizer(h, tok_folder)
    return h.hexdigest()[:16]


def hash_tokenizer(h: Any, tok_folder: Path) -> None:
    """Add the tokenizer's files to hash ``h``: its content, not its path, so a reinstalled identical
    package keeps the cache."""
    present = [f for f in _TOKENIZER_FILES if (tok_folder / f).is_file()]
    if not present:
        raise DataNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tok_folder}")
    for f in present:
        h.update(f"\0{f}\0".encode())
        h.update((tok_folder / f).read_bytes())


# ---------------------------------------------------------------- cache

_TENSORS = ("train_x", "train_y", "test_x", "test_y", "train_domains", "test_domains")


def read_text_cache(path: Path, name: str) -> TextData:
    """Read and check a cache file; anything wrong with it raises :class:`DataCacheError`."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise DataCacheError(f"cannot read the dataset cache file {path}: {load_failure(exc)}. Delete it to "
                             "rebuild it.") from None
    try:
        if not isinstance(blob, dict) or blob.get("format") != _CACHE_FORMAT or blob.get("kind") != "text":
            raise ValueError("not a fedselect text dataset cache (format mismatch)")
        tensors: dict[str, Any] = {k: blob[k] for k in _TENSORS}
        for k, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
                raise TypeError(f"{k} is not an int64 tensor")
        for split in ("train", "test"):
            x, y, d = (tensors[f"{split}_{k}"] for k in ("x", "y", "domains"))
            if x.dim() != 2 or not x.shape[0] == y.shape[0] == d.shape[0]:
                raise ValueError(f"{split} tensors differ in length or shape")
        return TextData(name=name, classes=[str(c) for c in blob["classes"]], source=str(blob["source"]),
                        domains=[str(d) for d in blob["domains"]], pad_id=int(blob["pad_id"]),
                        max_length=int(blob["max_length"]), **tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataCacheError(f"the dataset cache file {path} is malformed ({exc}). Delete it to rebuild it.") from exc


def write_text_cache(path: Path, data: TextData) -> None:
    """Write atomically (same scheme as the image cache): readers see no file or the whole file."""
    blob: dict[str, Any] = {"format": _CACHE_FORMAT, "kind": "text", "name": data.name,
                            "classes": list(data.classes), "source": data.source, "domains": list(data.domains),
                            "pad_id": data.pad_id, "max_length": data.max_length}
    blob.update({k: getattr(data, k) for k in _TENSORS})
    save_cache_blob(path, blob)
