"""STAND-IN ``fedml.arguments``: the ``Arguments`` holder (attributes set from config sections)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Arguments:
    """FedML's argument holder; here only :meth:`set_attr_from_config` (our runtime builds args itself)."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise NotImplementedError("fedml stand-in: Arguments(cmd_args) parses a YAML in FedML; "
                                  "build it with Arguments.__new__ and set_attr_from_config")

    def set_attr_from_config(self, configuration: Mapping[str, Mapping[str, Any]]) -> None:
        """Every key of every section becomes an attribute (later sections win), as in FedML."""
        for section in configuration.values():
            for key, value in section.items():
                setattr(self, key, value)
