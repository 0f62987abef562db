"""MLflow tracking shared by training, evaluation and deployment.

Layout (one experiment ``kolm/<task>`` per task):

- one **parent run** per Dagster run (``kolm.stage`` = ``dagster_run``), found by its ``dagster_run_id`` tag and
  created by whichever step needs it first; its status follows its children;
- its **children** ``training`` (parameters, the loss per step), ``evaluation`` (both sides' K-score parts, the
  gate) and ``deployment`` (what was swapped), each with ``mlflow.parentRunId`` set;
- the tags ``dagster_run_id``, ``partition`` and ``task`` on every one of them, so a run can be found from
  either side.

The experiment is tagged as a model-development experiment and every link carries
``?workflowType=machine_learning``, so MLflow 3's UI opens on the runs table rather than the GenAI traces view.
``python -m kolm_pipeline.tracking`` (``make mlflow``) serves the UI on the tracking store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

from kolm_pipeline.provenance.atomic import private_file

EXPERIMENT_PREFIX = "kolm/"
# What MLflow 3's UI reads to pick an experiment's view: earlier 3.x UIs read this experiment tag; the 3.17 UI
# (server/js) ignores it and reads the `workflowType` query parameter, else the browser's last choice, else GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "?workflowType=machine_learning"
STAGE_TAG = "kolm.stage"  # dagster_run | training | evaluation | deployment | artifact
ADAPTER_CID_TAG = "kolm.adapter_cid"
PARENT_STAGE = "dagster_run"
PARENT_RUN_TAG = "mlflow.parentRunId"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    for name in ("mlflow", "alembic", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    _quiet_mlflow()
    if tracking_uri.startswith("sqlite:///"):
        private_file(Path(tracking_uri.removeprefix("sqlite:///")))  # run parameters name tasks and tenants
    return MlflowClient(tracking_uri)


def dagster_tags(dagster_run_id: str, partition: str, task: str) -> dict[str, str]:
    """The tags every MLflow run of one Dagster run carries."""
    return {"dagster_run_id": dagster_run_id, "partition": partition, "task": task}


def experiment_id(tracking_uri: str, task: str, artifact_root: Path) -> str:
    """The experiment for a task, created with artifacts under KOLM_HOME (not the working directory) and
    tagged so that MLflow's UI shows it as a model-development experiment (its runs table)."""
    import mlflow

    client = _client(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    name = EXPERIMENT_PREFIX + task
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag existed
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri(),
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def parent_run(tracking_uri: str, task: str, artifact_root: Path, tags: dict[str, str]) -> tuple[str, str]:
    """(experiment id, run id) of the MLflow run that stands for one Dagster run (``tags['dagster_run_id']``),
    created the first time one of its steps asks. Steps of one Dagster run follow each other, so two never
    race to create it."""
    client = _client(tracking_uri)
    exp = experiment_id(tracking_uri, task, artifact_root)
    dagster_run_id = tags["dagster_run_id"]
    found = client.search_runs(
        [exp], filter_string=f"tags.`{STAGE_TAG}` = '{PARENT_STAGE}' and tags.dagster_run_id = '{dagster_run_id}'",
        max_results=1,
    )
    if found:
        return exp, found[0].info.run_id
    run = client.create_run(exp, run_name=f"dagster {dagster_run_id[:8]} · {tags.get('partition', task)}",
                            tags={**tags, STAGE_TAG: PARENT_STAGE,
                                  "mlflow.note.content": f"Dagster run {dagster_run_id}; its steps are the "
                                                         "child runs (training, evaluation, deployment)."})
    return exp, run.info.run_id


@contextlib.contextmanager
def mlflow_run(
    tracking_uri: str, task: str, artifact_root: Path, run_name: str, tags: dict[str, str],
    parent_run_id: str | None = None,
) -> Iterator[object]:
    """Open an MLflow run for `task` (a child of `parent_run_id` when given); yields the active run.

    The parent is marked running while the child runs and ends with the child's status, so the runs table
    shows a failed step on its Dagster run's row."""
    import mlflow

    exp = experiment_id(tracking_uri, task, artifact_root)
    client = _client(tracking_uri) if parent_run_id else None
    if client is not None:
        client.update_run(parent_run_id, status="RUNNING")
    status = "FAILED"
    try:
        with mlflow.start_run(experiment_id=exp, run_name=run_name, tags={STAGE_TAG: run_name, **tags},
                              parent_run_id=parent_run_id) as run:
            yield run
        status = "FINISHED"
    finally:
        if client is not None:
            client.set_terminated(parent_run_id, status=status)


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Add tags to a run that has ended (the adapter's CID, known once the trainer is done)."""
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_parent_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float]) -> None:
    """Headline numbers on the parent run, so the runs table shows them on the Dagster run's row."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    _client(tracking_uri).log_batch(run_id, metrics=batch)


def find_run(tracking_uri: str, experiment: str, stage: str, tags: dict[str, str]) -> object | None:
    """The newest run of `stage` in `experiment` carrying every tag in `tags`, or None."""
    client = _client(tracking_uri)
    where = [f"tags.`{STAGE_TAG}` = '{stage}'"] + [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    found = client.search_runs([experiment], filter_string=" and ".join(where),
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


# --- links into the MLflow UI --------------------------------------------------------------------------------


def ui_link(ui_url: str, *path: str, tab: str | None = None) -> str:
    """A page of the MLflow UI at `ui_url` (hash routes), in its model-development view."""
    parts = [quote(part, safe="") for part in path] + ([tab] if tab else [])
    return f"{ui_url.rstrip('/')}/#/{'/'.join(parts)}{UI_QUERY}"


def experiment_ui_url(ui_url: str, experiment: str) -> str:
    """The experiment's runs table."""
    return ui_link(ui_url, "experiments", experiment, "runs")


