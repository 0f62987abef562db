"""Putting artifacts into service: swap, rollback, and the registry's account of both.

Every change of a task's pointer goes through ``activate``: verify, publish to the object store,
register the MLflow model version, sign the deployment receipt, flip the pointer atomically, move the
``champion`` alias and write the registry row. The Dagster ``deployment`` asset, ``kolm swap`` and
``kolm rollback`` all take this one path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolm_pipeline.evaluate.gate import decide
from kolm_pipeline.provenance.atomic import remove_stale_temps
from kolm_pipeline.provenance.cid import sha256_of_cid
from kolm_pipeline.provenance.errors import DeployRefused, RegistryError
from kolm_pipeline.provenance.keys import keyid_for, load_private_key, load_public_keys, public_key_text
from kolm_pipeline.provenance.objectstore import (
    DirectoryStore,
    ObjectStore,
    artifact_key,
    fetch_verified,
    open_store,
)
from kolm_pipeline.provenance.receipts import receipt_cid
from kolm_pipeline.registry import champion
from kolm_pipeline.registry.artifact import KolmArtifact, read_kolm, verify_kolm
from kolm_pipeline.registry.deployment import SUFFIX, make_deployment_receipt, write_deployment_receipt
from kolm_pipeline.registry.provenance import (
    candidate_accuracy,
    candidate_k,
    composition_line,
    percent,
    provenance,
    summary_lines,
)
from kolm_pipeline.registry.refs import KIND_ARTIFACT, VersionRef, resolve_ref
from kolm_pipeline.registry.swap import pointer_target, publish_artifact, swap_pointer, validate_task
from kolm_pipeline.settings import Settings

STRATEGIES = ("higher-k-wins", "force")
LIVE_MONITOR_ACTOR = "live-monitor"


class PointerMoved(DeployRefused):
    """A rollback meant for one CID found the pointer naming another: someone else acted first."""


@dataclass(frozen=True)
class Activation:
    """What one pointer change did; ``warnings`` are things that did not stop it (an MLflow alias)."""

    task: str
    from_cid: str | None
    to_cid: str
    artifact_path: Path
    artifact_url: str
    registry_row: int
    receipt_cid: str
    warnings: list[str] = field(default_factory=list)
    # What the served artifact is made of, when it is a composition (`kolm compose`).
    parts: str | None = None

    def describe(self, verb: str = "swapped") -> str:
        lines = [f"{self.task}: {verb} {self.from_cid or '(base)'} → {self.to_cid} (registry row {self.registry_row})"]
        lines += [f"  {self.parts}"] if self.parts else []
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def artifact_cid_of(path: Path) -> str:
    """Published artifacts are named ``<cid>.kolm``."""
    return Path(path).name.removesuffix(".kolm")


def artifact_store(settings: Settings) -> ObjectStore:
    """The configured object store (``KOLM_ARTIFACTS_URL``), by default the local artifacts directory."""
    return open_store(settings.artifacts_url, settings.artifacts_dir)


def _is_local(store: ObjectStore, settings: Settings) -> bool:
    return isinstance(store, DirectoryStore) and store.root == settings.artifacts_dir.absolute()


def verified_artifact(settings: Settings, path: Path) -> tuple[KolmArtifact, str]:
    """Parse ``path`` after checking every signature and CID; refuse it naming what failed."""
    path = Path(path)
    if not path.is_file():
        raise DeployRefused(f"{path}: no such artifact")
    report = verify_kolm(path, load_public_keys(settings.keys_dir))
    if not report.ok:
        raise DeployRefused(f"{path} does not verify: {'; '.join(report.problems)}")
    artifact = read_kolm(path)
    task = artifact.manifest.get("task")
    try:
        validate_task(task)
    except RegistryError as exc:
        raise DeployRefused(f"{path}: manifest names no valid task ({exc})") from None
    return artifact, report.cid


def publish(settings: Settings, task: str, source: Path) -> tuple[Path, str]:
    """Copy the artifact into the local content-addressed cache and the object store; (local path, URL)."""
    local = publish_artifact(settings.artifacts_dir, task, source)
    store = artifact_store(settings)
    key = artifact_key(task, artifact_cid_of(local))
    if _is_local(store, settings) or store.exists(key):
        return local, store.url(key)
    return local, store.put(key, local)


def local_artifact(settings: Settings, task: str, cid: str) -> Path:
    """The published artifact ``cid`` of ``task`` on local disk, fetched from the object store if needed."""
    validate_task(task)
    try:
        sha256_of_cid(cid)
    except RegistryError as exc:
        raise DeployRefused(str(exc)) from None
    path = settings.artifacts_dir / task / f"{cid}.kolm"
    if path.is_file():
        return path
    store = artifact_store(settings)
    key = artifact_key(task, cid)
    if _is_local(store, settings) or not store.exists(key):
        raise DeployRefused(f"{task}: artifact {cid} was never published (not at {store.url(key)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    return fetch_verified(store, key, path, cid)


def _signer(settings: Settings, artifact: KolmArtifact):
    tenant = artifact.manifest.get("tenant")
    if not isinstance(tenant, str):
        raise DeployRefused("the artifact's manifest names no tenant, so no key can sign its deployment")
    private_key = load_private_key(settings.keys_dir, tenant)
    return private_key, keyid_for(private_key.public_key())


def _publish_public_key(settings: Settings, store, tenant: object) -> None:
    """Publish the tenant's public key to the store: replicas that share only the store with this deployer
    (`kolm serve --follow registry`) verify the artifact with it."""
    if not isinstance(tenant, str):
        return
    try:
        keyid, text = public_key_text(settings.keys_dir, tenant)
    except RegistryError:  # no key here: the artifact was verified with keys from elsewhere
        return
    store.publish_public_key(tenant, keyid, text)


def activate(
    settings: Settings,
    store,
    *,
    source: Path,
    artifact: KolmArtifact,
    cid: str,
    decision: str,
    from_cid: str | None,
    k_before: float | None,
    k_after: float | None,
    actor: str,
    details: dict[str, Any] | None = None,
    signer=None,
    accuracy_before: float | None = None,
) -> Activation:
    """Put a verified artifact into service for its task and record it (see the module docstring).
    ``accuracy_before`` is the accuracy of what it replaces (its own comes from its manifest); the row keeps
    both beside the two K-scores."""
    task = validate_task(artifact.manifest["task"])
    signer = signer or _signer(settings, artifact)
    _publish_public_key(settings, store, artifact.manifest.get("tenant"))
    for directory in (settings.adapters_dir, settings.artifacts_dir / task):
        remove_stale_temps(directory)  # what writers killed mid-swap left behind
    local, url = publish(settings, task, source)
    try:
        version = champion.register_artifact(
            settings.mlflow_tracking_uri, settings.home / "mlflow-artifacts", task, local, cid,
            tags={"actor": actor, "decision": decision},
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the pointer has not moved yet
        raise RegistryError(f"{task}: registering {cid} in MLflow ({settings.mlflow_tracking_uri}) failed, "
                            f"nothing was swapped: {exc}") from exc
    receipt = make_deployment_receipt(artifact, cid, decision=decision, from_cid=from_cid, k_before=k_before,
                                      k_after=k_after, actor=actor, signer=signer)
    write_deployment_receipt(local, receipt)
    object_store = artifact_store(settings)
    if not _is_local(object_store, settings):
        object_store.put(artifact_key(task, cid) + SUFFIX, local.with_name(local.name + SUFFIX))
    swap_pointer(settings.adapters_dir, task, local)
    warnings: list[str] = []
    try:
        champion.set_champion(settings.mlflow_tracking_uri, task, version)
    except Exception as exc:  # noqa: BLE001 - the pointer already moved; say so rather than undo a good swap
        warnings.append(f"MLflow alias '{champion.CHAMPION_ALIAS}' not moved to version {version.version}: {exc}")
    row = store.add_registry_row(
        task=task, from_cid=from_cid, to_cid=cid, k_before=k_before, k_after=k_after, decision=decision, actor=actor,
        details={
            **(details or {}),
            "accuracy": {"before": accuracy_before, "after": candidate_accuracy(artifact.manifest)},
            "provenance": provenance(artifact, cid),
            "artifact_url": url,
            "receipt_cid": receipt_cid(receipt),
            "deployment_receipt": receipt.decode("ascii"),
            "mlflow": {"model": version.name, "version": version.version, "alias_moved": not warnings},
        },
    )
    return Activation(task=task, from_cid=from_cid, to_cid=cid, artifact_path=local, artifact_url=url,
                      registry_row=row, receipt_cid=receipt_cid(receipt), warnings=warnings,
                      parts=composition_line(artifact.manifest.get("composition")))


def _current(settings: Settings, task: str, store=None) -> tuple[str | None, KolmArtifact | None]:
    """The serving CID and its artifact; the artifact is None when the file is gone or unreadable, so a
    swap or rollback can still repair a damaged deployment. A host without the task's pointer file (one that
    shares only the store and the object store with the deployers) reads the champion from the registry and
    fetches its artifact by CID."""
    pointer = pointer_target(settings.adapters_dir, task)
    if pointer is None:
        cid = store.champions(task).get(task) if store is not None else None
        if cid is None:
            return None, None
        try:
            return cid, read_kolm(local_artifact(settings, task, cid))
        except (DeployRefused, RegistryError):
            return cid, None
    try:
        return artifact_cid_of(pointer), read_kolm(pointer)
    except RegistryError:
        return artifact_cid_of(pointer), None


def swap_artifact(
    settings: Settings, store, artifact: Path, strategy: str, actor: str, task: str | None = None
) -> Activation:
    """Verify ``artifact`` and make it its task's serving adapter.

    ``higher-k-wins`` swaps only when the artifact's recorded K beats the serving one's by the gate
    margin (a refusal is written to the registry too); ``force`` skips that comparison, never the checks.
    """
    if strategy not in STRATEGIES:
        raise DeployRefused(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    parsed, cid = verified_artifact(settings, Path(artifact))
    manifest = parsed.manifest
    if task is not None and manifest["task"] != task:
        raise DeployRefused(f"{artifact} is an artifact of task {manifest['task']!r}, not {task!r}")
    task = manifest["task"]
    current_cid, current = _current(settings, task, store)
    if current_cid == cid:
        raise DeployRefused(f"{task}: {cid} is already serving")
    k_new, accuracy_new = candidate_k(manifest), candidate_accuracy(manifest)
    evals = manifest.get("evals") if isinstance(manifest.get("evals"), dict) else {}
    if current is not None:
        k_current, accuracy_current = candidate_k(current.manifest), candidate_accuracy(current.manifest)
    elif current_cid is None:  # the first deployment: the bare base, as the artifact's evaluation measured it
        k_current = (evals.get("current") or {}).get("k")
        accuracy_current = (evals.get("current") or {}).get("accuracy")
    else:
        k_current = accuracy_current = None  # the serving artifact is gone or damaged
    if strategy == "higher-k-wins":
        if k_new is None or k_current is None:
            raise DeployRefused(f"{artifact}: its manifest records no K to compare; use --strategy force")
        k_floor = float((evals.get("decision") or {}).get("k_floor") or 0.0)
        decision = decide(k_new=k_new, k_current=float(k_current), k_floor=k_floor, tripwire_clear=True,
                          accuracy_new=accuracy_new, accuracy_current=accuracy_current)
        if not decision.swap:
            store.add_registry_row(task=task, from_cid=current_cid, to_cid=None, k_before=k_current, k_after=k_new,
                                   decision="refuse", actor=actor,
                                   details={"reason": decision.reason, "artifact": cid, "strategy": strategy,
                                            "accuracy": {"before": accuracy_current, "after": accuracy_new}})
            raise DeployRefused(f"{task}: {decision.reason}")
    return activate(settings, store, source=Path(artifact), artifact=parsed, cid=cid, decision="swap",
                    from_cid=current_cid, k_before=k_current, k_after=k_new, actor=actor,
                    details={"strategy": strategy}, accuracy_before=accuracy_current)


def known_task(settings: Settings, store, task: str) -> bool:
    """A task exists once something was published or recorded for it."""
    validate_task(task)
    return (settings.artifacts_dir / task).is_dir() or bool(store.registry_rows(task))


def swap_to_cid(settings: Settings, store, task: str, cid: str, strategy: str, actor: str) -> Activation:
    """Swap ``task`` to an artifact that was published before (roll forward, or pick an older one); ``cid`` is
    anything the resolver reads as an artifact (``previous``, a CID, a unique CID prefix)."""
    if not known_task(settings, store, task):
        raise DeployRefused(f"unknown task {task!r}: nothing was ever published or deployed for it")
    resolved = resolve_ref(settings, store, cid, task, allow=(KIND_ARTIFACT,))
    return swap_artifact(settings, store, local_artifact(settings, task, str(resolved.cid)), strategy, actor,
                         task=task)


def artifact_path_of(settings: Settings, store, ref: str, task: str | None = None) -> tuple[Path, VersionRef]:
    """The local file of the artifact ``ref`` names (``current``, ``previous``, a CID or a unique prefix), for
    verbs that read an artifact (``kolm verify``); fetched from the object store when not on disk."""
    resolved = resolve_ref(settings, store, ref, task, allow=(KIND_ARTIFACT,))
    if resolved.task is None:
        raise DeployRefused(f"{resolved.describe()}: no published artifact of any task has this CID; give --task")
    return local_artifact(settings, resolved.task, str(resolved.cid)), resolved


def deployment_stack(rows: list) -> list[str]:
    """The CIDs that served, oldest first, as swaps pushed them and rollbacks popped them."""
    stack: list[str] = []
    for row in reversed(rows):  # rows come newest first
        if row.decision == "swap" and row.to_cid:
            stack.append(row.to_cid)
        elif row.decision == "rollback" and stack:
            stack.pop()
    return stack


def condemned_cids(rows: list) -> set[str]:
    """CIDs the live monitor took out of service: never restored automatically, so a rollback cannot loop."""
    return {row.from_cid for row in rows
            if row.actor == LIVE_MONITOR_ACTOR and row.decision in ("rollback", "alert") and row.from_cid}


def rollback(
    settings: Settings,
    store,
    task: str,
    actor: str,
    *,
    details: dict[str, Any] | None = None,
    expected_cid: str | None = None,
    refuse_condemned: bool = False,
) -> Activation:
    """Restore the version that served before the current one, in one step, and record it as a row.

    ``details`` (a ``reason`` above all) go into the registry row. ``expected_cid`` rolls back only if the
    pointer still names that CID (PointerMoved otherwise), so several serving replicas that condemn the
    same adapter roll back once. ``refuse_condemned`` refuses to restore a CID the live monitor condemned.
    """
    if not known_task(settings, store, task):
        raise DeployRefused(f"unknown task {task!r}: it has never been deployed")
    current_cid, current = _current(settings, task, store)
    if current_cid is None:
        raise DeployRefused(f"{task}: nothing is deployed, nothing to roll back")
    if expected_cid is not None and current_cid != expected_cid:
        raise PointerMoved(f"{task}: the pointer names {current_cid}, not {expected_cid}; it was moved already")
    rows = store.registry_rows(task)
    stack = deployment_stack(rows)
    if not stack or stack[-1] != current_cid:
        last = stack[-1] if stack else "nothing"
        raise DeployRefused(f"{task}: the pointer names {current_cid} but the registry's last deployment is {last}; "
                            f"pick a version with `kolm swap --task {task} --cid CID`")
    if len(stack) < 2:
        raise DeployRefused(f"{task}: no previous version to roll back to ({current_cid} is its first deployment)")
    previous_cid = stack[-2]
    if refuse_condemned and previous_cid in condemned_cids(rows):
        raise DeployRefused(f"{task}: the previous version {previous_cid} was itself taken out of service by the "
                            f"live monitor; pick a version with `kolm swap --task {task} --cid CID`")
    parsed, cid = verified_artifact(settings, local_artifact(settings, task, previous_cid))
    k_before = candidate_k(current.manifest) if current is not None else None
    accuracy_before = candidate_accuracy(current.manifest) if current is not None else None
    return activate(settings, store, source=settings.artifacts_dir / task / f"{cid}.kolm", artifact=parsed, cid=cid,
                    decision="rollback", from_cid=current_cid, k_before=k_before,
                    k_after=candidate_k(parsed.manifest), actor=actor, details=details,
                    accuracy_before=accuracy_before)


# --- the registry's account -------------------------------------------------------------------------------


def _k(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def row_accuracy(row) -> tuple[float | None, float | None]:
    """(accuracy before, accuracy after) of a registry row: what the row recorded beside the two K-scores;
    for a deployment recorded before rows kept it, the artifact's own accuracy from its provenance."""
    details = row.details if isinstance(row.details, dict) else {}
    recorded = details.get("accuracy")
    if isinstance(recorded, dict):
        return _number(recorded.get("before")), _number(recorded.get("after"))
    score = (details.get("provenance") or {}).get("score") if isinstance(details.get("provenance"), dict) else None
    return None, _number(score.get("accuracy")) if isinstance(score, dict) else None


