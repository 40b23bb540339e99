"""MLflow tracking for training runs, safe with several processes writing one sqlite store.

Conventions: one MLflow experiment per study, one MLflow run per training run; params are the
flattened config, metrics are logged once per round with ``step = round``, files are artifacts.

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
sqlite reports that it is locked. A retried ``log_batch`` re-sends the same metric objects
(same timestamps), which MLflow de-duplicates, so a retry never doubles a point.

Each round is written synchronously as it comes, so a crash loses nothing already logged;
a body that raises ends the run FAILED with the exception text in the ``error`` tag.

``mlflow`` takes ~2.5 s to import, so it is imported inside the functions that need it:
reading run records or flattening a config stays fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no flock; parallel first use of one sqlite file is then unsafe
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

T = TypeVar("T")
Scalar = str | int | float | bool

RUN_RECORD_KEYS: tuple[str, ...] = (
    "algorithm", "dataset", "seed", "rounds", "final_mean_acc", "best_mean_acc", "per_client_acc",
    "bytes_up", "bytes_down", "wall_seconds", "mlflow_run_id", "tracking_uri",
)

DB_FILENAME = "mlflow.db"
ARTIFACT_DIRNAME = "mlartifacts"

# MLflow's limits (mlflow.utils.validation); longer values are cut here, with a marker, rather
# than rejected (params) or cut silently (tags).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

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


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for in-memory sqlite and other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def _is_remote(tracking_uri: str) -> bool:
    return tracking_uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc", "uc")


# ------------------------------------------------------------------------------------- params


def flatten(d: Mapping, prefix: str = "", sep: str = ".") -> dict[str, Scalar]:
    """Nested mappings -> ``{"a.b.c": value}``.

    Scalars (str/int/float/bool) are kept, lists and tuples become JSON strings, None becomes
    ``"None"``, an empty mapping ``"{}"`` (so the key is not silently dropped) and anything
    else ``str(value)``. Two paths that flatten to the same key raise ValueError.
    """
    out: dict[str, Scalar] = {}
    _flatten_into(out, d, prefix, sep)
    return out


def _flatten_into(out: dict[str, Scalar], d: Mapping, prefix: str, sep: str) -> None:
    for raw_key, value in d.items():
        key = f"{prefix}{sep}{raw_key}" if prefix else str(raw_key)
        if isinstance(value, Mapping) and value:
            _flatten_into(out, value, key, sep)
            continue
        if key in out:
            raise ValueError(f"flatten: key {key!r} occurs twice (a dotted key collides with a nested one)")
        out[key] = _flat_value(value)


def _flat_value(value: Any) -> Scalar:
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return json.dumps(value, default=_json_default)
    return str(value)


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    # a marker counting all chars is at least as long as the real one, so the result fits
    keep = limit - len(f"...[truncated {len(value)} chars]")
    return value[:keep] + f"...[truncated {len(value) - keep} chars]"


def _json_default(obj: Any) -> Any:
    """JSON for what ``json`` refuses: numpy scalars/arrays, paths, sets."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ------------------------------------------------------------------------ locking and retries


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
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

    with _store_lock(tracking_uri):
        # MlflowClient builds (and caches per process) the store, which migrates an empty file
        with_retry("open tracking store", MlflowClient, tracking_uri)
    _prepared_stores.add(tracking_uri)


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    prepare_store(tracking_uri)
    return with_retry("open tracking store", MlflowClient, tracking_uri)


