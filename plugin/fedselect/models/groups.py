"""Layer groups: the units that selective fine-tuning chooses among.

A model's parameters are split into ordered groups (input -> output): one ``stem``, any number of
``block`` groups and exactly one ``head``, last. Which groups a model has is declared once per
architecture in a small registry, keyed either on the model's class or on a string the builder
stores in the model's ``fedselect_arch`` attribute (for third-party classes shared by several
architectures). Declarations are written as module-name prefixes, e.g.
``prefix_spec({"stem": ["conv1", "bn1"], "layer1": ["layer1"], "head": ["fc"]})``, and every
resolution checks that each parameter falls into exactly one group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ARCH_ATTRIBUTE",
    "ROLES",
    "GroupSpec",
    "GroupSpecSource",
    "LayerGroup",
    "body_param_names",
    "head_param_names",
    "layer_groups",
    "prefix_spec",
    "register_layer_groups",
    "resolve_groups",
    "spec_from_assignment",
]

ROLES: tuple[str, ...] = ("stem", "block", "head")
"""Allowed values of :attr:`LayerGroup.role`."""

ARCH_ATTRIBUTE = "fedselect_arch"
"""Model attribute a builder may set to a string key registered with :func:`register_layer_groups`."""


@dataclass(frozen=True)
class LayerGroup:
    """One selectable unit of a model.

    Attributes:
        name: Group name, e.g. ``"stem"``, ``"layer1.0"``, ``"head"``.
        role: ``"stem"``, ``"block"`` or ``"head"``.
        param_names: Parameter names as in ``model.named_parameters()``, in that order.
        num_params: Total number of scalar parameters in the group.
    """

    name: str
    role: str
    param_names: tuple[str, ...]
    num_params: int


@dataclass(frozen=True)
class GroupSpec:
    """Declaration of one group: the module-name prefixes whose parameters it owns."""

    name: str
    role: str
    prefixes: tuple[str, ...]


GroupSpecSource = Sequence[GroupSpec] | Callable[[nn.Module], Sequence[GroupSpec]]
"""A fixed spec, or a function computing it from the model (for depth-dependent architectures)."""

_BY_CLASS: dict[type, GroupSpecSource] = {}
_BY_ARCH: dict[str, GroupSpecSource] = {}


def prefix_spec(
    groups: Mapping[str, Sequence[str] | str], *, roles: Mapping[str, str] | None = None
) -> tuple[GroupSpec, ...]:
    """Build a group spec from an ordered mapping ``group name -> module-name prefixes``.

    Args:
        groups: Groups in input -> output order. A value may be a single prefix string. A prefix
            ``p`` owns parameter ``n`` when ``n == p`` or ``n`` starts with ``p + "."``.
        roles: Optional role per group name. Unlisted groups default to ``"stem"`` for the first,
            ``"head"`` for the last and ``"block"`` for the rest.

    Returns:
        The spec, usable with :func:`register_layer_groups` or :func:`resolve_groups`.

    Raises:
        ValueError: No groups, a group without prefixes, or a ``roles`` entry naming no group.
    """
    if not groups:
        raise ValueError("a group spec needs at least one group")
    roles = dict(roles or {})
    unknown = sorted(set(roles) - set(groups))
    if unknown:
        raise ValueError(f"roles given for unknown groups: {', '.join(unknown)}")
    names = list(groups)
    spec = []
    for index, name in enumerate(names):
        prefixes = groups[name]
        prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        if not prefixes:
            raise ValueError(f"group {name!r} has no module prefixes")
        default = "stem" if index == 0 else "head" if index == len(names) - 1 else "block"
        spec.append(GroupSpec(name=name, role=roles.get(name, default), prefixes=prefixes))
    return tuple(spec)


def spec_from_assignment(
    model: nn.Module, assignment: Mapping[str, str], order: Sequence[str], roles: Mapping[str, str]
) -> tuple[GroupSpec, ...]:
    """A group spec from a ``parameter name -> group name`` mapping computed from a model's structure.

    Each group's prefixes are the outermost modules whose parameters all belong to it (a single
    parameter name where no such module exists, e.g. a ViT's ``cls_token``), so the spec stays
    short and :func:`fedselect.models.flops.forward_flops_by_group` finds the group's modules.

    Args:
        model: The model whose ``named_parameters()`` the mapping covers.
        assignment: Group of every parameter.
        order: Group names, input -> output (head last).
        roles: Role of every group in ``order``.

    Raises:
        ValueError: A parameter without a group, or a group outside ``order``.
    """
    names = [name for name, _ in model.named_parameters()]
    unassigned = [n for n in names if n not in assignment]
    if unassigned:
        raise ValueError(f"parameter {unassigned[0]!r} was assigned no layer group")
    unknown = sorted({assignment[n] for n in names} - set(order))
    if unknown:
        raise ValueError(f"parameters assigned to groups outside the order {list(order)}: {unknown}")
    under: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            under.setdefault(".".join(parts[:depth]), set()).add(assignment[name])
    prefixes: dict[str, list[str]] = {group: [] for group in order}
    for name in names:
        parts = name.split(".")
        group = assignment[name]
        outermost = next(
            ".".join(parts[:depth]) for depth in range(1, len(parts) + 1) if under[".".join(parts[:depth])] == {group}
        )
        if outermost not in prefixes[group]:
            prefixes[group].append(outermost)
    return tuple(
        GroupSpec(name=group, role=roles[group], prefixes=tuple(prefixes[group])) for group in order if prefixes[group]
    )


def register_layer_groups(key: type | str, spec: GroupSpecSource) -> None:
    """Declare the layer groups of an architecture.

    Args:
        key: A model class (matched along the model's MRO, so subclasses inherit it) or a string
            matched against the model's ``fedselect_arch`` attribute, which takes precedence.
        spec: A spec from :func:`prefix_spec`, or a callable returning one for a given model.

    Re-registering a key replaces the previous declaration.
    """
    if isinstance(key, str):
        _BY_ARCH[key] = spec
    elif isinstance(key, type):
        _BY_CLASS[key] = spec
    else:
        raise TypeError(f"layer-group key must be a class or a string, got {type(key).__name__}")


def _lookup(model: nn.Module) -> GroupSpecSource:
    arch = getattr(model, ARCH_ATTRIBUTE, None)
    if isinstance(arch, str) and arch in _BY_ARCH:
        return _BY_ARCH[arch]
    for cls in type(model).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    known = sorted([c.__name__ for c in _BY_CLASS] + [repr(a) for a in _BY_ARCH])
    hint = f" ({ARCH_ATTRIBUTE}={arch!r})" if arch is not None else ""
    raise ValueError(
        f"no layer groups registered for model type {type(model).__name__}{hint}; "
        f"registered: {', '.join(known) or 'none'}"
    )


def _owns(prefix: str, param_name: str) -> bool:
    return param_name == prefix or param_name.startswith(prefix + ".")


def resolve_groups(model: nn.Module, spec: Sequence[GroupSpec]) -> list[LayerGroup]:
    """Apply ``spec`` to ``model`` and validate the result.

    Raises:
        ValueError: A parameter owned by no group or by more than one (the message names it), a
            group owning no parameter, duplicate group names, an unknown role, or not exactly one
            head group placed last.
    """
    if not spec:
        raise ValueError("a group spec needs at least one group")
    names = [g.name for g in spec]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate group names: {', '.join(duplicates)}")
    for g in spec:
        if g.role not in ROLES:
            raise ValueError(f"group {g.name!r} has role {g.role!r}; expected one of {ROLES}")
    heads = [g.name for g in spec if g.role == "head"]
    if len(heads) != 1 or spec[-1].role != "head":
        raise ValueError(f"expected exactly one head group, placed last; got heads {heads} in {names}")

    owned: dict[str, list[tuple[str, int]]] = {g.name: [] for g in spec}
    for param_name, param in model.named_parameters():
        owners = [g.name for g in spec if any(_owns(p, param_name) for p in g.prefixes)]
        if not owners:
            raise ValueError(f"parameter {param_name!r} belongs to no layer group of {names}")
        if len(owners) > 1:
            raise ValueError(f"parameter {param_name!r} belongs to several layer groups: {owners}")
        owned[owners[0]].append((param_name, param.numel()))

    groups = []
    for g in spec:
        members = owned[g.name]
        if not members:
            # An empty group is almost always a typo in a prefix; selecting it would silently do nothing.
            raise ValueError(f"layer group {g.name!r} (prefixes {list(g.prefixes)}) owns no parameters")
        groups.append(
            LayerGroup(
                name=g.name,
                role=g.role,
                param_names=tuple(n for n, _ in members),
                num_params=sum(c for _, c in members),
            )
        )
    return groups


def layer_groups(model: nn.Module) -> list[LayerGroup]:
    """Layer groups of ``model``, ordered input -> output, with exactly one head group (last).

    Every parameter of ``model.named_parameters()`` is in exactly one group.

    Raises:
        ValueError: The model's architecture has no registered groups, or its declaration does not
            cover the model's parameters exactly once.
    """
    source = _lookup(model)
    spec = source(model) if callable(source) else source
    return resolve_groups(model, spec)


def head_param_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the head group's parameters."""
    return next(g.param_names for g in layer_groups(model) if g.role == "head")


def body_param_names(model: nn.Module) -> tuple[str, ...]:
    """Names of every parameter outside the head, in ``named_parameters()`` order."""
    head = set(head_param_names(model))
    return tuple(n for n, _ in model.named_parameters() if n not in head)
