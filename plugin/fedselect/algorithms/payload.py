"""Wire format of a client upload, and its honest size in bytes.

An upload is a plain dict (FedML's cross-silo path pickles it intact; a nested OrderedDict
would break the server's ``.to(device)`` step):

    {"client_id": int, "num_samples": int,
     "tensors": {name: tensor},            # whole tensors with nothing personal
     "partial": {name: 1-D tensor},        # only the shared entries of a partly personal tensor
     "masks":   {name: (uint8 bits, shape)}}  # bit-packed personal mask of each partial tensor

Fully personal tensors are not sent at all. The size counted is what is in the dict: values
plus mask bits, so sparse and personalized methods are charged for exactly what they send.

In single-process simulation nothing is encoded: a client hands the server a
:class:`LocalUpload` (its live state and mask), the server adds it to its running average at
once, and the bytes are counted by :func:`upload_nbytes`, the size rule of :func:`payload_nbytes`
applied to what :func:`encode_upload` would have built (tested equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedselect.core.masks import PackedTensor, pack_mask, unpack_mask


def encode_upload(state: Mapping[str, torch.Tensor], personal_mask: Mapping[str, torch.Tensor], *,
                  client_id: int, num_samples: int) -> dict[str, Any]:
    """Build the upload of ``state`` under ``personal_mask`` (True = personal, stays home)."""
    tensors: dict[str, torch.Tensor] = {}
    partial: dict[str, torch.Tensor] = {}
    partial_masks: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        mask = personal_mask.get(name)
        if mask is None or not bool(mask.any()):
            tensors[name] = value.detach().clone()
        elif not bool(mask.all()):
            partial[name] = value.detach()[~mask].clone()
            partial_masks[name] = mask
    return {"client_id": client_id, "num_samples": num_samples, "tensors": tensors, "partial": partial,
            "masks": pack_mask(partial_masks) if partial_masks else {}}


@dataclass(frozen=True)
class LocalUpload:
    """A simulated client's upload, not encoded: live references to its state and mask.

    Valid only until the next client writes the shared module, so the server consumes it at once
    (:meth:`fedselect.algorithms.server.FedAvgServer.add_local_upload`). ``state`` holds the tensors the
    upload covers; ``personal_mask`` the client's mask (True = personal) for any of them;
    ``personal_counts`` the number of personal entries per masked tensor.
    """

    client_id: int
    num_samples: int
    state: Mapping[str, torch.Tensor]
    personal_mask: Mapping[str, torch.Tensor]
    personal_counts: Mapping[str, int]

    def kind(self, name: str) -> str:
        """'whole' (sent as is), 'partial' (shared entries and mask sent) or 'personal' (not sent)."""
        count = self.personal_counts.get(name, 0) if name in self.personal_mask else 0
        if count == 0:
            return "whole"
        return "personal" if count == self.state[name].numel() else "partial"


def upload_nbytes(upload: LocalUpload) -> int:
    """Bytes of the payload :func:`encode_upload` would build for ``upload``, by :func:`payload_nbytes`'s rule.

    Client id and sample count 8 bytes each; a whole tensor its values; a partial tensor its shared
    values, its packed mask bits (ceil(numel / 8)) and 8 bytes per dimension of the mask's shape.
    """
    total = 16
    for name, value in upload.state.items():
        kind = upload.kind(name)
        if kind == "whole":
            total += value.numel() * value.element_size()
        elif kind == "partial":
            shared = value.numel() - upload.personal_counts[name]
            total += shared * value.element_size() + (value.numel() + 7) // 8 + 8 * value.dim()
    return total


UPLOAD_KEYS = frozenset({"client_id", "num_samples", "tensors", "partial", "masks"})


def validate_upload(payload: Mapping[str, Any], reference: Mapping[str, torch.Tensor]) -> None:
    """Check an upload's structure, types, shapes, mask sizes and finiteness without building full tensors.

    Raises ValueError naming what is wrong: top-level keys other than :data:`UPLOAD_KEYS`, a client
    id or sample count that is not a positive integer, a value that is not a dense tensor, unknown names,
    a dtype or shape other than the global model's, a mask whose shared count differs from the
    values sent, NaN/Inf among the shared values. Nothing an upload holds is averaged in unless
    it is exactly what :func:`encode_upload` would build for this model.
    """
    _check_structure(payload)
    partial = payload["partial"]
    for name, value in payload["tensors"].items():
        ref = _reference(reference, name)
        _check_tensor(name, value, ref, tuple(ref.shape))
    for name, flat in partial.items():
        ref = _reference(reference, name)
        packed = payload["masks"][name]
        # a PackedTensor (the only tuple type the wire restores), so .bits/.shape below cannot fail
        if not (isinstance(packed, PackedTensor) and _plain(packed.bits) and packed.bits.dtype == torch.uint8):
            raise ValueError(f"mask of '{name}' is not a bit-packed mask (uint8 bits in a dense tensor)")
        if packed.bits.numel() != (ref.numel() + 7) // 8:
            raise ValueError(f"mask of '{name}' has {packed.bits.numel()} bytes, the tensor needs "
                             f"{(ref.numel() + 7) // 8}")
        if tuple(packed.shape) != tuple(ref.shape):
            raise ValueError(f"mask of '{name}' has shape {tuple(packed.shape)}, the global model has "
                             f"{tuple(ref.shape)}")
        shared = int((~unpack_mask({name: packed})[name]).sum())
        if isinstance(flat, torch.Tensor) and (flat.dim() != 1 or flat.numel() != shared):
            raise ValueError(f"tensor '{name}' sends {flat.numel()} shared values, its mask shares {shared}")
        _check_tensor(name, flat, ref, (shared,))


def _check_structure(payload: Any) -> None:
    """The upload's top level: exactly the keys :func:`encode_upload` writes, with their types."""
    if not isinstance(payload, Mapping) or "tensors" not in payload:
        raise ValueError("upload is not a fedselect payload (missing 'tensors')")
    extra, missing = sorted(map(str, set(payload) - UPLOAD_KEYS)), sorted(UPLOAD_KEYS - set(payload))
    if extra or missing:
        raise ValueError(f"upload has unexpected keys {extra} and lacks keys {missing}: its top-level keys must be "
                         f"exactly {sorted(UPLOAD_KEYS)}, got {sorted(map(str, payload))}")
    for key in ("client_id", "num_samples"):
        value = payload.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "client_id" else 1):
            raise ValueError(f"upload's '{key}' must be a {'non-negative' if key == 'client_id' else 'positive'} "
                             f"integer, got {value!r}")
    for key in ("tensors", "partial", "masks"):
        if not isinstance(payload[key], Mapping):
            raise ValueError(f"upload's '{key}' must be a mapping of tensor names, got {type(payload[key]).__name__}")
    if set(payload["masks"]) != set(payload["partial"]):
        raise ValueError("upload's partial tensors and masks name different tensors")


