"""Operator actions on the serving pointer: swap an artifact in, roll a task back one step."""

from __future__ import annotations

from pathlib import Path

from kolm_pipeline.evaluate.gate import decide
from kolm_pipeline.registry.artifact import read_kolm, verify_kolm
from kolm_pipeline.registry.deploy import DeployRefused, artifact_cid_of
from kolm_pipeline.registry.keys import load_public_keys
from kolm_pipeline.registry.swap import publish_artifact, read_pointer, swap_pointer
from kolm_pipeline.settings import Settings


def _candidate_k(manifest: dict) -> float:
    return float(manifest["evals"]["candidate"]["k"])


def swap_artifact(settings: Settings, store, artifact: Path, strategy: str, actor: str) -> str:
    """Verify `artifact`; with `higher-k-wins` swap it in only when its recorded K beats the serving one's
    by the gate margin. Writes a registry row either way."""
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact}: no such artifact")
    report = verify_kolm(artifact, load_public_keys(settings.keys_dir))
    if not report.ok:
        raise DeployRefused(f"{artifact} does not verify: {'; '.join(report.problems)}")
    manifest = read_kolm(artifact).manifest
    task = manifest["task"]
    current = read_pointer(settings.adapters_dir, task)
    current_cid = artifact_cid_of(current) if current else None
    k_new = _candidate_k(manifest)
    k_current = _candidate_k(read_kolm(current).manifest) if current else float(manifest["evals"]["current"]["k"])
    if strategy == "higher-k-wins":
        decision = decide(k_new=k_new, k_current=k_current,
                          k_floor=float(manifest["evals"]["decision"]["k_floor"]), tripwire_clear=True)
        if not decision.swap:
            store.add_registry_row(task=task, from_cid=current_cid, to_cid=None, k_before=k_current, k_after=k_new,
                                   decision="refuse", actor=actor, details={"reason": decision.reason,
                                                                            "artifact": report.cid})
            raise DeployRefused(f"{task}: {decision.reason}")
    published = publish_artifact(settings.artifacts_dir, task, artifact)
    swap_pointer(settings.adapters_dir, task, published)
    store.add_registry_row(task=task, from_cid=current_cid, to_cid=artifact_cid_of(published), k_before=k_current,
                           k_after=k_new, decision="swap", actor=actor, details={"strategy": strategy})
    return f"{task}: {current_cid or '(base)'} → {artifact_cid_of(published)}"


def rollback(settings: Settings, store, task: str, actor: str) -> str:
    """Point the task back at what the last swap replaced (the bare base when it replaced nothing)."""
    current = read_pointer(settings.adapters_dir, task)
    if current is None:
        raise DeployRefused(f"{task}: nothing is deployed, nothing to roll back")
    current_cid = artifact_cid_of(current)
    last = next((row for row in store.registry_rows(task) if row.to_cid == current_cid
                 and row.decision in ("swap", "rollback")), None)
    if last is None:
        raise DeployRefused(f"{task}: no registry row says how {current_cid} was deployed")
    previous_cid = last.from_cid
    pointer = settings.adapters_dir / task
    if previous_cid is None:
        pointer.unlink()
    else:
        target = settings.artifacts_dir / task / f"{previous_cid}.kolm"
        if not target.is_file():
            raise DeployRefused(f"{task}: previous artifact {target} is missing")
        swap_pointer(settings.adapters_dir, task, target)
    store.add_registry_row(task=task, from_cid=current_cid, to_cid=previous_cid, k_before=last.k_after,
                           k_after=last.k_before, decision="rollback", actor=actor, details={"undoes": last.id})
    return f"{task}: rolled back {current_cid} → {previous_cid or '(bare base)'}"
