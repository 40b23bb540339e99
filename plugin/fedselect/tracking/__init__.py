"""MLflow tracking for training runs, safe with several processes writing one sqlite store.

Modules (each imports ``mlflow`` only inside the functions that need it, so importing this
package, reading run records or flattening a config stays fast):

* :mod:`~fedselect.tracking.store`: tracking URIs, the shared sqlite store, its lock and the
  retry on ``database is locked``, :func:`prepare_store`;
* :mod:`~fedselect.tracking.tracker`: :class:`RunTracker`, one MLflow run as a context manager;
* :mod:`~fedselect.tracking.params`: configs flattened to params (:func:`flatten`);
* :mod:`~fedselect.tracking.records`: run record JSON files (atomic writes);
* :mod:`~fedselect.tracking.queries`: runs and metric histories read back (:func:`load_runs`);
* :mod:`~fedselect.tracking.compare` and :mod:`~fedselect.tracking.tables`: the tables of
  ``fedselect compare`` and the study summaries (import them from there: they need numpy).

The names below are re-exported here, where other code has always imported them from.
"""

from fedselect.tracking.params import Scalar, flatten
from fedselect.tracking.queries import load_runs, metric_history
from fedselect.tracking.records import ALGO_OPTIONS_KEY, RUN_RECORD_KEYS, read_run_record, write_run_record
from fedselect.tracking.store import (
    ARTIFACT_DIRNAME,
    DB_FILENAME,
    default_tracking_uri,
    is_transient,
    prepare_store,
    run_tracking_uri,
    sqlite_path,
    with_retry,
)
from fedselect.tracking.tracker import RunTracker

__all__ = [
    "ALGO_OPTIONS_KEY", "ARTIFACT_DIRNAME", "DB_FILENAME", "RUN_RECORD_KEYS", "RunTracker", "Scalar",
    "default_tracking_uri", "flatten", "is_transient", "load_runs", "metric_history", "prepare_store",
    "read_run_record", "run_tracking_uri", "sqlite_path", "with_retry", "write_run_record",
]
