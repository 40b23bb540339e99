"""The MLflow store: tracking URIs, the sqlite file shared by many processes, locking and retries.

The default store is an embedded sqlite file, ``sqlite:///<results_dir>/mlflow.db``, with
artifacts in ``<results_dir>/mlartifacts``; ``$MLFLOW_TRACKING_URI`` overrides it. Snakemake
runs many training jobs as separate processes against that one file, which breaks plain
MLflow in three ways (all seen with mlflow 3.17 and 4 processes on a fresh file):

* creating the schema: every process sees an empty database and runs the alembic
  migrations at once -> ``table experiments already exists``, ``duplicate column name``,
  ``Online migration expected to match one row`` (this can leave the file half-migrated);
* creating the experiment: check-then-create races -> ``RESOURCE_ALREADY_EXISTS``;
* writing: sqlite allows one writer; MLflow waits up to 20 s (``busy_timeout``) and then
  raises ``database is locked`` (opening a store waits only 5 s).

Store creation and experiment get-or-create therefore run under an inter-process lock
(``fcntl.flock`` on ``<db>.lock``), and every database call is retried with backoff while
sqlite reports that it is locked.

``mlflow`` takes ~2.5 s to import, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no flock; parallel first use of one sqlite file is then unsafe
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_FILENAME = "mlflow.db"
ARTIFACT_DIRNAME = "mlartifacts"

# Retries on "database is locked": each attempt may itself block up to MLflow's 20 s busy
# timeout, so a few attempts cover minutes of contention without hanging forever.
RETRY_ATTEMPTS = 8
RETRY_BASE_DELAY_S = 0.1
RETRY_MAX_DELAY_S = 5.0
_TRANSIENT_MARKERS = ("database is locked", "database table is locked", "database is busy")

# The sqlite store cannot hold +-inf and stores +-max float instead; reads map it back.
_SQL_INF = sys.float_info.max

_prepared_stores: set[str] = set()


# --------------------------------------------------------------------------------------- URIs


def default_tracking_uri(results_dir: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the sqlite file ``<results_dir>/mlflow.db`` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    # absolute, so the URI means the same file whatever the working directory of the reader
    return f"sqlite:///{(Path(results_dir).resolve() / DB_FILENAME).as_posix()}"


def run_tracking_uri(tracking: Any) -> str:
    """The one store rule: the store a run with this ``tracking:`` config section logs to (its
    ``tracking_uri``, else :func:`default_tracking_uri` of its ``results_dir``). ``fedselect compare``
    reads the default section's store, so a run on defaults is where compare looks."""
    return tracking.tracking_uri or default_tracking_uri(tracking.results_dir)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for in-memory sqlite and other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def is_remote(tracking_uri: str) -> bool:
    """A tracking server (which chooses its own artifact locations), not a local store."""
    return tracking_uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc", "uc")


def metric_value(value: float) -> float:
    """A metric value as read from the store: the sqlite store's stand-in for +-inf mapped back."""
    if abs(value) == _SQL_INF:
        return math.copysign(math.inf, value)
    return value


# ------------------------------------------------------------------------ locking and retries


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Exclusive inter-process lock on ``<db>.lock`` for sqlite stores; no-op for others."""
    db = sqlite_path(tracking_uri)
    if db is None or fcntl is None:
        yield
        return
    lock_path = db.with_name(db.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_transient(exc: BaseException) -> bool:
    """True for sqlite lock contention, however MLflow or SQLAlchemy wrapped it."""
    text = str(exc).lower()
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def with_retry(what: str, fn: Callable[..., T], *args: Any, attempts: int = RETRY_ATTEMPTS,
               **kwargs: Any) -> T:
    """Call ``fn``; while it fails with sqlite lock contention, back off (jittered) and call again."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            # jitter so that processes which collided once do not collide again in lockstep
            delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            log.warning("%s: sqlite store busy (attempt %d/%d), retrying in %.2f s",
                        what, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------- the store


def prepare_store(tracking_uri: str) -> None:
    """Create the sqlite file and MLflow schema once, under the file lock; no-op for other stores.

    Safe to call from many processes at once: the first one to get the lock migrates the empty
    database, the others then find the schema in place.
    """
    db = sqlite_path(tracking_uri)
    if db is None or tracking_uri in _prepared_stores:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    # imported before taking the lock: the import alone takes ~1.3 s, which would otherwise be
    # serialized across all the waiting processes
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow.tracking import MlflowClient

    with store_lock(tracking_uri):
        # MlflowClient builds (and caches per process) the store, which migrates an empty file
        with_retry("open tracking store", MlflowClient, tracking_uri)
    _prepared_stores.add(tracking_uri)


def client(tracking_uri: str) -> MlflowClient:
    """A client of the store, which is created (schema included) if it does not exist yet."""
    from mlflow.tracking import MlflowClient

    prepare_store(tracking_uri)
    return with_retry("open tracking store", MlflowClient, tracking_uri)


def existing_client(tracking_uri: str) -> MlflowClient:
    """A client for reading: a missing sqlite file is an error, not a new empty store."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(f"no MLflow sqlite store at {db} (tracking URI {tracking_uri})")
    return client(tracking_uri)


def get_or_create_experiment(mlflow_client: MlflowClient, tracking_uri: str, name: str,
                             artifact_location: str | None) -> str:
    """The id of the active experiment ``name``, created (under the store lock) if missing."""
    from mlflow.exceptions import MlflowException

    with store_lock(tracking_uri):
        experiment = with_retry("get experiment", mlflow_client.get_experiment_by_name, name)
        if experiment is None:
            try:
                return with_retry("create experiment", mlflow_client.create_experiment, name,
                                  artifact_location=artifact_location)
            except MlflowException as exc:
                # the lock covers our processes only; a tracking server may have other clients
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = with_retry("get experiment", mlflow_client.get_experiment_by_name, name)
                if experiment is None:
                    raise
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(f"MLflow experiment {name!r} ({experiment.experiment_id}) is deleted in "
                           f"{tracking_uri}; restore it in the MLflow UI or purge it (`mlflow gc`)")
    return experiment.experiment_id


def set_experiment_description(mlflow_client: MlflowClient, experiment_id: str, description: str) -> None:
    """Show ``description`` on the experiment's page (MLflow's ``mlflow.note.content`` tag); set only when it
    differs, so runs of one study do not rewrite it."""
    experiment = with_retry("get experiment", mlflow_client.get_experiment, experiment_id)
    if experiment.tags.get("mlflow.note.content") != description:
        with_retry("set experiment description", mlflow_client.set_experiment_tag, experiment_id,
                   "mlflow.note.content", description)
