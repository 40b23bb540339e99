"""Keep freed memory in the process on CPU runs, so that a round's large temporaries cost no page faults.

PyTorch's CPU tensors come from glibc's ``malloc``. By default glibc serves blocks of more than
128 KiB (a threshold that adapts up to 32 MiB) with a fresh ``mmap`` and hands the pages back to
the system when they are freed, and trims the heap's free top above 128 KiB. A simulated round
allocates and frees the same multi-megabyte temporaries for every client (masked selections, the
server's float64 sums, growth scores), so each one is faulted in page by page again. With
ResNet-18's 11 M entries that fault-in made a fresh ``where_fill`` cost 46 ms instead of 18, and
the server's sum of one upload 225 ms instead of 112 (bench/README.md, "CPU, 2026-11-27, second
pass").

The runner calls :func:`keep_freed_memory` for CPU runs (``engine.configure_device``). It raises
both thresholds through ``mallopt``: blocks up to 32 MiB (the largest glibc allows) come from the
heap and are reused, and the heap gives its free top back only above 256 MiB. Values and bits are
unaffected. The price is that the process keeps what it freed, up to its peak
(``bench/fedselect_memory.py`` measures the peak). On a C library without ``mallopt`` (macOS, musl)
nothing changes. ``FEDSELECT_KEEP_FREED_MEMORY=0`` turns it off (``1``, the default, on; any other
value is a :class:`fedselect.options.ConfigError` naming the variable).
"""

from __future__ import annotations

import ctypes
import os

from fedselect.options import ConfigError

__all__ = ["ENV", "keep_freed_memory"]

ENV = "FEDSELECT_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit for this parameter on 64-bit systems
_TRIM_THRESHOLD = 256 * 1024 * 1024
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True when they are in force."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def _set_thresholds() -> bool:
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ConfigError(f"environment variable {ENV} must be 0 (off) or 1 (on), got {value!r}")
    if value == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; once set, glibc stops adapting the thresholds itself
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
