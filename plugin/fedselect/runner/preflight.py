"""Config errors up front: what a config can be checked for before data are loaded or clients join.

Two kinds of checks, both raising :class:`~fedselect.options.ConfigError` (one ``fedselect: error:``
line, exit status 2, from every command):

* **config-time** (:func:`config_checks`): need the config only. The file and every key
  (:func:`fedselect.config.load_config`: an empty file, an unknown dataset name, a bad value),
  plus an algorithm's checks across sections: layer selection's ``algo.min_trainers`` against the
  clients sampled per round (``train.participation`` x ``data.partition.num_clients``).
* **model-time** (:func:`model_checks`): need the model's layer groups, not its data. The
  algorithm's server is built once on a *probe* model (random init, no weights loaded) of the
  configured architecture, so whatever the server checks when it is built fails here: layer
  selection's budgets (a budget below the head's cost or the cheapest layer: fewer layers than a
  client must train; the head outside the budget with no block to select among). The probe's
  shape must be known without data (:func:`probe_shape`): a named image dataset (its class
  count, channels and size are fixed), ``deploy.client_data: folder`` with ``data.image_size``,
  amazon_reviews, or a text corpus with ``data.labels``. Otherwise the check runs where the model
  is first built from the data (the simulation's federation, the cross-silo server once the clients
  have described their data) and is reported the same way.

Who runs what: ``check-config`` both (the model-time one imports torch and FedML, so only for the
algorithms that check their model: :data:`MODEL_CHECKED` and any plugin's); ``run`` both before
loading data; ``serve`` both before it listens (no client can have joined); ``join`` and
``launch-local`` the config-time ones before starting anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

from fedselect.config import ExperimentConfig
from fedselect.dataset_names import classify
from fedselect.options import ConfigError
from fedselect.registry import BUILTINS, validate_algorithm_options

# built-in algorithms whose server checks the model when it is built (the others accept any model
# with layer groups, which every built-in model has)
MODEL_CHECKED = frozenset({"layersel"})
# named image datasets: (classes, channels, side), fixed by the dataset
IMAGE_SHAPES = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "mnist": (10, 1, 28), "fashionmnist": (10, 1, 28)}
TEXT_CLASSES = {"amazon_reviews": 2}


@dataclass(frozen=True)
class ProbeShape:
    """What the model is built for: class count, and channels and image side for images (None: text)."""

    num_classes: int
    in_channels: int | None
    image_size: int | None
    source: str  # where the shape comes from, for messages


def _layersel_config_checks(config: ExperimentConfig, options: Any) -> None:
    from fedselect.algorithms.layersel_budget import check_min_trainers

    check_min_trainers(options, config.data.partition.num_clients, config.train.participation)


# algorithm -> checks that need the config only (beyond its options' own validation)
CONFIG_CHECKS: dict[str, Callable[[ExperimentConfig, Any], None]] = {"layersel": _layersel_config_checks}


def config_checks(config: ExperimentConfig) -> None:
    """The checks that need nothing but the config (its keys were checked when it was loaded)."""
    check = CONFIG_CHECKS.get(config.algorithm)
    if check is not None:
        check(config, validate_algorithm_options(config.algorithm, config.algo))


def model_checked(config: ExperimentConfig) -> bool:
    """Whether the algorithm's server checks the model when it is built (plugins: assumed so)."""
    return config.algorithm in MODEL_CHECKED or config.algorithm not in BUILTINS


def probe_shape(config: ExperimentConfig, *, deployed: bool = False) -> ProbeShape | None:
    """The model's input and output shape from the config alone, or None when only the data tell.

    ``deployed``: a cross-silo process, whose ``deploy.client_data: folder`` fixes the classes and
    channels (``deploy.classes``, ``deploy.norm_mean``); the image side then is ``data.image_size``.
    """
    data = config.data
    if deployed and config.deploy.client_data == "folder":
        if data.image_size is None:
            return None
        return ProbeShape(len(config.deploy.classes), len(config.deploy.norm_mean), data.image_size, "deploy.classes")
    kind = classify(data.dataset)
    if kind is None:
        return None
    if kind[0] == "image":
        classes, channels, side = IMAGE_SHAPES[kind[1]]
        return ProbeShape(classes, channels, data.image_size or side, kind[1])
    if kind[0] == "text" and kind[1] in TEXT_CLASSES:
        return ProbeShape(TEXT_CLASSES[kind[1]], None, None, kind[1])
    if kind[0] == "text_file" and data.labels:
        return ProbeShape(len(data.labels), None, None, "data.labels")
    return None  # an image folder or a corpus without data.labels: its classes are in the data


def model_checks(config: ExperimentConfig, shape: ProbeShape) -> None:
    """Build the algorithm's server on a probe model of ``shape``; what it refuses is a ConfigError.

    The global random states are left as they were (the run seeds its own model afterwards).
    """
    import numpy as np
    import torch

    from fedselect.algorithms.context import RunContext
    from fedselect.models import build_model_from_config

    from .federation import resolve_algorithm

    spec, options = resolve_algorithm(config)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        # structure only: no weights are read (a weights file is checked when the run loads it)
        model_config = replace(config.model, weights="none")
        sizes = {} if shape.in_channels is None else {"in_channels": shape.in_channels,
                                                      "image_size": shape.image_size}
        try:
            model = build_model_from_config(model_config, shape.num_classes, **sizes)
            ctx = RunContext(config=config, options=options, device=torch.device("cpu"), transform=lambda x: x)
            spec.server_cls(model, SimpleNamespace(), ctx=ctx)
        except ConfigError:
            raise
        except ValueError as exc:  # the server's own checks (layer selection: SelectionError) and the model's
            raise as_config_error(exc, f"{config.model.name} for {shape.source}") from None
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def as_config_error(exc: Exception, model: str) -> ConfigError:
    """A config error saying that ``exc`` came from checking the config against the model ``model``."""
    if isinstance(exc, ConfigError):
        return exc
    return ConfigError(f"{exc} (checked against the model {model})")


def preflight(config: ExperimentConfig, *, model: bool = True, deployed: bool = False) -> bool:
    """Config-time checks, then, with ``model`` and where the algorithm checks its model and the
    probe's shape is known, the model-time ones. Returns whether the model-time checks ran."""
    config_checks(config)
    if not (model and model_checked(config)):
        return False
    shape = probe_shape(config, deployed=deployed)
    if shape is None:
        return False
    model_checks(config, shape)
    return True