def _change(before: str, after: str, width: int) -> str:
    return f"{before:>{width}} → {after:<{width}}"


def log_lines(rows: list) -> list[str]:
    """``kolm registry log``: one line per row, newest first, accuracy (the headline) beside K, and for each
    deployment its provenance."""
    lines = [f"{'time':<20} {'task':<22} {'decision':<9} {'accuracy before → after':<23}  "
             f"{'K before → after':<17}  from → to"]
    for row in rows:
        acc_before, acc_after = row_accuracy(row)
        lines.append(f"{row.created_at:%Y-%m-%d %H:%M:%S}  {row.task:<22} {row.decision:<9} "
                     f"{_change(percent(acc_before), percent(acc_after), 6):<23}  "
                     f"{_change(_k(row.k_before), _k(row.k_after), 6):<17}  "
                     f"{row.from_cid or '(base)'} → {row.to_cid or '-'}  by {row.actor}")
        info = row.details.get("provenance") if isinstance(row.details, dict) else None
        if isinstance(info, dict):
            lines += [f"    {line}" for line in summary_lines(info)]
            lines.append(f"    replaced: {row.from_cid or '(bare base)'} (accuracy {percent(acc_before)}, "
                         f"K {_k(row.k_before)})")
        reason = row.details.get("reason") if isinstance(row.details, dict) else None
        if reason and row.decision != "swap":
            lines.append(f"    {reason}")
        parts = row.details.get("composition") if isinstance(row.details, dict) else None
        if isinstance(parts, list) and not isinstance(info, dict):  # a refused composition: no provenance line
            lines.append(f"    {composition_line({'parts': parts, 'combination': 'cat', 'rank': '?'})}")
    return lines


