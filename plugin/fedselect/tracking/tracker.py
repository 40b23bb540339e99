"""One MLflow run as a context manager: params, per-round metrics, tags and artifacts.

Conventions: one MLflow experiment per study, one MLflow run per training run; params are the
flattened config, metrics are logged once per round with ``step = round``, files are artifacts.

Each round is written synchronously as it comes, so a crash loses nothing already logged;
a body that raises ends the run FAILED with the exception text in the ``error`` tag. Every
database call goes through :func:`~fedselect.tracking.store.with_retry`; a retried
``log_batch`` re-sends the same metric objects (same timestamps), which MLflow de-duplicates,
so a retry never doubles a point.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from fedselect.tracking import store
from fedselect.tracking.params import flatten, json_default, truncate
from fedselect.tracking.store import ARTIFACT_DIRNAME, is_remote, sqlite_path, with_retry

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow's limits (mlflow.utils.validation); longer values are cut here, with a marker, rather
# than rejected (params) or cut silently (tags).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


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
    Other runs of the same name and experiment still RUNNING (left by a killed job) become KILLED.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str,
                 tags: dict[str, str] | None = None, artifact_root: str | os.PathLike | None = None,
                 run_id: str | None = None, description: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.description = description
        self._reopen_id = run_id
        self.experiment = experiment
        self.run_name = run_name
        self._tags = dict(tags or {})
        db = sqlite_path(tracking_uri)
        if artifact_root is None and db is not None:
            artifact_root = db.parent / ARTIFACT_DIRNAME
        self._artifact_location = (None if artifact_root is None or is_remote(tracking_uri)
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
        client = store.client(self.tracking_uri)
        self._experiment_id = store.get_or_create_experiment(client, self.tracking_uri, self.experiment,
                                                              self._artifact_location)
        if self.description:  # the MLflow UI shows this experiment tag as the experiment's description
            store.set_experiment_description(client, self._experiment_id, self.description)
        if self._reopen_id is not None:
            run = self._reopen(client, self._reopen_id)
        else:
            tags = {k: truncate(str(v), MAX_TAG_VALUE) for k, v in self._tags.items()}
            run = with_retry("create run", client.create_run, self._experiment_id, run_name=self.run_name,
                             tags=tags)
        self._client, self._run_id = client, run.info.run_id
        self._retire_stale_runs(client)
        log.info("MLflow run %s (%s) in experiment %r at %s", self._run_id, self.run_name, self.experiment,
                 self.tracking_uri)
        return self

    def _retire_stale_runs(self, client: MlflowClient) -> None:
        """Runs of this name still RUNNING were left by a killed process: this run takes over, so they
        are marked KILLED (tag ``superseded_by``). A live duplicate, if any, sets its own status at its end."""
        name = self.run_name.replace("'", "\\'")
        stale = with_retry("search stale runs", client.search_runs, [self._experiment_id],
                           filter_string=f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'",
                           max_results=1000)
        for old in stale:
            if old.info.run_id == self._run_id:
                continue
            with_retry("tag stale run", client.set_tag, old.info.run_id, "superseded_by", self._run_id)
            with_retry("end stale run", client.set_terminated, old.info.run_id, "KILLED")
            log.warning("MLflow run %s (%s) was left RUNNING by a killed process; marked KILLED",
                        old.info.run_id, self.run_name)

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

            text = truncate(f"{type(exc).__name__}: {exc}", MAX_TAG_VALUE)
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
        items = [Param(k, truncate(str(v), MAX_PARAM_VALUE)) for k, v in flatten(params).items()]
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
        items = [RunTag(k, truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
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
            text = json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n"
        elif suffix in (".yaml", ".yml"):
            import yaml

            # through JSON first so numpy scalars and paths become plain YAML types
            text = yaml.safe_dump(json.loads(json.dumps(obj, default=json_default)), sort_keys=True)
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
