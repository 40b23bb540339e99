"""A checkpoint's plain encoding: run state as tensors and plain containers only.

Checkpoints (:mod:`.checkpoint`, :mod:`.federation_checkpoint`) are read with
``torch.load(weights_only=True)``, which accepts nothing else. PackedTensor, numpy arrays and
scalars, tuples, OrderedDicts, this package's dataclasses and accelerator tensors are written as
tagged plain dicts and turned back on reading; the global random states travel the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from fedselect.core.masks import PackedTensor

__all__ = ["decode", "encode", "rng_state", "set_rng_state"]

_KIND = "__checkpoint_kind__"


# ------------------------------------------------------------------------ plain encoding


def encode(value: Any, where: str = "state") -> Any:
    """``value`` as tensors and plain containers only (what ``weights_only`` loading accepts).

    Tensors on an accelerator are stored on the CPU, tagged to go back to the run's device.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            return {_KIND: "device_tensor", "value": tensor.cpu()}
        # a view would drag its whole base storage into the file
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        return tensor
    if isinstance(value, PackedTensor):  # before tuple: a NamedTuple is a tuple
        return {_KIND: "PackedTensor", "bits": encode(value.bits, where), "shape": [int(s) for s in value.shape]}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"cannot checkpoint {where}: numpy array of Python objects")
        data = np.ascontiguousarray(value)
        return {_KIND: "ndarray", "dtype": data.dtype.str, "shape": list(data.shape),
                "bytes": torch.from_numpy(data.reshape(-1).view(np.uint8).copy())}
    if isinstance(value, np.generic):
        return {_KIND: "npscalar", "dtype": value.dtype.str, "value": value.item()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {_KIND: "dataclass", "type": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, bool) or not isinstance(key, str | int) or key == _KIND:
                raise TypeError(f"cannot checkpoint {where}: dict key {key!r} (keys must be str or int)")
        items = {key: encode(item, f"{where}[{key!r}]") for key, item in value.items()}
        return {_KIND: "OrderedDict", "items": [[k, v] for k, v in items.items()]} if isinstance(value, OrderedDict) \
            else items
    if isinstance(value, tuple):
        return {_KIND: "tuple", "items": [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"cannot checkpoint {where}: {type(value).__qualname__} is not a tensor, PackedTensor, "
                    "numpy array, dataclass or plain container")


def _dataclass_type(name: str) -> type:
    module, _, qualname = name.partition(":")
    # only this package's dataclasses: a checkpoint must not name arbitrary code to import
    if module != "fedselect" and not module.startswith("fedselect."):
        raise TypeError(f"checkpoint names dataclass {name!r} outside the fedselect package")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise TypeError(f"checkpoint names {name!r}, which is not a dataclass")
    return obj


def decode(value: Any, device: torch.device | str = "cpu") -> Any:
    """Inverse of :func:`encode`; tagged accelerator tensors go to ``device``."""
    if isinstance(value, list):
        return [decode(item, device) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_KIND)
    if kind is None:
        return {key: decode(item, device) for key, item in value.items()}
    if kind == "device_tensor":
        return value["value"].to(device)
    if kind == "PackedTensor":
        return PackedTensor(value["bits"], tuple(value["shape"]))
    if kind == "ndarray":
        flat = value["bytes"].numpy().view(np.dtype(value["dtype"]))
        return flat.reshape(value["shape"]).copy()
    if kind == "npscalar":
        return np.dtype(value["dtype"]).type(value["value"])
    if kind == "dataclass":
        return _dataclass_type(value["type"])(**{k: decode(v, device) for k, v in value["fields"].items()})
    if kind == "OrderedDict":
        return OrderedDict((key, decode(item, device)) for key, item in value["items"])
    if kind == "tuple":
        return tuple(decode(item, device) for item in value["items"])
    raise TypeError(f"unknown tagged value {kind!r} in checkpoint")


# ---------------------------------------------------------------------------- random states


def rng_state() -> dict[str, Any]:
    """The global torch, numpy and python random states (CUDA's too once CUDA is in use)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return encode(state, "rng")


def set_rng_state(encoded: dict[str, Any]) -> None:
    state = decode(encoded)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
