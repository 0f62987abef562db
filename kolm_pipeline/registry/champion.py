"""Mirror of the serving pointer in the MLflow model registry: one registered model per task, one
version per artifact CID, and the alias ``champion`` on the version that serves.

The pointer on disk stays the source of truth; MLflow is where people browse models, so a swap registers
the artifact (the ``.kolm`` logged as an artifact of a ``deployment`` run) before the pointer moves and
moves the alias right after.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

CHAMPION_ALIAS = "champion"
CID_TAG = "kolm.artifact_cid"


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str


def registered_model_name(task: str) -> str:
    """MLflow model names may not contain '/' or ':'; task names never do."""
    return f"kolm-{task}"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    from kolm_pipeline.tracking import _quiet_mlflow

    _quiet_mlflow()
    return MlflowClient(tracking_uri)


def _find_version(client, name: str, cid: str) -> str | None:
    found = client.search_model_versions(f"name='{name}' and tag.`{CID_TAG}`='{cid}'")
    return str(max(int(version.version) for version in found)) if found else None


def register_artifact(
    tracking_uri: str, artifact_root: Path, task: str, artifact_path: Path, cid: str, tags: dict[str, str]
) -> ModelVersionRef:
    """The model version holding this artifact, created (with its run) the first time it is deployed."""
    from mlflow.exceptions import MlflowException

    from kolm_pipeline.tracking import experiment_id

    client = _client(tracking_uri)
    name = registered_model_name(task)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=f"kolm adapters of task {task}")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently; anything else re-raises here
    existing = _find_version(client, name, cid)
    if existing is not None:
        return ModelVersionRef(name, existing)
    run = client.create_run(experiment_id(tracking_uri, task, artifact_root), run_name="deployment",
                            tags={CID_TAG: cid, "task": task, **tags})
    try:
        client.log_artifact(run.info.run_id, str(artifact_path), artifact_path="kolm")
    finally:
        client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/kolm", run_id=run.info.run_id, tags={CID_TAG: cid, "task": task}
    )
    return ModelVersionRef(name, str(version.version))


def set_champion(tracking_uri: str, task: str, version: ModelVersionRef | None) -> None:
    """Point the ``champion`` alias at ``version``; None removes it (the task serves no adapter)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    name = registered_model_name(task)
    if version is None:
        with contextlib.suppress(MlflowException):  # no alias to remove
            client.delete_registered_model_alias(name, CHAMPION_ALIAS)
        return
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)


def champion_cid(tracking_uri: str, task: str) -> str | None:
    """The artifact CID the ``champion`` alias names, or None."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        version = client.get_model_version_by_alias(registered_model_name(task), CHAMPION_ALIAS)
    except MlflowException:
        return None
    return version.tags.get(CID_TAG)