def run_ui_url(ui_url: str, experiment: str, run_id: str, tab: str | None = None) -> str:
    """A run's page; `tab` = ``model-metrics`` opens its metric charts (the loss curve of a training run)."""
    return ui_link(ui_url, "experiments", experiment, "runs", run_id, tab=tab)


def model_version_ui_url(ui_url: str, name: str, version: str) -> str:
    return ui_link(ui_url, "models", name, "versions", str(version))


# --- `make mlflow` ----------------------------------------------------------------------------------------


def server_command(tracking_uri: str, artifact_root: Path, ui_url: str) -> list[str] | None:
    """The `mlflow server` command that serves the UI on the tracking store where `ui_url` points; None when
    the tracking store is itself a server (nothing to start: open it)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    where = urlsplit(ui_url)
    host = where.hostname or "127.0.0.1"
    port = where.port or (443 if where.scheme == "https" else 80)
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", tracking_uri,
               "--default-artifact-root", artifact_root.resolve().as_uri(),
               "--artifacts-destination", artifact_root.resolve().as_uri(),
               "--host", host, "--port", str(port), "--workers", "1"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        command += ["--allowed-hosts", f"{host},{host}:{port}"]
    return command


def main() -> None:
    """Serve the MLflow UI on this installation's tracking store (`make mlflow`)."""
    from kolm_pipeline.settings import load_settings

    settings = load_settings()
    artifact_root = settings.home / "mlflow-artifacts"
    command = server_command(settings.mlflow_tracking_uri, artifact_root, settings.mlflow_ui_url)
    if command is None:
        print(f"KOLM_MLFLOW_URI names a tracking server; open {ui_link(settings.mlflow_ui_url, 'experiments')}")
        return
    artifact_root.mkdir(parents=True, exist_ok=True)
    if settings.mlflow_tracking_uri.startswith("sqlite:///"):
        private_file(Path(settings.mlflow_tracking_uri.removeprefix("sqlite:///")))
    print(f"MLflow UI on {settings.mlflow_tracking_uri}: {ui_link(settings.mlflow_ui_url, 'experiments')}",
          flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
