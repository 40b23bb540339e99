"""Any timm model by name (``model: {name: "timm:NAME", weights: FILE}``).

The model is ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)`` (plus
``img_size`` for models that take it, e.g. ViTs, so their position embeddings fit the data), so the
head is built for the dataset's classes. Weights never come from timm's downloads: ``weights: null``
(or ``none``) is random init, seeded by the caller; a file is a state dict (``torch.save``'d or
``.safetensors``, e.g. ``model.safetensors`` of a timm Hub folder) loaded by
:func:`fedselect.models.load_weights`, whose head tensors are dropped when their class count differs.

Layer groups use timm's own grouping, the one its layer-wise learning-rate decay uses:
``model.group_matcher(coarse=False)`` applied by ``timm.models.group_parameters`` orders the
parameters into groups input -> output: the stem first, then one group per block (per stage where
the model's matcher is stage-level, e.g. ResNets), and the parameters no rule matches (the
classifier and whatever feeds only it) last. Here the first group is ``stem`` (frozen by layer
selection), the last, which holds ``model.get_classifier()``, is ``head``, and the rest are block
groups named by their common module path (``layer1``, ``blocks.3``, ``stages.1.blocks.0``). Where
timm's matcher merges a final norm into the last block (ViTs) or a 1x1 conv into the head
(MobileNetV3), the merged parameters go with that group. A model without ``group_matcher`` gets
one group per top-level child module (a ``Sequential``/``ModuleList`` child split into its
entries), the first as stem, the classifier as head.

timm is imported inside the builder: it costs seconds, which a run with another model should not pay.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from fedselect.models.groups import GroupSpec, register_layer_groups, spec_from_assignment
from fedselect.options import ConfigError

__all__ = ["ARCH", "PREFIX", "build_timm", "timm_group_spec", "timm_input_stats"]

PREFIX = "timm:"
ARCH = "timm"
"""The ``fedselect_arch`` of models built here."""

_SPEC_CACHE = "_fedselect_group_spec"


def _timm() -> Any:
    import timm  # slow import (see the module docstring)

    return timm


def _module_path(names: list[str]) -> str:
    """Longest common module path of parameter names (their last component dropped)."""
    paths = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _block_name(names: list[str], index: int, used: set[str]) -> str:
    """A block group's name: its common module path, else that of the params under its first top-level module."""
    top = names[0].split(".", 1)[0]
    for candidate in (_module_path(names), _module_path([n for n in names if n.split(".", 1)[0] == top])):
        if candidate and candidate not in ("stem", "head") and candidate not in used:
            return candidate
    return f"group.{index}"


def _matcher_groups(model: nn.Module) -> list[list[str]] | None:
    """timm's ordered parameter groups, or None when the model has no ``group_matcher``."""
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return None
    try:
        grouped = _timm().models.group_parameters(model, matcher(coarse=False))
    except NotImplementedError:
        return None
    return [grouped[key] for key in sorted(grouped)]


def _child_groups(model: nn.Module) -> list[list[str]]:
    """One group per top-level child (containers split into their entries), in registration order."""
    groups: dict[str, list[str]] = {}
    containers = {name for name, child in model.named_children() if isinstance(child, (nn.Sequential, nn.ModuleList))}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in containers and len(parts) > 2 else parts[0]
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def timm_group_spec(model: nn.Module) -> tuple[GroupSpec, ...]:
    """stem, block groups, head from timm's own grouping (see the module docstring); cached on the model."""
    cached = model.__dict__.get(_SPEC_CACHE)
    if cached is not None:
        return cached
    groups = _matcher_groups(model) or _child_groups(model)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = {f"{m}.{p}" if m else p for m, module in model.named_modules() if module is classifier
            for p, _ in module.named_parameters()}
    if not head or head & set(groups[-1]):
        head |= set(groups[-1])
        groups = groups[:-1]
    body = [names for names in ([n for n in group if n not in head] for group in groups) if names]
    assignment = dict.fromkeys(head, "head")
    order: list[str] = []
    for index, names in enumerate(body):
        name = "stem" if index == 0 else _block_name(names, index, set(order))
        order.append(name)
        assignment.update(dict.fromkeys(names, name))
    order.append("head")
    roles = {g: "stem" if g == "stem" else "head" if g == "head" else "block" for g in order}
    spec = spec_from_assignment(model, assignment, order, roles)
    model.__dict__[_SPEC_CACHE] = spec
    return spec


register_layer_groups(ARCH, timm_group_spec)


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, _timm().list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else ""
    return ConfigError(f"config key 'model.name' unknown timm model {name!r}{hint} (timm.list_models() lists them all)")


def build_timm(name: str, num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """``timm.create_model(name)`` with random init and a head of ``num_classes`` (see the module docstring).

    Raises:
        ConfigError: timm has no model ``name`` (close matches listed).
    """
    timm = _timm()
    if not name or not timm.is_model(name):
        raise _unknown(name)
    options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    try:
        model = timm.create_model(name, img_size=image_size, **options)
    except TypeError as exc:  # CNNs take no img_size (their global pooling fits any size)
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **options)
    model.fedselect_arch = ARCH
    return model


def timm_input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) of timm's pretrained config for ``name`` (what timm-trained weights expect), if any."""
    try:
        cfg = _timm().models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        return None
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if mean is None or std is None:
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
