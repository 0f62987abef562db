"""MLflow tracking shared by training and evaluation: one experiment per task, runs tagged with the
Dagster run id, partition and recipe CID so a run can be found from either side."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from kolm_pipeline.provenance.atomic import private_file

EXPERIMENT_PREFIX = "kolm/"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for name in ("mlflow", "alembic", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)


def experiment_id(tracking_uri: str, task: str, artifact_root: Path) -> str:
    """The experiment for a task, created with artifacts under KOLM_HOME (not the working directory)."""
    import mlflow

    _quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri)
    name = EXPERIMENT_PREFIX + task
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


@contextlib.contextmanager
def mlflow_run(
    tracking_uri: str, task: str, artifact_root: Path, run_name: str, tags: dict[str, str]
) -> Iterator[object]:
    """Open an MLflow run for `task`; yields the active run."""
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        private_file(Path(tracking_uri.removeprefix("sqlite:///")))  # run parameters name tasks and tenants
    exp = experiment_id(tracking_uri, task, artifact_root)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags) as run:
        yield run


def run_url(tracking_uri: str, run: object) -> str:
    """A link to the run: the MLflow UI address for a server, a `runs:/` URI for a local store."""
    info = run.info  # type: ignore[attr-defined]
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
    return f"runs:/{info.run_id}"
