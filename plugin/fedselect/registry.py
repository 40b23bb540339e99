"""Algorithms by name: each is a FedML ClientTrainer + ServerAggregator pair plus its options.

An algorithm registers itself with :func:`register` when its module is imported; the first
lookup imports every built-in one (:data:`BUILTIN_MODULES`). Options under the config's
``algo:`` key are validated against the algorithm's options dataclass, so a misspelled
option fails before training with the key's name.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedselect.options import ConfigError, build_dataclass


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    client_cls: type
    server_cls: type
    options_cls: type
    summary: str


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(name: str, *, client: type, server: type, options: type | None = None, summary: str = "") -> None:
    """Make an algorithm available to configs as ``algorithm: <name>``.

    Its options dataclass is the client's ``Options`` (``options`` names it for a client that
    declares none).
    """
    options = options or client.Options
    if name in _REGISTRY and _REGISTRY[name].client_cls is not client:
        raise ValueError(f"algorithm '{name}' is already registered by {_REGISTRY[name].client_cls.__module__}")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of algorithm '{name}' must be a dataclass")
    _REGISTRY[name] = AlgorithmSpec(name, client, server, options, summary)


# imported on first lookup, not with this module: configs are validated without importing torch
BUILTIN_MODULES = tuple(f"fedselect.algorithms.{name}" for name in (
    "fedavg", "local", "fedper", "fedrep", "lg_fedavg", "fedbabu", "fedalt", "ditto", "lotteryfl",
    "fedselect", "layersel"))


def _load_builtins() -> None:
    """Import (and so register) every built-in algorithm."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def load_plugins(modules: list[str]) -> None:
    """Import modules that register extra algorithms (``--plugin``), before a config is read."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"--plugin {name}: cannot import it ({exc})") from exc


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
