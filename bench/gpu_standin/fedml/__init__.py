"""STAND-IN for FedML 0.9.6 (bench/gpu_standin): NOT FedML.

Provides only what the GPU check's measured path uses: :func:`init`, :class:`FedMLRunner` with
an ``algorithm_flow``, ``fedml.arguments.Arguments``, ``fedml.core.ClientTrainer`` /
``ServerAggregator`` and ``fedml.core.mlops.fetch_config``, with FedML 0.9.6's behaviour for
them when differential privacy, attacks, defences, FHE and MLOps are off (see README.md here).
Put on the path by bench/gpu_check only when the real ``import fedml`` fails.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

from . import arguments, core
from .constants import (
    FEDML_SIMULATION_TYPE_SP,
    FEDML_TRAINING_PLATFORM_CROSS_SILO,
    FEDML_TRAINING_PLATFORM_SIMULATION,
)
from .core import mlops
from .runner import FedMLRunner

__all__ = ["FEDML_SIMULATION_TYPE_SP", "FEDML_TRAINING_PLATFORM_CROSS_SILO", "FEDML_TRAINING_PLATFORM_SIMULATION",
           "FedMLRunner", "STANDIN", "arguments", "core", "init"]

__version__ = "0.9.6+fedselect-standin"
STANDIN = True
_global_training_type: str | None = None
_global_comm_backend: str | None = None

sys.stderr.write(f"*** fedml STAND-IN imported from {os.path.dirname(__file__)} (bench/gpu_standin): NOT FedML ***\n")


def _env_version() -> str:
    """FedML keeps FEDML_ENV_VERSION (default 'release'); it also writes it to a dotenv file, this does not."""
    return os.environ.setdefault("FEDML_ENV_VERSION", "release")


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True


def init(args: Any = None, check_env: bool = True, should_init_logs: bool = True) -> Any:
    """FedML 0.9.6's ``fedml.init`` for single-process simulation with MLOps off."""
    global _global_training_type, _global_comm_backend
    if args is None:
        raise NotImplementedError("fedml stand-in: init() needs args (FedML would parse sys.argv and a YAML)")
    _env_version()
    training_type, backend = getattr(args, "training_type", None), getattr(args, "backend", None)
    if training_type != FEDML_TRAINING_PLATFORM_SIMULATION or backend != FEDML_SIMULATION_TYPE_SP:
        raise NotImplementedError(f"fedml stand-in: only simulation/sp is provided, not {training_type}/{backend}")
    core.refuse_unsupported_switches(args)
    _global_training_type, _global_comm_backend = training_type, backend
    # FedML sets the start method of the `multiprocess` package (not the standard library's): nothing to do here
    os.environ["KMP_DUPLICATE_LIB_OK"] = "True"
    _seed_everything(getattr(args, "random_seed", 0))
    mlops.pre_setup(args)
    if not hasattr(args, "sys_perf_profiling"):
        args.sys_perf_profiling = True
    mlops.init(args, should_init_logs=should_init_logs)
    return args
