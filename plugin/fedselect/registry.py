"""Algorithms by name: each is a FedML ClientTrainer + ServerAggregator pair plus its options.

The built-in algorithms are known by name without importing them (:data:`BUILTINS`): their
options dataclass lives in a module that imports neither torch nor FedML, and their client and
server classes are imported on :func:`get_algorithm`, only when an algorithm is built. Listing
algorithms (:func:`available_algorithms`, :func:`algorithm_info`) and validating a config's
``algo:`` options (:func:`validate_algorithm_options`) therefore import no torch for them.

Plugins (``--plugin module``) register extra algorithms with :func:`register` when imported.
Options under the config's ``algo:`` key are validated against the algorithm's options
dataclass, so a misspelled option fails before training with the key's name.
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


@dataclass(frozen=True)
class BuiltinAlgorithm:
    """A built-in algorithm as known before its implementation is imported.

    ``module`` (imports torch and FedML) registers the client and server when imported;
    ``options`` is ``"module:Class"`` of its options dataclass, in a module that imports neither.
    """

    module: str
    options: str
    summary: str


@dataclass(frozen=True)
class AlgorithmInfo:
    """What listing an algorithm needs: its options dataclass and one-line summary."""

    name: str
    options_cls: type
    summary: str
    # the module that implements (built-ins) or registered (plugins) it
    module: str
    builtin: bool


_ALGO = "fedselect.algorithms"
_NO_OPTIONS = "fedselect.options:NoOptions"

# the one source of the built-in algorithms' names, summaries and options classes
BUILTINS: dict[str, BuiltinAlgorithm] = {
    "fedavg": BuiltinAlgorithm(
        f"{_ALGO}.fedavg", _NO_OPTIONS,
        "one global model; clients run E epochs of SGD, the server averages by sample count (McMahan et al. 2017)"),
    "local": BuiltinAlgorithm(
        f"{_ALGO}.local", _NO_OPTIONS,
        "each client trains alone from the common initialization; no communication"),
    "fedper": BuiltinAlgorithm(
        f"{_ALGO}.fedper", _NO_OPTIONS,
        "personal classifier head, shared body; E epochs of joint SGD (Arivazhagan et al. 2019)"),
    "fedrep": BuiltinAlgorithm(
        f"{_ALGO}.fedrep", f"{_ALGO}.fedrep_options:FedRepOptions",
        "personal head; local update = head epochs (body fixed), then body epochs (head fixed) "
        "(Collins et al. 2021)"),
    "lg_fedavg": BuiltinAlgorithm(
        f"{_ALGO}.lg_fedavg", f"{_ALGO}.group_options:LGFedAvgOptions",
        "personal representation (body), shared head; E epochs of joint SGD (Liang et al. 2020)"),
    "fedbabu": BuiltinAlgorithm(
        f"{_ALGO}.fedbabu", f"{_ALGO}.fedbabu_options:FedBABUOptions",
        "head frozen at its common initialization, body trained and averaged; per-client fine-tuning "
        "before evaluation (Oh et al. 2022)"),
    "fedalt": BuiltinAlgorithm(
        f"{_ALGO}.fedalt", f"{_ALGO}.group_options:FedAltOptions",
        "fixed layer-wise partition (head personal by default) trained by LocalAlt: per epoch a personal "
        "pass then a shared pass (Pillutla et al. 2022)"),
    "ditto": BuiltinAlgorithm(
        f"{_ALGO}.ditto", f"{_ALGO}.ditto_options:DittoOptions",
        "FedAvg's global model plus a whole personal model per client trained with the proximal term "
        "lambda/2 ||v - w||^2; evaluation uses the personal model (Li et al. 2021)"),
    "lotteryfl": BuiltinAlgorithm(
        f"{_ALGO}.lotteryfl", f"{_ALGO}.lotteryfl_options:LotteryFLOptions",
        "personal sparse subnetworks by iterative magnitude pruning with rewind; masked SGD; uploads only "
        "unpruned entries (Li et al. 2021)"),
    "fedselect": BuiltinAlgorithm(
        f"{_ALGO}.fedselect", f"{_ALGO}.fedselect_options:FedSelectOptions",
        "GradLTN picks each client's personal entries; LocalAlt trains personal then shared entries; the "
        "server averages each entry over the clients sharing it (Tamirisa et al., arXiv 2306.13264)"),
    "layersel": BuiltinAlgorithm(
        f"{_ALGO}.layersel", f"{_ALGO}.layersel_options:LayerSelOptions",
        "selective layer fine-tuning: per-client layers chosen by the server under budgets "
        "(ILP of arXiv 2408.15600, or Top/Bottom/Both/SNR/RGN/Full/Random)"),
}

# the built-in implementations by module name (each registers the algorithm its name ends with)
BUILTIN_MODULES = tuple(builtin.module for builtin in BUILTINS.values())

_REGISTRY: dict[str, AlgorithmSpec] = {}


def builtin_options_class(name: str) -> type:
    """The options dataclass of built-in algorithm ``name``, imported without torch or FedML."""
    module, _, cls = BUILTINS[name].options.partition(":")
    return getattr(importlib.import_module(module), cls)


def register(name: str, *, client: type, server: type, options: type | None = None, summary: str = "") -> None:
    """Make an algorithm available to configs as ``algorithm: <name>``.

    Its options dataclass is the client's ``Options`` (``options`` names it for a client that
    declares none). A built-in's options and summary are those of :data:`BUILTINS`; a plugin that
    registers a built-in's name with another client fails, as for any name already taken.
    """
    options = options or client.Options
    builtin = BUILTINS.get(name)
    if builtin is not None and name not in _REGISTRY:
        # the built-in registers first (a no-op while its own module is being imported)
        importlib.import_module(builtin.module)
    if name in _REGISTRY and _REGISTRY[name].client_cls is not client:
        raise ValueError(f"algorithm '{name}' is already registered by {_REGISTRY[name].client_cls.__module__}")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of algorithm '{name}' must be a dataclass")
    if builtin is not None:
        if options is not builtin_options_class(name):
            raise TypeError(f"built-in algorithm '{name}' registers options {options.__qualname__}, "
                            f"registry.BUILTINS names {builtin.options}")
        summary = builtin.summary
    _REGISTRY[name] = AlgorithmSpec(name, client, server, options, summary)


def load_plugins(modules: list[str]) -> None:
    """Import modules that register extra algorithms (``--plugin``), before a config is read."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"--plugin {name}: cannot import it ({exc})") from exc


