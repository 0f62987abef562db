"""Mirror of the serving pointer in the MLflow model registry: one registered model per task, one
version per artifact CID, and the alias ``champion`` on the version that serves.

A version is created from the **training run** of its adapter (found by the ``kolm.adapter_cid`` tag): the
``.kolm`` is logged into that run under ``kolm/`` and the version's source run is the one holding the loss
curve. Its tags carry the K-score, the accuracy and the other evaluation numbers the artifact's manifest
records. An artifact no tracked run trained (``kolm compile``, another installation) gets a run of its own
(``kolm.stage`` = ``artifact``).

The pointer on disk stays the source of truth: a swap registers the artifact before the pointer moves and
moves the alias right after, on every swap and rollback. The alias is a **read-only mirror**: moving it in
the MLflow UI changes nothing that serves (the next swap or rollback moves it back); ``kolm swap`` and
``kolm rollback`` are how a version is put into service. The descriptions of the model and its versions say so.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION_ALIAS = "champion"
CID_TAG = "kolm.artifact_cid"
KSCORE_TAG = "k_score"
ACCURACY_TAG = "accuracy"
TRAINING_RUN_TAG = "kolm.training_run_id"
EVALUATION_RUN_TAG = "kolm.evaluation_run_id"


def mirror_note(task: str) -> str:
    return (f"The `{CHAMPION_ALIAS}` alias is a read-only mirror of kolm's serving pointer for task {task}: kolm "
            "moves it on every swap and rollback, and moving it here changes nothing that serves (the next swap "
            f"or rollback moves it back). Put a version into service with `kolm swap --task {task} --cid CID` "
            f"or `kolm rollback --task {task}`.")


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str


def registered_model_name(task: str) -> str:
    """MLflow model names may not contain '/' or ':'; task names never do."""
    return f"kolm-{task}"


def _client(tracking_uri: str):
    from kolm_pipeline.tracking import _client as tracking_client

    return tracking_client(tracking_uri)


def _number(value: Any) -> str | None:
    return f"{float(value):.4f}" if isinstance(value, int | float) and not isinstance(value, bool) else None


def version_tags(task: str, cid: str, manifest: dict[str, Any]) -> dict[str, str]:
    """The model version's tags: the artifact's CID, the K-score and accuracy as headlines, and every number
    of the candidate's evaluation (``eval.*``) and the gate (``gate.*``) the manifest records."""
    tags = {CID_TAG: cid, "task": task}
    evals = manifest.get("evals") if isinstance(manifest.get("evals"), dict) else {}
    candidate = evals.get("candidate") if isinstance(evals.get("candidate"), dict) else {}
    current = evals.get("current") if isinstance(evals.get("current"), dict) else {}
    decision = evals.get("decision") if isinstance(evals.get("decision"), dict) else {}
    for key, value in candidate.items():
        if _number(value) is not None:
            tags[f"eval.{key}"] = _number(value)
    for tag, value in ((KSCORE_TAG, candidate.get("k")), (ACCURACY_TAG, candidate.get("accuracy")),
                       ("eval.current_k", current.get("k")), ("gate.delta", decision.get("delta")),
                       ("gate.k_floor", decision.get("k_floor"))):
        if _number(value) is not None:
            tags[tag] = _number(value)
    if isinstance(decision.get("reason"), str):
        tags["gate.reason"] = decision["reason"][:500]
    if isinstance(current.get("name"), str):
        tags["eval.replaced"] = current["name"]
    for key in ("adapter_cid", "recipe_cid", "corpus_cid", "parent_cid"):
        if isinstance(manifest.get(key), str):
            tags[f"kolm.{key}"] = manifest[key]
    return tags


def _description(task: str, cid: str, tags: dict[str, str], training_run: str | None) -> str:
    score = f"K {tags[KSCORE_TAG]}" if KSCORE_TAG in tags else "no recorded K"
    if ACCURACY_TAG in tags:
        score += f", accuracy {float(tags[ACCURACY_TAG]):.1%}"
    origin = f"trained in run {training_run}" if training_run else "not trained by a run of this tracking store"
    return f"kolm artifact {cid} of task {task} ({score}); {origin}.\n\n{mirror_note(task)}"


