"""STAND-IN ``fedml.core.mlops``: the hooks ``fedml.init`` calls, with MLOps off and no network."""

from __future__ import annotations

from typing import Any


class MLOpsStore:
    mlops_args: Any = None


def pre_setup(args: Any) -> None:
    MLOpsStore.mlops_args = args


def fetch_config(args: Any, version: str = "release") -> bool:
    """FedML POSTs to its cloud config endpoint here; the stand-in makes no network call."""
    return False


def init(args: Any, should_init_logs: bool = True) -> None:
    """FedML with MLOps off: default config_version, then fetch_config (looked up at call time, so a patch applies)."""
    MLOpsStore.mlops_args = args
    if getattr(args, "enable_tracking", False) is True:
        raise NotImplementedError("fedml stand-in: FedML's MLOps tracking is not provided")
    if not hasattr(args, "config_version"):
        args.config_version = "release"
    if should_init_logs:
        raise NotImplementedError("fedml stand-in: FedML's runtime logs are not provided (should_init_logs=False)")
    fetch_config(args, args.config_version)