def available_algorithms() -> list[str]:
    """Every algorithm name: the built-ins (not imported) and those registered so far."""
    return sorted(set(BUILTINS) | set(_REGISTRY))


def _unknown(name: str, what: str) -> ConfigError:
    return ConfigError(f"{what}unknown algorithm '{name}' (registered: {', '.join(available_algorithms())})")


def algorithm_info(name: str) -> AlgorithmInfo:
    """Options class and summary of ``name`` without importing a built-in's implementation."""
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        return AlgorithmInfo(name, spec.options_cls, spec.summary, spec.client_cls.__module__, name in BUILTINS)
    if name in BUILTINS:
        builtin = BUILTINS[name]
        return AlgorithmInfo(name, builtin_options_class(name), builtin.summary, builtin.module, True)
    raise _unknown(name, "")


def get_algorithm(name: str) -> AlgorithmSpec:
    """The client and server classes of ``name``; imports a built-in's implementation (torch, FedML)."""
    if name not in _REGISTRY and name in BUILTINS:
        importlib.import_module(BUILTINS[name].module)
        if name not in _REGISTRY:
            raise RuntimeError(f"{BUILTINS[name].module} did not register algorithm '{name}'")
    if name not in _REGISTRY:
        raise _unknown(name, "config key 'algorithm': ")
    return _REGISTRY[name]


def validate_algorithm_options(name: str, options: Mapping[str, Any]) -> Any:
    """The algorithm's options dataclass built from the config's ``algo:`` mapping (no torch for built-ins)."""
    if name not in _REGISTRY and name not in BUILTINS:
        raise _unknown(name, "config key 'algorithm': ")
    return build_dataclass(algorithm_info(name).options_cls, options, prefix="algo.")
