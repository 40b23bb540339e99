"""Registered algorithms; importing this package registers every built-in one."""

from . import (  # noqa: F401
    ditto,
    fedalt,
    fedavg,
    fedbabu,
    fedper,
    fedrep,
    fedselect,
    layersel,
    lg_fedavg,
    local,
    lotteryfl,
)
from .registry import available_algorithms, get_algorithm, register

__all__ = ["available_algorithms", "get_algorithm", "register"]
