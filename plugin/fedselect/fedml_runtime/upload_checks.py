"""What the cross-silo server checks in an upload message before the algorithm's server sees it.

The payload itself (its keys, tensors, dtypes, shapes, masks, finiteness) is checked by
:func:`fedselect.algorithms.payload.validate_upload` when the server adds it; here the message
around it: the metadata JSON, that the upload speaks for the client whose certificate sent it, and
that it claims the sample count that client joined with. Every failure is a ``ValueError`` naming
the field and both values; the server manager turns it into a rejection under
``train.on_bad_update`` (:class:`~fedselect.algorithms.server.BadUpdateError` or a dropped update).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

META_KEYS = frozenset({"train_loss", "download_nbytes", "metrics"})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    """A positive integer (a bool or a float, even 40.0, is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_meta(text: Any) -> dict[str, Any]:
    """The upload's metadata: a JSON object with exactly :data:`META_KEYS`, numbers where numbers go."""
    try:
        meta = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"upload metadata is not JSON text ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or set(meta) != META_KEYS:
        got = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"upload metadata must have exactly the keys {sorted(META_KEYS)}, got {got}")
    if not _number(meta["train_loss"]):  # NaN/Inf are numbers: the round's mean skips them
        raise ValueError(f"upload metadata 'train_loss' must be a number, got {meta['train_loss']!r}")
    nbytes = meta["download_nbytes"]
    if not (isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes >= 0):
        raise ValueError(f"upload metadata 'download_nbytes' must be an integer >= 0, got {nbytes!r}")
    metrics = meta["metrics"]
    if not isinstance(metrics, dict) or not all(_number(v) for v in metrics.values()):
        raise ValueError(f"upload metadata 'metrics' must map names to numbers, got {str(metrics)[:200]}")
    return meta


def check_sender(payload: Any, num_samples: Any, *, client_id: int, joined_with: int, certified: bool) -> float:
    """The upload's averaging weight, once it is known to speak for ``client_id`` (the sender) with
    the sample count it joined with (in the message and in the payload)."""
    sender = f"client {client_id} (rank {client_id + 1}, {'its certificate' if certified else 'as it claims'})"
    if not isinstance(payload, Mapping):
        raise ValueError(f"upload is a {type(payload).__name__}, not a fedselect payload; sent by {sender}")
    claimed = payload.get("client_id")
    if isinstance(claimed, bool) or claimed != client_id:
        raise ValueError(f"upload's 'client_id' is {claimed!r}, but it was sent by {sender}")
    for where, value in (("message", num_samples), ("payload", payload.get("num_samples"))):
        if not _count(value) or value != joined_with:
            raise ValueError(f"upload's 'num_samples' ({where}) is {value!r}, but {sender} joined with "
                             f"{joined_with} training samples")
    return float(num_samples)
