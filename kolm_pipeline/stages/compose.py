"""`kolm compose`: serve a task with an ordered, weighted set of adapters sharing its base.

The parts are published artifacts of the task's tenant (a shared adapter such as the tenant's house style, plus a
task adapter). They are combined into one PEFT adapter (`registry/composition.py`, exact), which then goes through
the same evaluation and gate as a distilled candidate, on the task's eval split, against the task's champion (or
the bare base). A composition the gate lets through becomes a signed `.kolm` of its own (its manifest names the
parts, its receipts the composition and its evaluation) and is swapped in; a refused one leaves a registry row
saying why and changes nothing else.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.evaluate.result import EvaluationResult
from kolm_pipeline.evaluate.tripwire import record_good_cycle
from kolm_pipeline.provenance.errors import DeployRefused
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.registry.artifact import adapter_file_cids, build_kolm, extract_adapter
from kolm_pipeline.registry.composition import COMBINATION, MAX_PARTS, PartRef, combine_adapters, exactness_problem
from kolm_pipeline.registry.manage import Activation, activate, artifact_cid_of, artifact_path_of, verified_artifact
from kolm_pipeline.registry.swap import validate_task
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.deployment import build_manifest, champion_artifact, current_champion
from kolm_pipeline.stages.evaluation import run_evaluation_stage
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.train.base_model import resolve_base_model
from kolm_pipeline.train.distill import TRAINER_VERSION

NAMED = ("current", "previous")


@dataclass(frozen=True)
class ComposeResult:
    """The composition's evaluation; `activation` None when the gate refused it."""

    task: str
    parts: list[dict]
    evaluation: EvaluationResult
    activation: Activation | None
    artifact_cid: str | None


def _parts(settings: Settings, store, task: str, refs: list[PartRef], base) -> list[tuple[dict, Path]]:
    """Each part's description and artifact file, checked: verified, of the task's tenant, on the task's base."""
    tenant = task.split(".", 1)[0]
    found: list[tuple[dict, Path]] = []
    for ref in refs:
        # `current` and `previous` are the task's; a CID or prefix may name any task's artifact.
        path, _resolved = artifact_path_of(settings, store, ref.ref, task if ref.ref in NAMED else None)
        artifact, cid = verified_artifact(settings, path)
        manifest = artifact.manifest
        if manifest.get("tenant") != tenant:
            raise DeployRefused(f"--adapter {ref.ref}: {cid} is an adapter of tenant {manifest.get('tenant')!r}; a "
                                f"composition for {task} takes only tenant {tenant!r}'s adapters")
        digest = (manifest.get("base_model") or {}).get("digest")
        if digest != base.digest:
            raise DeployRefused(f"--adapter {ref.ref}: {cid} was trained on base "
                                f"{(manifest.get('base_model') or {}).get('id')} ({digest}), not on the base {task} "
                                f"is served with ({base.model_id}, {base.digest})")
        if any(part["artifact_cid"] == cid for part, _ in found):
            raise DeployRefused(f"--adapter {ref.ref}: {cid} is named twice; give it one weight")
        found.append(({"artifact_cid": cid, "task": manifest.get("task"), "adapter_cid": manifest.get("adapter_cid"),
                       "weight": ref.weight, "rank": (manifest.get("lora") or {}).get("rank")}, path))
    return found


def compose(settings: Settings, store, task: str, refs: list[PartRef], actor: str) -> ComposeResult:
    """Combine `refs` for `task`, evaluate and gate the combination, and swap it in if the gate says so."""
    validate_task(task)
    base = resolve_base_model(settings.base_model, settings.models_dir)
    if base.vision:
        raise DeployRefused(f"{task}: composing adapters of a vision-language base is not supported yet "
                            "(docs/composition.md)")
    if not 2 <= len(refs) <= MAX_PARTS:
        raise DeployRefused(f"a composition takes 2 to {MAX_PARTS} adapters (--adapter CID[:weight], twice or more), "
                            f"not {len(refs)}")
    parts = _parts(settings, store, task, refs, base)
    described = [part for part, _ in parts]
    home = NamespaceWorkdir(settings, task, store=store)
    home.pull("recipe")
    if not (home.recipe / "spec.json").is_file():
        raise DeployRefused(f"{task} has no recipe, so no eval split to judge a composition on: distill it first")
    with tempfile.TemporaryDirectory(prefix="kolm-compose-") as scratch:
        work = NamespaceWorkdir(settings, task, base_dir=Path(scratch))
        shutil.copytree(home.recipe, work.recipe)
        dirs = [extract_adapter(path, Path(scratch) / f"part-{index}") for index, (_, path) in enumerate(parts)]
        for directory, (part, _) in zip(dirs, parts, strict=True):
            if problem := exactness_problem(directory):
                raise DeployRefused(f"--adapter {part['artifact_cid']} cannot be composed exactly: {problem}")
        config = combine_adapters(base, [(d, part["weight"]) for d, part in zip(dirs, described, strict=True)],
                                  work.adapter)
        (work.adapter / "kolm_training.json").write_text(json.dumps({
            "trainer_version": TRAINER_VERSION, "base_model": base.model_id, "base_digest": base.digest,
            "config": {"composition": COMBINATION, "rank": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                       "target_modules": config.get("target_modules") if isinstance(config.get("target_modules"), str)
                       else sorted(config.get("target_modules") or [])}}, indent=2))
        recipe_cid = directory_cid(work.recipe)
        spec = json.loads((work.recipe / "spec.json").read_text())
        work.write_receipt("corpus", "corpus", spec.get("corpus_cid") or recipe_cid,
                           {"source": f"the eval split of {task}'s recipe (a composition trains on nothing)"})
        work.write_receipt("recipe", "recipe", recipe_cid, {"task_recipe": True})
        work.write_receipt("adapter", "adapter", directory_cid(work.adapter),
                           {"composition": {"combination": COMBINATION, "parts": described},
                            "base_model": base.model_id, "base_digest": base.digest,
                            "trainer_version": TRAINER_VERSION, "files": adapter_file_cids(work.adapter)})
        champion = current_champion(settings, task, store)
        evaluation = run_evaluation_stage(work, settings, base, champion, store=store,
                                          details={"composition": described}, trial=True)
        if not evaluation.decision.swap:
            return ComposeResult(task=task, parts=described, evaluation=evaluation, activation=None,
                                 artifact_cid=None)
        previous = champion_artifact(settings, task, store)
        previous_cid = artifact_cid_of(previous) if previous else None
        tenant, namespace = task.split(".", 1)
        manifest = {**build_manifest(work, evaluation, store.counters(tenant, namespace), previous_cid),
                    "composition": {"combination": COMBINATION, "parts": described, "rank": config.get("r"),
                                    "merged": True}}
        staging = Path(scratch) / "composition.kolm"
        build_kolm(staging, manifest=manifest, adapter_dir=work.adapter, evals=evaluation.document(),
                   receipts=work.chain(), signer=work.signer())
        artifact, cid = verified_artifact(settings, staging)
        activation = activate(settings, store, source=staging, artifact=artifact, cid=cid, decision="swap",
                              from_cid=previous_cid, k_before=evaluation.current.k, k_after=evaluation.candidate.k,
                              actor=actor, details={"reason": evaluation.decision.reason,
                                                    "current": evaluation.current_name, "composition": described},
                              signer=work.signer(), accuracy_before=evaluation.current.accuracy)
        record_good_cycle(work.tripwire_ledger(store), task, evaluation.tripwire, cid)
    return ComposeResult(task=task, parts=described, evaluation=evaluation, activation=activation, artifact_cid=cid)
