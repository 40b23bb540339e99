"""Offline-safe FedML initialisation and FedML ``args`` built from our validated config.

What FedML 0.9.6 does on its own, and what we do about it (../shared/docs/PLATFORM.md):

* ``fedml.init`` POSTs to the FedML cloud config endpoint (no timeout) whatever
  ``using_mlops`` says: we replace ``fedml.core.mlops.fetch_config`` before calling it.
* ``check_env=True`` probes cloud hosts; ``should_init_logs=True`` replaces the root logger
  and redirects ``sys.stdout.write``: we pass False for both.
* It writes under ``~/.fedml``: HOME points at an isolated folder while fedml is imported and
  initialised (``FEDSELECT_FEDML_HOME``, default ``<results_dir>/.fedml-home``).
* It parses ``sys.argv`` and silently ignores a YAML it cannot read: we build ``args``
  ourselves from an in-memory mapping of FedML sections and check the result.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedselect.config import ExperimentConfig
from fedselect.fedml_bridge import fedml_home, import_fedml, isolated_home

__all__ = ["build_fedml_args", "fedml_dataset_tuple", "fedml_home", "fedml_sections", "import_fedml"]

log = logging.getLogger(__name__)


def fedml_sections(config: ExperimentConfig, *, training_type: str = "simulation", backend: str = "sp",
                   rank: int = 0, role: str = "server", extra: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """FedML's YAML sections (common/data/model/train/device/comm/tracking) for one run."""
    num_clients = config.data.partition.num_clients
    per_round = max(1, round(config.train.participation * num_clients))
    sections: dict[str, dict[str, Any]] = {
        "common_args": {
            "training_type": training_type,
            "random_seed": config.seed,
            "using_mlops": False,
            "config_version": "release",
            "scenario": "horizontal",
        },
        "data_args": {"dataset": config.data.dataset, "data_cache_dir": str(config.data.root or "")},
        "model_args": {"model": config.model.name},
        "train_args": {
            # our algorithms are ours; FedML only needs a known optimizer name for its own flows
            "federated_optimizer": "FedAvg",
            "fedselect_algorithm": config.algorithm,
            "client_id_list": "[]",
            "client_num_in_total": num_clients,
            "client_num_per_round": per_round,
            "comm_round": config.train.rounds,
            "epochs": config.train.local_epochs,
            "batch_size": config.train.batch_size,
            "client_optimizer": "sgd",
            "learning_rate": config.train.lr,
            "weight_decay": config.train.weight_decay,
            "frequency_of_the_test": config.train.eval_every,
        },
        "device_args": {"using_gpu": config.device != "cpu", "gpu_id": 0},
        "comm_args": {"backend": backend},
        "tracking_args": {"enable_tracking": False, "enable_wandb": False},
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    sections["common_args"]["rank"] = rank
    sections["common_args"]["role"] = role
    return sections


def build_fedml_args(sections: Mapping[str, Mapping[str, Any]], *, home: Path | None = None) -> Any:
    """A ``fedml.arguments.Arguments`` holding exactly ``sections`` (flattened), then ``fedml.init``."""
    fedml = import_fedml(home)
    from fedml.arguments import Arguments

    common = sections["common_args"]
    namespace = argparse.Namespace(yaml_config_file="", rank=common.get("rank", 0), role=common.get("role", "server"),
                                   run_id="0", local_rank=0, node_rank=0)
    args = Arguments.__new__(Arguments)
    for key, value in vars(namespace).items():
        setattr(args, key, value)
    # the same flattening FedML applies to its YAML: every section's keys become attributes
    args.set_attr_from_config({name: dict(values) for name, values in sections.items()})
    args.yaml_paths = []
    if getattr(args, "training_type", None) != common["training_type"]:
        raise RuntimeError("FedML args were not built as configured (training_type missing)")
    argv, sys.argv = sys.argv, sys.argv[:1]  # fedml must never read our command line
    try:
        with isolated_home(home or fedml_home()):
            args = fedml.init(args, check_env=False, should_init_logs=False)
    finally:
        sys.argv = argv
    return args


def fedml_dataset_tuple(client_data: list[Any], num_classes: int) -> list[Any]:
    """FedML's dataset list ``[train_num, test_num, train_global, test_global, {cid: n},
    {cid: train}, {cid: test}, class_num]`` built from our per-client datasets (no download)."""
    train_num = sum(d.num_train for d in client_data)
    test_num = sum(d.num_test for d in client_data)
    local_num = {cid: d.num_train for cid, d in enumerate(client_data)}
    train_local = {cid: (d.train_x, d.train_y) for cid, d in enumerate(client_data)}
    test_local = {cid: (d.test_x, d.test_y) for cid, d in enumerate(client_data)}
    return [train_num, test_num, None, None, local_num, train_local, test_local, num_classes]