def describe_cid(settings: Settings, store, cid: str, task: str | None = None) -> dict[str, Any]:
    """Everything the registry knows about one artifact: provenance and every row that names it. ``cid`` is
    anything the resolver reads as an artifact (``current`` and ``previous`` need ``task``)."""
    resolved = resolve_ref(settings, store, cid, task, allow=(KIND_ARTIFACT,))
    cid = str(resolved.cid)
    rows = [row for row in store.registry_rows(task)
            if cid in (row.from_cid, row.to_cid) or row.details.get("artifact") == cid]
    info = next((row.details["provenance"] for row in rows if row.to_cid == cid and "provenance" in row.details), None)
    if info is None:
        local = next(iter(settings.artifacts_dir.glob(f"*/{cid}.kolm")), None)
        if local is not None:
            info = provenance(read_kolm(local), cid)
    if info is None and not rows:
        raise DeployRefused(f"the registry knows no artifact {cid}")
    events = []
    for row in rows:
        acc_before, acc_after = row_accuracy(row)
        events.append({
            "row": row.id, "time": row.created_at.isoformat(timespec="seconds"), "task": row.task,
            "decision": row.decision, "from_cid": row.from_cid, "to_cid": row.to_cid,
            "accuracy_before": acc_before, "accuracy_after": acc_after, "k_before": row.k_before,
            "k_after": row.k_after, "actor": row.actor, "reason": row.details.get("reason"),
            "artifact_url": row.details.get("artifact_url"), "receipt_cid": row.details.get("receipt_cid"),
            "mlflow": row.details.get("mlflow")})
    return {"cid": cid, "ref": resolved.ref, "provenance": info, "events": events}


