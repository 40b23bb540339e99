"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new one, never half.

The one way the package writes a file that others read while it may be rewritten (run records,
checkpoints, partitions, dataset caches, analysis outputs): write a temporary sibling, flush and
fsync it, then ``os.replace`` it onto the target (atomic on POSIX and Windows within one
filesystem, hence the sibling). The temporary name, ``.<name>.<pid>.<random>.tmp``, is unique per
writer and opened exclusively, so parallel writers never share one; unlike ``mkstemp`` the file
gets the usual umask permissions, so shared results stay readable. A failed write removes its
temporary file; one left by a killed process matches :func:`temporary_glob`.

A leaf module: the standard library only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_glob(path: str | os.PathLike) -> str:
    """The glob (relative to ``path``'s folder) matching temporary files of writes to ``path``."""
    return f".{Path(path).name}.*.tmp"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8",
                  fsync: bool = True) -> Iterator[IO[Any]]:
    """``with atomic_writer(path, "wb") as fh: torch.save(obj, fh)``: ``path`` appears once the block ends.

    ``mode``: ``"w"`` (text, ``encoding``) or ``"wb"``. Missing parent folders are created. If the
    block raises, ``path`` is left as it was. ``fsync``: force the data to disk before the rename
    (so a power loss cannot leave an empty file under the new name).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target)
    try:
        if mode == "wb":
            fh: IO[Any] = open(tmp, "xb")  # noqa: SIM115 -- closed below, before the rename
        else:
            fh = open(tmp, "x", encoding=encoding)  # noqa: SIM115
        with fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w", encoding=encoding, fsync=fsync) as fh:
        fh.write(text)
