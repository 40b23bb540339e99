"""Why ``torch.load(weights_only=True)`` could not read a file, in fedselect's words.

torch's own messages for a refused file begin with advice to re-run ``torch.load`` with
``weights_only=False``: that executes whatever the file holds, which is never the right move for a
checkpoint, cache, weights file or wire message that fedselect refused. Every place that surfaces a
``torch.load`` failure (dataset caches, run checkpoints, weights files, wire messages) words it with
:func:`load_failure` instead, which never repeats torch's text around the reason.

Imports nothing heavy: callers pass the exception they caught.
"""

from __future__ import annotations

import re

__all__ = ["load_failure"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_OPERAND = re.compile(r"Unsupported operand (\d+)")


def load_failure(exc: BaseException) -> str:
    """A one-line reason for a failed ``torch.load(..., weights_only=True)``, without torch's advice."""
    text = str(exc)
    found = _GLOBAL.search(text)
    if found:
        return (f"it holds a Python object of type {found.group(1)}, and only tensors and plain containers are "
                "read (loading anything else could run code from the file)")
    if _OPERAND.search(text) or "WeightsUnpickler" in text or "Weights only load failed" in text:
        return "it is not a file torch.save wrote with tensors and plain containers only (unreadable or foreign bytes)"
    if "PytorchStreamReader" in text or "zip archive" in text or "central directory" in text:
        return "it is truncated or corrupt (its zip archive cannot be read)"
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "it is empty or truncated"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if "weights_only" in first:  # any other wording of torch's advice: never pass it on
        return f"torch cannot read it ({type(exc).__name__})"
    return f"{type(exc).__name__}: {first[:300]}"