def _existing_client(tracking_uri: str) -> MlflowClient:
    """A client for reading: a missing sqlite file is an error, not a new empty store."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(f"no MLflow sqlite store at {db} (tracking URI {tracking_uri})")
    return _client(tracking_uri)


def _get_or_create_experiment(client: MlflowClient, tracking_uri: str, name: str,
                              artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    with _store_lock(tracking_uri):
        experiment = with_retry("get experiment", client.get_experiment_by_name, name)
        if experiment is None:
            try:
                return with_retry("create experiment", client.create_experiment, name,
                                  artifact_location=artifact_location)
            except MlflowException as exc:
                # the lock covers our processes only; a tracking server may have other clients
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = with_retry("get experiment", client.get_experiment_by_name, name)
                if experiment is None:
                    raise
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(f"MLflow experiment {name!r} ({experiment.experiment_id}) is deleted in "
                           f"{tracking_uri}; restore it in the MLflow UI or purge it (`mlflow gc`)")
    return experiment.experiment_id


# ----------------------------------------------------------------------------------- tracker


class RunTracker:
    """One MLflow run as a context manager: ``with RunTracker(...) as t: t.log_metrics(...)``.

    Uses its own :class:`MlflowClient` (no fluent global state), so several trackers can be
    open in one process. The run ends FINISHED, or FAILED with an ``error`` tag when the body
    raises (KILLED on KeyboardInterrupt).

    ``artifact_root`` is where the experiment stores artifacts when this creates it (default
    for sqlite: ``mlartifacts`` next to the database file); an existing experiment keeps its
    own location, and a remote tracking server chooses its own, so it is ignored there.

    ``run_id`` reopens that existing run of ``experiment`` instead of creating one (a training
    run resumed from its checkpoint logs into the run it started): its status goes back to
    RUNNING and the ``error`` tag of the interrupted attempt is removed; ``tags`` are not re-set.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str,
                 tags: dict[str, str] | None = None, artifact_root: str | os.PathLike | None = None,
                 run_id: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self._reopen_id = run_id
        self.experiment = experiment
        self.run_name = run_name
        self._tags = dict(tags or {})
        db = sqlite_path(tracking_uri)
        if artifact_root is None and db is not None:
            artifact_root = db.parent / ARTIFACT_DIRNAME
        self._artifact_location = (None if artifact_root is None or _is_remote(tracking_uri)
                                   else Path(artifact_root).resolve().as_uri())
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None

    @property
    def run_id(self) -> str:
        """The MLflow run id (available once the context is entered)."""
        if self._run_id is None:
            raise RuntimeError("RunTracker has no run yet; use it as a context manager")
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The MLflow experiment id (available once the context is entered)."""
        if self._experiment_id is None:
            raise RuntimeError("RunTracker has no run yet; use it as a context manager")
        return self._experiment_id

    def __enter__(self) -> RunTracker:
        if self._run_id is not None:
            raise RuntimeError("a RunTracker can be entered only once")
        client = _client(self.tracking_uri)
        self._experiment_id = _get_or_create_experiment(client, self.tracking_uri, self.experiment,
                                                        self._artifact_location)
        if self._reopen_id is not None:
            run = self._reopen(client, self._reopen_id)
        else:
            tags = {k: _truncate(str(v), MAX_TAG_VALUE) for k, v in self._tags.items()}
            run = with_retry("create run", client.create_run, self._experiment_id, run_name=self.run_name,
                             tags=tags)
        self._client, self._run_id = client, run.info.run_id
        log.info("MLflow run %s (%s) in experiment %r at %s", self._run_id, self.run_name, self.experiment,
                 self.tracking_uri)
        return self

    def _reopen(self, client: MlflowClient, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            run = with_retry("get run", client.get_run, run_id)
        except MlflowException as exc:
            raise LookupError(f"MLflow run {run_id} to reopen is not in {self.tracking_uri}: {exc.message}") from None
        if run.info.lifecycle_stage != "active":
            raise LookupError(f"MLflow run {run_id} to reopen is deleted in {self.tracking_uri}")
        if run.info.experiment_id != self._experiment_id:
            raise LookupError(f"MLflow run {run_id} to reopen belongs to experiment {run.info.experiment_id}, "
                              f"not {self.experiment!r} ({self._experiment_id})")
        with_retry("reopen run", client.update_run, run_id, status="RUNNING")
        if "error" in run.data.tags:
            with_retry("clear error tag", client.delete_tag, run_id, "error")
        return run

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        client, run_id = self._active()
        self._client = None
        if exc is None:
            with_retry("end run", client.set_terminated, run_id, "FINISHED")
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            from mlflow.entities import RunTag

            text = _truncate(f"{type(exc).__name__}: {exc}", MAX_TAG_VALUE)
            with_retry("tag error", client.log_batch, run_id, tags=[RunTag("error", text)], synchronous=True)
            with_retry("end run", client.set_terminated, run_id, status)
        except Exception:
            # the body's exception is the one that matters; do not replace it with ours
            log.exception("could not mark MLflow run %s as %s", run_id, status)

    def _active(self) -> tuple[MlflowClient, str]:
        if self._client is None or self._run_id is None:
            raise RuntimeError("RunTracker is not active; log inside its `with` block")
        return self._client, self._run_id

    def log_params(self, params: Mapping) -> None:
        """Log a (nested) mapping as flattened params; long values are truncated with a marker."""
        from mlflow.entities import Param

        client, run_id = self._active()
        items = [Param(k, _truncate(str(v), MAX_PARAM_VALUE)) for k, v in flatten(params).items()]
        for batch in _chunks(items, PARAMS_PER_BATCH):
            with_retry("log params", client.log_batch, run_id, params=batch, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, *, timestamp: int | None = None) -> None:
        """Log one round's metrics at ``step`` in one write (NaN and inf are accepted).

        ``timestamp`` (ms; default now) fixes the points' identity: logging the same values
        with the same step and timestamp again adds nothing (a resumed run re-sends the rounds
        its checkpoint holds as not yet confirmed logged).
        """
        from mlflow.entities import Metric

        client, run_id = self._active()
        timestamp = int(time.time() * 1000) if timestamp is None else int(timestamp)
        items = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metric {key!r} must be a number, got {value!r}") from exc
            items.append(Metric(key, number, timestamp, int(step)))
        # the same Metric objects on every retry: MLflow drops exact duplicates, so no double points
        for batch in _chunks(items, METRICS_PER_BATCH):
            with_retry("log metrics", client.log_batch, run_id, metrics=batch, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (values are stringified; long ones truncated with a marker)."""
        from mlflow.entities import RunTag

        client, run_id = self._active()
        items = [RunTag(k, _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        for batch in _chunks(items, PARAMS_PER_BATCH):
            with_retry("set tags", client.log_batch, run_id, tags=batch, synchronous=True)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or a whole directory) into the run's artifacts, under ``artifact_path``."""
        client, run_id = self._active()
        local = Path(path)
        if local.is_dir():
            client.log_artifacts(run_id, str(local), artifact_path)
        elif local.is_file():
            client.log_artifact(run_id, str(local), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {local}")

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` to the artifact ``artifact_file``: JSON (``.json``) or YAML (``.yaml``, ``.yml``)."""
        suffix = Path(artifact_file).suffix.lower()
        if suffix == ".json":
            text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
        elif suffix in (".yaml", ".yml"):
            import yaml

            # through JSON first so numpy scalars and paths become plain YAML types
            text = yaml.safe_dump(json.loads(json.dumps(obj, default=_json_default)), sort_keys=True)
        else:
            raise ValueError(f"log_dict: {artifact_file!r} must end in .json, .yaml or .yml")
        self.log_text(text, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` to the artifact ``artifact_file`` (a relative path inside the run)."""
        client, run_id = self._active()
        client.log_text(run_id, text, artifact_file)


def _chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


# -------------------------------------------------------------------------------- run records


def write_run_record(path: str | os.PathLike, record: Mapping) -> None:
    """Write a run record as JSON (indent 2, sorted keys) atomically: readers never see half a file."""
    missing = [key for key in RUN_RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"run record for {path} lacks required key(s): {', '.join(missing)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n"
    # the temporary file sits next to the target so os.replace stays on one filesystem
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run_record(path: str | os.PathLike) -> dict:
    """Read a run record written by :func:`write_run_record`; errors name the file."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"run record not found: {source}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"run record {source} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"run record {source} must hold a JSON object, found {type(record).__name__}")
    missing = [key for key in RUN_RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"run record {source} lacks required key(s): {', '.join(missing)}")
    return record


# ----------------------------------------------------------------------------------- reading


def _metric_value(value: float) -> float:
    if abs(value) == _SQL_INF:
        return math.copysign(math.inf, value)
    return value


def load_runs(tracking_uri: str, *, experiment: str | None = None, run_ids: list[str] | None = None,
              tags: dict[str, str] | None = None) -> list[dict]:
    """Runs of a store as plain dicts, filtered by experiment name, run ids and exact tag values.

    Each dict has run_id, run_name, experiment_id, status, start_time, end_time (ms),
    artifact_uri, params (strings), tags and metrics (latest value per key). Deleted runs are
    left out. Order: ``run_ids`` order if given, else by start time.
    """
    client = _existing_client(tracking_uri)
    experiment_ids: list[str] | None = None
    if experiment is not None:
        found = with_retry("get experiment", client.get_experiment_by_name, experiment)
        if found is None:
            names = sorted(e.name for e in with_retry("list experiments", client.search_experiments))
            raise ValueError(f"no experiment {experiment!r} in {tracking_uri}; experiments: {names}")
        experiment_ids = [found.experiment_id]
    if run_ids is not None:
        runs = [with_retry("get run", client.get_run, run_id) for run_id in run_ids]
        runs = [r for r in runs if r.info.lifecycle_stage == "active"
                and (experiment_ids is None or r.info.experiment_id in experiment_ids)]
    else:
        if experiment_ids is None:
            listed = with_retry("list experiments", client.search_experiments)
            experiment_ids = [e.experiment_id for e in listed]
        runs = _search_all(client, experiment_ids)
        runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    wanted = {k: str(v) for k, v in (tags or {}).items()}
    out = []
    for run in runs:
        if any(run.data.tags.get(k) != v for k, v in wanted.items()):
            continue
        out.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "artifact_uri": run.info.artifact_uri,
            "params": dict(run.data.params),
            "tags": dict(run.data.tags),
            "metrics": {k: _metric_value(v) for k, v in run.data.metrics.items()},
        })
    return out


def _search_all(client: MlflowClient, experiment_ids: list[str]) -> list:
    if not experiment_ids:
        return []
    runs: list = []
    token: str | None = None
    while True:
        page = with_retry("search runs", client.search_runs, experiment_ids, max_results=1000,
                          page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """All ``(step, value)`` points of one metric of one run, by step (then time)."""
    client = _existing_client(tracking_uri)
    points = with_retry("metric history", client.get_metric_history, run_id, key)
    points = sorted(points, key=lambda m: (m.step, m.timestamp))
    return [(int(m.step), _metric_value(float(m.value))) for m in points]