def _find_version(client, name: str, cid: str) -> str | None:
    found = client.search_model_versions(f"name='{name}' and tag.`{CID_TAG}`='{cid}'")
    return str(max(int(version.version) for version in found)) if found else None


def register_artifact(
    tracking_uri: str, artifact_root: Path, task: str, artifact_path: Path, cid: str, tags: dict[str, str],
    manifest: dict[str, Any] | None = None,
) -> ModelVersionRef:
    """The model version holding this artifact, created the first time it is deployed: from the training run
    of its adapter when the tracking store has one, else from a run made to hold it. The ``.kolm`` is logged
    into that run under ``kolm/``; `tags` (who and why) go on a run made here. `manifest`: the artifact's,
    read from `artifact_path` when not given."""
    from mlflow.exceptions import MlflowException

    from kolm_pipeline.registry.artifact import read_kolm
    from kolm_pipeline.tracking import ADAPTER_CID_TAG, STAGE_TAG, experiment_id, find_run

    client = _client(tracking_uri)
    name = registered_model_name(task)
    description = f"kolm adapters of task {task}.\n\n{mirror_note(task)}"
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            model = client.create_registered_model(name, description=description)
        except MlflowException:
            model = client.get_registered_model(name)  # created concurrently; anything else re-raises here
    if model.description != description:  # made before the note, or edited in the UI
        client.update_registered_model(name, description=description)
    existing = _find_version(client, name, cid)
    if existing is not None:
        return ModelVersionRef(name, existing)
    manifest = manifest if manifest is not None else read_kolm(artifact_path).manifest
    version_tags_ = version_tags(task, cid, manifest)
    exp = experiment_id(tracking_uri, task, artifact_root)
    adapter_cid = manifest.get("adapter_cid")
    training = find_run(tracking_uri, exp, "training", {ADAPTER_CID_TAG: adapter_cid}) \
        if isinstance(adapter_cid, str) else None
    if training is not None:
        run_id, artifact_uri = training.info.run_id, training.info.artifact_uri
        version_tags_[TRAINING_RUN_TAG] = run_id
        evaluation = find_run(tracking_uri, exp, "evaluation", {ADAPTER_CID_TAG: adapter_cid})
        if evaluation is not None:
            version_tags_[EVALUATION_RUN_TAG] = evaluation.info.run_id
        client.log_artifact(run_id, str(artifact_path), artifact_path="kolm")
    else:
        run = client.create_run(exp, run_name="artifact", tags={STAGE_TAG: "artifact", CID_TAG: cid, "task": task,
                                                                **tags})
        run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
        try:
            client.log_artifact(run_id, str(artifact_path), artifact_path="kolm")
        finally:
            client.set_terminated(run_id)
    version = client.create_model_version(
        name, source=f"{artifact_uri}/kolm/{Path(artifact_path).name}", run_id=run_id, tags=version_tags_,
        description=_description(task, cid, version_tags_, run_id if training is not None else None),
    )
    return ModelVersionRef(name, str(version.version))


def model_version_of(tracking_uri: str, task: str, cid: str) -> ModelVersionRef | None:
    """The model version holding artifact `cid` of `task`, or None."""
    version = _find_version(_client(tracking_uri), registered_model_name(task), cid)
    return ModelVersionRef(registered_model_name(task), version) if version is not None else None


def log_version_metrics(tracking_uri: str, task: str, cid: str, metrics: dict[str, float]) -> ModelVersionRef | None:
    """Log `metrics` (timestamped now) on the run behind the model version of artifact `cid`, so its charts
    follow the version while it serves (student routing's agreement, share, savings); None when no version
    holds `cid` (never deployed through a tracked swap)."""
    from mlflow.entities import Metric

    client = _client(tracking_uri)
    name = registered_model_name(task)
    version = _find_version(client, name, cid)
    if version is None:
        return None
    run_id = client.get_model_version(name, version).run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    return ModelVersionRef(name, version)


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
