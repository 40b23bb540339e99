"""Reading runs back from an MLflow store: runs as plain dicts, and one metric's per-round history.

Reading never creates a store: a missing sqlite file is a FileNotFoundError naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedselect.tracking.store import existing_client, metric_value, with_retry

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def load_runs(tracking_uri: str, *, experiment: str | None = None, run_ids: list[str] | None = None,
              tags: dict[str, str] | None = None) -> list[dict]:
    """Runs of a store as plain dicts, filtered by experiment name, run ids and exact tag values.

    Each dict has run_id, run_name, experiment_id, status, start_time, end_time (ms),
    artifact_uri, params (strings), tags and metrics (latest value per key). Deleted runs are
    left out. Order: ``run_ids`` order if given, else by start time.
    """
    client = existing_client(tracking_uri)
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
    return [_as_dict(run) for run in runs if all(run.data.tags.get(k) == v for k, v in wanted.items())]


def _as_dict(run) -> dict:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "artifact_uri": run.info.artifact_uri,
        "params": dict(run.data.params),
        "tags": dict(run.data.tags),
        "metrics": {k: metric_value(v) for k, v in run.data.metrics.items()},
    }


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
    client = existing_client(tracking_uri)
    points = with_retry("metric history", client.get_metric_history, run_id, key)
    points = sorted(points, key=lambda m: (m.step, m.timestamp))
    return [(int(m.step), metric_value(float(m.value))) for m in points]
