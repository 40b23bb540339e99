"""Registered algorithms (the built-in ones are imported on first lookup, see registry)."""

from fedselect.registry import available_algorithms, get_algorithm, register

__all__ = ["available_algorithms", "get_algorithm", "register"]
