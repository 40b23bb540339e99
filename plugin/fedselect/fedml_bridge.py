"""FedML imported once, offline and with HOME isolated: the one module that imports ``fedml``.

What FedML 0.9.6 does on its own, and what we do about it (../shared/docs/PLATFORM.md):

* ``fedml.init`` POSTs to the FedML cloud config endpoint (no timeout) whatever
  ``using_mlops`` says: we replace ``fedml.core.mlops.fetch_config`` before calling it.
* It writes under ``~/.fedml``: HOME points at an isolated folder while fedml is imported and
  initialised (``FEDSELECT_FEDML_HOME``, default ``<results_dir>/.fedml-home``).

Every other module takes FedML from here (:func:`import_fedml`, :func:`fedml_interfaces`), so
the patch is applied before any FedML code runs, whoever imports first.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# set on the fedml module once it is patched, so a second import_fedml is a lookup
_PATCHED_FLAG = "_fedselect_offline"


@contextmanager
def isolated_home(home: Path) -> Iterator[None]:
    """HOME points at ``home`` for the duration (FedML writes ``~/.fedml``)."""
    home.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home.resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old


def fedml_home(results_dir: str | os.PathLike | None = None) -> Path:
    """The folder FedML may write its ``.fedml`` state into."""
    env = os.environ.get("FEDSELECT_FEDML_HOME")
    if env:
        return Path(env)
    return Path(results_dir or "results") / ".fedml-home"


def import_fedml(home: Path | None = None) -> Any:
    """The ``fedml`` module, imported once with its network calls disabled and HOME isolated."""
    module = sys.modules.get("fedml")
    if module is not None and getattr(module, _PATCHED_FLAG, False):
        return module
    with isolated_home(home or fedml_home()), warnings.catch_warnings():
        # fedml imports pkg_resources; the deprecation warning is fedml's, not ours
        warnings.simplefilter("ignore", UserWarning)
        import fedml
        import fedml.core.mlops as mlops

    def _no_cloud_config(*_args: Any, **_kwargs: Any) -> bool:
        return False

    # mlops.init looks fetch_config up in its module globals at call time
    mlops.fetch_config = _no_cloud_config
    setattr(fedml, _PATCHED_FLAG, True)
    return fedml


def fedml_interfaces() -> tuple[type, type]:
    """FedML's ``ClientTrainer`` and ``ServerAggregator``, the interfaces our algorithms implement."""
    core = import_fedml().core
    return core.ClientTrainer, core.ServerAggregator