def _check_tensor(name: str, value: Any, ref: torch.Tensor, shape: tuple[int, ...]) -> None:
    """One sent value: a tensor of the global model's dtype, the expected shape, finite."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"'{name}' is a {type(value).__name__}, not a tensor")
    if not _plain(value):  # sparse or meta tensors travel too, and would fail the checks below unnamed
        raise ValueError(f"tensor '{name}' is a {value.layout} tensor on {value.device}, the global model's is a "
                         f"{ref.layout} tensor")
    if value.dtype != ref.dtype:
        raise ValueError(f"tensor '{name}' has dtype {value.dtype}, the global model has {ref.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)}, the global model has {shape}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"non-finite values in '{name}'")


def _plain(value: Any) -> bool:
    """A dense tensor with its values (not sparse, quantized or on the meta device)."""
    return (isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta
            and not value.is_quantized)


def decode_tensor(payload: Mapping[str, Any], name: str, reference: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Full-shape values and shared mask (True = shared) of one tensor of a validated upload.

    None when the client did not send the tensor (all of it is personal). Personal entries of a
    partial tensor are NaN: a server that read them by mistake would poison the average.
    """
    if name in payload["tensors"]:
        return (payload["tensors"][name].to(reference.device),
                torch.ones(reference.shape, dtype=torch.bool, device=reference.device))
    if name in payload.get("partial", {}):
        personal = unpack_mask({name: payload["masks"][name]}, device=reference.device)[name]
        full = torch.full(reference.shape, float("nan"), dtype=reference.dtype, device=reference.device)
        full[~personal] = payload["partial"][name].to(device=reference.device, dtype=reference.dtype)
        return full, ~personal
    return None


def _reference(reference: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in reference:
        raise ValueError(f"upload has tensor '{name}' that the global model lacks")
    return reference[name]


def payload_nbytes(obj: Any) -> int:
    """Bytes of the tensors, byte strings and numbers in a (nested) payload."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, Mapping):
        return sum(payload_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_nbytes(v) for v in obj)
    if isinstance(obj, (int, float)):
        return 8
    return 0
