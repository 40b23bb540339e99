"""Algorithms by name: each is a FedML ClientTrainer + ServerAggregator pair plus its options.

An algorithm registers itself with :func:`register` when its module is imported; the
package ``fedselect.algorithms`` imports every built-in one. Options under the config's
``algo:`` key are validated against the algorithm's options dataclass, so a misspelled
option fails before training with the key's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedselect.config import ConfigError, build_dataclass


@dataclass(frozen=True)
class NoOptions:
    """An algorithm without options of its own."""


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    client_cls: type
    server_cls: type
    options_cls: type
    summary: str


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(name: str, *, client: type, server: type, options: type = NoOptions, summary: str = "") -> None:
    """Make an algorithm available to configs as ``algorithm: <name>``."""
    if name in _REGISTRY and _REGISTRY[name].client_cls is not client:
        raise ValueError(f"algorithm '{name}' is already registered by {_REGISTRY[name].client_cls.__module__}")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of algorithm '{name}' must be a dataclass")
    _REGISTRY[name] = AlgorithmSpec(name, client, server, options, summary)


def _load_builtins() -> None:
    import fedselect.algorithms  # noqa: F401  (registers the built-in algorithms)


def available_algorithms() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> AlgorithmSpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"config key 'algorithm': unknown algorithm '{name}' "
                          f"(registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def validate_algorithm_options(name: str, options: Mapping[str, Any]) -> Any:
    """The algorithm's options dataclass built from the config's ``algo:`` mapping."""
    return build_dataclass(get_algorithm(name).options_cls, options, prefix="algo.")
