"""The deployment stage: sign the `.kolm`, publish it, swap the task's pointer, write the registry row.

It only runs on an evaluation whose gate said swap; anything else is refused here too, so a later
manual materialization cannot ship what the gate turned down.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.corpus.recipe import load_recipe
from kolm_pipeline.evaluate.result import EvaluationResult
from kolm_pipeline.evaluate.tripwire import record_good_cycle
from kolm_pipeline.provenance.errors import DeployRefused
from kolm_pipeline.registry.artifact import build_kolm, extract_adapter
from kolm_pipeline.registry.manage import activate, artifact_cid_of, local_artifact, verified_artifact
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.corpus import corpus_capture_ids
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.train.distill import TRAINER_VERSION

__all__ = ["DeployRefused", "DeployResult", "artifact_cid_of", "build_manifest", "current_champion", "deploy"]


@dataclass(frozen=True)
class DeployResult:
    task: str
    artifact_cid: str
    artifact_path: Path
    previous_cid: str | None
    registry_row: int


def champion_artifact(settings: Settings, task: str, store=None) -> Path | None:
    """The serving artifact of `task` on this host: the pointer's; on a host without it (a run pod that shares only
    the store and the object store), the registry's champion, fetched by CID."""
    pointer = read_pointer(settings.adapters_dir, task)
    if pointer is not None or store is None:
        return pointer
    cid = store.champions(task).get(task)
    return local_artifact(settings, task, cid) if cid else None


def current_champion(settings: Settings, task: str, store=None) -> tuple[str, Path] | None:
    """The serving artifact's CID and its adapter, extracted once into a cache directory."""
    pointer = champion_artifact(settings, task, store)
    if pointer is None:
        return None
    cid = artifact_cid_of(pointer)
    cache = settings.work_dir / task / "champions" / cid
    if not (cache / "adapter_config.json").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        extract_adapter(pointer, cache)
    return cid, cache


def build_manifest(workdir: NamespaceWorkdir, evaluation: EvaluationResult, counters: dict,
                   parent_cid: str | None) -> dict:
    """The `.kolm` manifest: what task, what data, what code, what score, what it replaced."""
    recipe = load_recipe(workdir.recipe)
    training = json.loads((workdir.adapter / "kolm_training.json").read_text())
    return {
        "task": workdir.task,
        "tenant": workdir.tenant,
        "namespace": workdir.namespace,
        "base_model": {"id": training["base_model"], "digest": training["base_digest"]},
        "lora": training["config"],
        "corpus_cid": recipe.spec.get("corpus_cid"),
        "recipe_cid": evaluation.recipe_cid,
        "adapter_cid": evaluation.adapter_cid,
        "trainer_version": TRAINER_VERSION,
        "output_kind": recipe.spec["output_kind"],
        "verifier": recipe.spec["verifier"],
        "labels": recipe.spec.get("labels"),
        "json_schema": recipe.spec.get("json_schema"),
        # The most new tokens an answer had in evaluation: `kolm serve`'s max_tokens for a request naming none.
        "max_new_tokens": (evaluation.candidate.model_extra or {}).get("generation_budget")
        or recipe.spec.get("max_new_tokens"),
        "evals": {side: evaluation.document()[side] for side in ("candidate", "current", "decision")},
        # A vision-language base: which processor turns images into its input (the base digest covers its files).
        **({"vision": {"processor": training.get("processor"), "processor_digest": training.get("processor_digest")}}
           if training.get("vision") else {}),
        "counters": counters,
        "parent_cid": parent_cid,
    }


def deploy(workdir: NamespaceWorkdir, settings: Settings, store, actor: str) -> DeployResult:
    """Ship the evaluated candidate if, and only if, its gate decision says swap; what it ships is the chain the
    evaluation's receipt names (pulled by CID)."""
    workdir.pull("evaluation")
    if not workdir.evaluation.is_file():
        raise DeployRefused(f"{workdir.evaluation}: no evaluation for {workdir.partition}")
    evaluation = EvaluationResult.read(workdir.evaluation)
    decision = evaluation.decision
    if not decision.swap:
        raise DeployRefused(f"gate refused the candidate for {workdir.task}: {decision.reason}")
    previous = champion_artifact(settings, workdir.task, store)
    previous_cid = artifact_cid_of(previous) if previous else None
    manifest = build_manifest(workdir, evaluation, store.counters(workdir.tenant, workdir.namespace), previous_cid)
    staging = workdir.root / "artifact.kolm"
    build_kolm(
        staging,
        manifest=manifest,
        adapter_dir=workdir.adapter,
        evals=evaluation.document(),
        receipts=workdir.chain(),
        signer=workdir.signer(),
    )
    try:
        artifact, cid = verified_artifact(settings, staging)
        activation = activate(
            settings,
            store,
            source=staging,
            artifact=artifact,
            cid=cid,
            decision="swap",
            from_cid=previous_cid,
            k_before=evaluation.current.k,
            k_after=evaluation.candidate.k,
            actor=actor,
            details={"reason": decision.reason, "current": evaluation.current_name},
            signer=workdir.signer(),
            accuracy_before=evaluation.current.accuracy,
        )
    finally:
        staging.unlink(missing_ok=True)
    record_good_cycle(workdir.tripwire_ledger(store), workdir.task, evaluation.tripwire, cid)
    store.mark_merged(workdir.tenant, workdir.namespace, corpus_capture_ids(workdir.corpus.read_bytes()))
    return DeployResult(task=workdir.task, artifact_cid=cid, artifact_path=activation.artifact_path,
                        previous_cid=previous_cid, registry_row=activation.registry_row)
