"""Registered algorithms; importing this package registers every built-in one."""

from . import ditto, fedalt, fedavg, fedbabu, fedper, fedrep, fedselect, lg_fedavg, local, lotteryfl  # noqa: F401
from .registry import available_algorithms, get_algorithm, register

__all__ = ["available_algorithms", "get_algorithm", "register"]
