"""`kolm compile`: a recipe directory (synthesised or hand-written) to a signed `.kolm`, in process.

Runs the same stage functions as the Dagster loop (receipts, training, evaluation against the bare
base, manifest) in a scratch work directory, then writes the artifact atomically. It does not swap:
`kolm swap` decides that.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.capture.images import image_store
from kolm_pipeline.corpus.recipe import load_recipe
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.evaluate.result import EvaluationResult
from kolm_pipeline.provenance.cid import cid_for_file
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.registry.artifact import build_kolm
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.adapter import record_adapter
from kolm_pipeline.stages.deployment import build_manifest
from kolm_pipeline.stages.evaluation import run_evaluation_stage
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.train.base_model import resolve_base_model
from kolm_pipeline.train.distill import train_adapter


@dataclass(frozen=True)
class CompileResult:
    cid: str
    evaluation: EvaluationResult
    table: str


def compile_recipe(
    settings: Settings, recipe_dir: Path, output: Path, tenant: str = "local", epochs: float | None = None
) -> CompileResult:
    recipe = load_recipe(recipe_dir)
    base = resolve_base_model(settings.base_model, settings.models_dir)
    namespace = recipe.spec.get("namespace") or "compiled"
    with tempfile.TemporaryDirectory(prefix="kolm-compile-") as scratch:
        workdir = NamespaceWorkdir(settings, f"{tenant}.{namespace}", base_dir=Path(scratch))
        shutil.copytree(recipe_dir, workdir.recipe)
        corpus_subject = recipe.spec.get("corpus_cid") or cid_for_file(workdir.recipe / "train.jsonl")
        workdir.write_receipt("corpus", "corpus", corpus_subject, {"source": "recipe directory"})
        recipe_cid = directory_cid(workdir.recipe)
        workdir.write_receipt("recipe", "recipe", recipe_cid, {"path": str(recipe_dir.resolve())})
        overrides = dict(recipe.spec.get("training") or {})
        if epochs is not None:
            overrides["epochs"] = epochs
        result = train_adapter(workdir.recipe / "train.jsonl", base, workdir.adapter, TrainConfig.parse(overrides),
                               images=image_store(settings) if base.vision else None, labels=recipe.labels)
        record_adapter(workdir, base, recipe_cid, result.metrics())
        evaluation = run_evaluation_stage(workdir, settings, base, champion=None)
        manifest = build_manifest(workdir, evaluation, counters={}, parent_cid=None)
        build_kolm(output, manifest=manifest, adapter_dir=workdir.adapter, evals=evaluation.document(),
                   receipts=workdir.chain(), signer=workdir.signer())
    return CompileResult(cid=cid_for_file(output), evaluation=evaluation, table=evaluation.kscore_table())