def describe_cid_text(description: dict[str, Any]) -> str:
    info = description["provenance"] or {}
    named = description.get("ref")
    lines = [f"artifact {description['cid']}" + (f" ({named})" if named and named != description["cid"] else ""),
             f"task:  {info.get('task')} (tenant {info.get('tenant')})"]
    if info:
        lines += summary_lines(info)
        receipts = " → ".join(info.get("receipts", []))
        lines.append(f"parent: {info.get('parent_cid') or '(bare base)'}; receipts in the archive: {receipts}")
    lines.append("events:")
    for event in description["events"]:
        lines.append(f"  #{event['row']} {event['time']} {event['decision']:<9} {event['from_cid'] or '(base)'} → "
                     f"{event['to_cid'] or '-'}  accuracy {percent(event.get('accuracy_before'))} → "
                     f"{percent(event.get('accuracy_after'))}, K {_k(event['k_before'])} → {_k(event['k_after'])}  "
                     f"by {event['actor']}")
        if event.get("reason") and event["decision"] != "swap":
            lines.append(f"      {event['reason']}")
        if event.get("artifact_url"):
            lines.append(f"      deployed from {event['artifact_url']}; deployment receipt {event['receipt_cid']}; "
                         f"MLflow {json.dumps(event.get('mlflow'))}")
    return "\n".join(lines)
