"""Registered algorithms: the built-ins are known by name (registry.BUILTINS) and imported when built.

Their options live in light ``*_options`` modules here, which import neither torch nor FedML, so
importing this package (and so any of those modules) imports no torch either.
"""

from fedselect.registry import available_algorithms, get_algorithm, register

__all__ = ["available_algorithms", "get_algorithm", "register"]
