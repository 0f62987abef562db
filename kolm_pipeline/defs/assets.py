"""The loop's assets. Each one calls its stage's domain function and reports what it measured."""


import time
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from kolm_pipeline.corpus.recipe import RecipeError
from kolm_pipeline.corpus.rotation import EVAL_ROTATION_SHARE
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.defs.partitions import namespace_partitions
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.defs.trainer import run_trainer
from kolm_pipeline.evaluate.result import KSCORE_ROWS, EvaluationResult
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.registry.champion import model_version_of
from kolm_pipeline.settings import load_trainer_config
from kolm_pipeline.stages.adapter import receive_adapter, record_adapter, training_job
from kolm_pipeline.stages.corpus import NotEnoughPairs, recipe_counts, run_corpus_stage, run_recipe_stage
from kolm_pipeline.stages.deployment import DeployRefused, current_champion, deploy
from kolm_pipeline.stages.diff import candidate_diff, diff_markdown
from kolm_pipeline.stages.evaluation import run_evaluation_stage
from kolm_pipeline.stages.retention import sweep_retention
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.tracking import (
    ADAPTER_CID_TAG,
    dagster_tags,
    log_parent_metrics,
    mlflow_run,
    model_version_ui_url,
    parent_run,
    run_ui_url,
    set_run_tags,
)
from kolm_pipeline.train.loss_plot import loss_curve_markdown

KOLM_GROUP = "kolm_loop"

captures = dg.AssetSpec(
    "captures",
    description="Request/response pairs recorded by the capture proxy. Observed, not materialized.",
    group_name=KOLM_GROUP,
    partitions_def=namespace_partitions,
    kinds={"sqlite", "postgres"},
)


def _workdir(context: dg.AssetExecutionContext, kolm: KolmResource) -> NamespaceWorkdir:
    return NamespaceWorkdir(kolm.settings, context.partition_key, store=kolm.store)


def _mlflow_parent(
    context: dg.AssetExecutionContext, kolm: KolmResource, workdir: NamespaceWorkdir
) -> tuple[str, str, dict[str, str]]:
    """The MLflow run of this Dagster run (experiment id, run id) and the tags each of its child runs carries."""
    tags = dagster_tags(context.run.run_id, context.partition_key, workdir.task)
    settings = kolm.settings
    experiment, run_id = parent_run(settings.mlflow_tracking_uri, workdir.task, settings.home / "mlflow-artifacts",
                                    tags)
    return experiment, run_id, tags


def _mlflow_links(kolm: KolmResource, experiment: str, parent_run_id: str, run_id: str) -> dict[str, Any]:
    """Clickable links to the step's MLflow run and to its Dagster run's (KOLM_MLFLOW_UI_URL, `make mlflow`)."""
    ui = kolm.settings.mlflow_ui_url
    return {
        "mlflow_run": dg.UrlMetadataValue(run_ui_url(ui, experiment, run_id)),
        "mlflow_run_id": run_id,
        "mlflow_dagster_run": dg.UrlMetadataValue(run_ui_url(ui, experiment, parent_run_id)),
    }


class CorpusConfig(dg.Config):
    """`min_pairs` overrides the distill threshold (KOLM_DISTILL_THRESHOLD, default 1,000)."""

    min_pairs: int | None = None


class RecipeConfig(dg.Config):
    """`eval_rotation_share`: the share of eval candidates (newest first) that join the eval split."""

    eval_rotation_share: float = EVAL_ROTATION_SHARE


# The type each training setting takes in Dagster's config system, which has no unions of values or literals;
# defaults and descriptions come from TrainConfig. A setting left null uses TrainConfig's own default.
_ADAPTER_CONFIG_TYPES: dict[str, type] = {
    "rank": int, "alpha": float, "dropout": float, "epochs": float, "learning_rate": float, "batch_size": int,
    "max_length": int, "max_examples": int | None, "warmup_steps": int, "seed": int, "length_grouped": bool,
    "packing": bool,
    "activation_checkpointing": bool, "bf16": bool | None, "attention": str | None, "vision_tower": bool,
    "label_loss": bool, "neftune_alpha": float | None,
    "target_modules": list[str] | None, "modules_to_save": list[str] | None,
}


def _adapter_config_field(name: str, kind: type) -> tuple[type, Any]:
    setting = TrainConfig.model_fields[name]
    default = setting.default if isinstance(setting.default, bool | int | float) else None
    return kind, Field(default, description=setting.description)


AdapterConfig = create_model(
    "AdapterConfig",
    __base__=dg.Config,
    __doc__="The recipe's training settings (TrainConfig); `continue_from_champion` trains on from the deployed "
            "adapter instead of a fresh one.",
    continue_from_champion=(bool, False),
    **{name: _adapter_config_field(name, kind) for name, kind in _ADAPTER_CONFIG_TYPES.items()},
)


@dg.asset(
    deps=[captures],
    partitions_def=namespace_partitions,
    group_name=KOLM_GROUP,
    description="Applies every namespace's retention window (store and work files) and this namespace's triage "
    "rules; only kept pairs flow on. Reports the four counters.",
)
def triaged_captures(context: dg.AssetExecutionContext, kolm: KolmResource) -> dg.MaterializeResult:
    workdir = _workdir(context, kolm)
    swept = sweep_retention(kolm.settings, kolm.store)
    applied = kolm.store.apply_rules(workdir.tenant, workdir.namespace)
    counters = kolm.store.counters(workdir.tenant, workdir.namespace)
    return dg.MaterializeResult(
        metadata={
            **{f"counter_{name}": dg.IntMetadataValue(value) for name, value in counters.items()},
            **{f"rules_{name}": dg.IntMetadataValue(value) for name, value in applied.items()},
            "retention_expired": dg.IntMetadataValue(swept.expired.get(context.partition_key, 0)),
            "retention_work_files": dg.IntMetadataValue(len(swept.work_files.get(context.partition_key, []))),
            "retention_store_scrubbed": dg.BoolMetadataValue(swept.scrubbed),
        }
    )


@dg.asset(
    deps=[triaged_captures],
    partitions_def=namespace_partitions,
    group_name=KOLM_GROUP,
    description="Kept pairs as chat-format JSONL with a CID (source gate, dedup, distill threshold).",
)
def corpus(context: dg.AssetExecutionContext, kolm: KolmResource, config: CorpusConfig) -> dg.MaterializeResult:
    workdir = _workdir(context, kolm)
    threshold = config.min_pairs if config.min_pairs is not None else kolm.settings.distill_threshold
    try:
        result = run_corpus_stage(workdir, kolm.store, threshold, images=kolm.base().vision)
    except NotEnoughPairs as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.MaterializeResult(
        metadata={
            "corpus_cid": result.cid,
            "receipt_cid": result.receipt_cid,
            "distill_threshold": threshold,
            **{name: dg.IntMetadataValue(value) for name, value in result.stats.as_dict().items()},
            "dagster/uri": workdir.corpus.as_uri(),
        }
    )


@dg.asset(
    deps=[corpus],
    partitions_def=namespace_partitions,
    group_name=KOLM_GROUP,
    description="Recipe from observations: output kind, verifier, splits, frozen hold-out, K-floor; eval "
    "candidates rotated into eval, training pairs overlapping eval, hold-out or candidate inputs removed.",
)
def recipe(context: dg.AssetExecutionContext, kolm: KolmResource, config: RecipeConfig) -> dg.MaterializeResult:
    workdir = _workdir(context, kolm)
    try:
        result = run_recipe_stage(workdir, eval_rotation_share=config.eval_rotation_share)
    except RecipeError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    spec = result.recipe.spec
    return dg.MaterializeResult(
        metadata={
            "recipe_cid": result.cid,
            "receipt_cid": result.receipt_cid,
            "output_kind": spec["output_kind"],
            "verifier": spec["verifier"],
            "k_floor": dg.FloatMetadataValue(spec["k_floor"]),
            "labels": dg.JsonMetadataValue(spec.get("labels")),
            **{f"{split}_pairs": dg.IntMetadataValue(count) for split, count in spec["counts"].items()},
            **{name: dg.IntMetadataValue(count) for name, count in recipe_counts(result.recipe).items()},
            "eval_rotated_capture_ids": dg.JsonMetadataValue(
                result.recipe.diagnostics["eval_rotation"]["rotated_in_capture_ids"]),
            "dagster/uri": workdir.recipe.as_uri(),
        }
    )


@dg.asset(
    deps=[recipe],
    partitions_def=namespace_partitions,
    group_name=KOLM_GROUP,
    kinds={"pytorch", "mlflow"},
    description="LoRA adapter distilled out of process through Dagster Pipes (the same entry point runs on "
    "a GPU node).",
)
def adapter(
    context: dg.AssetExecutionContext,
    kolm: KolmResource,
    trainer: dg.ResourceParam[dg.PipesClient],
    config: AdapterConfig,
) -> dg.MaterializeResult:
    workdir = _workdir(context, kolm)
    base = kolm.base()
    workdir.pull("recipe")
    recipe_cid = directory_cid(workdir.recipe)
    champion = current_champion(kolm.settings, workdir.task, kolm.store) if config.continue_from_champion else None
    error_path = workdir.root / "trainer-error.txt"
    error_path.unlink(missing_ok=True)
    settings = {key: value for key, value in config.model_dump().items()
                if value is not None and key != "continue_from_champion"}
    try:
        train_config = TrainConfig.parse(settings)
    except InvalidInput as exc:
        raise dg.Failure(description=f"adapter config: {exc}", allow_retries=False) from None
    experiment, parent_run_id, mlflow_tags = _mlflow_parent(context, kolm, workdir)
    job = training_job(
        kolm.settings,
        base,
        task=workdir.task,
        train_path=workdir.recipe / "train.jsonl",
        output_dir=workdir.adapter,
        recipe_cid=recipe_cid,
        config=train_config,
        init_adapter=champion[1] if champion else None,
        tags=mlflow_tags,
        error_path=error_path,
        mlflow_parent_run_id=parent_run_id,
        products=workdir.products,
    )
    began = time.perf_counter()
    try:
        reported = run_trainer(trainer, context, job.to_extras(), load_trainer_config())
    except Exception as exc:  # the Pipes client's error type is not public; the trainer's note decides
        if not error_path.is_file():
            raise
        reason = error_path.read_text()
        raise dg.Failure(description=f"training process failed: {reason}", allow_retries=False) from exc
    metadata = dict(reported.metadata or {})
    metrics = {key: value.value for key, value in metadata.items() if isinstance(value, dg.FloatMetadataValue)}
    # The trainer reports the curve as (step, loss) points; Dagster shows it as a plot.
    curve = metadata.pop("loss_curve", None)
    metadata["loss_curve"] = dg.MarkdownMetadataValue(loss_curve_markdown(curve.value if curve is not None else []))
    published = metadata.pop("adapter_cid", None)
    receive_adapter(workdir, str(published.value) if published is not None else None)
    adapter_cid, receipt = record_adapter(workdir, base, recipe_cid, metrics)
    training_run_id = str(metadata["mlflow_run_id"].value)
    set_run_tags(kolm.settings.mlflow_tracking_uri, training_run_id, {ADAPTER_CID_TAG: adapter_cid})
    return dg.MaterializeResult(
        metadata={
            **metadata,
            **_mlflow_links(kolm, experiment, parent_run_id, training_run_id),
            # MLflow plots `train.loss` per step on the training run's metric charts.
            "mlflow_loss_chart": dg.UrlMetadataValue(
                run_ui_url(kolm.settings.mlflow_ui_url, experiment, training_run_id, tab="model-metrics")),
            "adapter_cid": adapter_cid,
            "receipt_cid": receipt,
            "base_model": base.model_id,
            "stage_seconds": dg.FloatMetadataValue(round(time.perf_counter() - began, 2)),
            "dagster/uri": workdir.adapter.as_uri(),
        }
    )


def _side_by_side(evaluation: EvaluationResult) -> dg.TableMetadataValue:
    parts = [key for _, key in KSCORE_ROWS] + ["artifact_bytes"]
    columns = [dg.TableColumn("model", "string")] + [dg.TableColumn(part, "float") for part in parts]
    records = [
        dg.TableRecord({"model": model.name, **{part: float(getattr(model, part)) for part in parts}})
        for model in (evaluation.current, evaluation.candidate)
    ]
    return dg.TableMetadataValue(records=records, schema=dg.TableSchema(columns=columns))


@dg.asset(
    deps=[adapter],
    partitions_def=namespace_partitions,
    group_name=KOLM_GROUP,
    kinds={"mlflow"},
    description="K-score of candidate and current champion (or bare base) on the same eval split, same run.",
)
def evaluation(context: dg.AssetExecutionContext, kolm: KolmResource) -> dg.MaterializeResult:
    import mlflow

    workdir = _workdir(context, kolm)
    champion = current_champion(kolm.settings, workdir.task, kolm.store)
    began = time.perf_counter()
    result = run_evaluation_stage(workdir, kolm.settings, kolm.base(), champion, store=kolm.store)
    seconds = time.perf_counter() - began
    diff = candidate_diff(kolm.settings, result.document())
    experiment, parent_run_id, tags = _mlflow_parent(context, kolm, workdir)
    settings = kolm.settings
    with mlflow_run(settings.mlflow_tracking_uri, workdir.task, settings.home / "mlflow-artifacts", "evaluation",
                    {**tags, "recipe_cid": result.recipe_cid, ADAPTER_CID_TAG: result.adapter_cid},
                    parent_run_id=parent_run_id) as run:
        for side in ("candidate", "current"):
            mlflow.log_metrics({f"{side}.{key}": float(value) for key, value in result.document()[side].items()
                                if isinstance(value, int | float)})
        mlflow.log_metrics({"gate.delta": result.decision.delta, "gate.swap": float(result.decision.swap)})
        mlflow.log_metrics({"cases.improved": len(diff.improved), "cases.regressed": len(diff.regressed)})
        run_id = run.info.run_id
    # The headline on the Dagster run's row of the runs table.
    log_parent_metrics(settings.mlflow_tracking_uri, parent_run_id, {
        "k_score": result.candidate.k, "accuracy": result.candidate.accuracy, "k_current": result.current.k,
        "gate.delta": result.decision.delta, "gate.swap": float(result.decision.swap)})
    decision = result.decision
    if result.alert:
        context.log.error(f"regression alert for {workdir.task}: {decision.reason} — {result.alert}")
        context.instance.add_run_tags(context.run.run_id, {"kolm/alert": "regression"})
    return dg.MaterializeResult(
        metadata={
            "side_by_side": _side_by_side(result),
            "alert": result.alert or "none",
            "accuracy_candidate": dg.FloatMetadataValue(result.candidate.accuracy),
            "accuracy_current": dg.FloatMetadataValue(result.current.accuracy),
            "k_candidate": dg.FloatMetadataValue(result.candidate.k),
            "k_current": dg.FloatMetadataValue(result.current.k),
            "k_delta": dg.FloatMetadataValue(round(decision.delta, 4)),
            "gate_decision": decision.reason,
            "tripwire_clear": dg.BoolMetadataValue(result.tripwire.clear),
            "current": result.current_name,
            "receipt_cid": result.receipt_cid,
            "adapter_cid": result.adapter_cid,
            "recipe_cid": result.recipe_cid,
            "eval_cases": dg.IntMetadataValue(result.eval_cases),
            "version_diff": dg.MarkdownMetadataValue(diff_markdown(diff)),
            "cases_improved": dg.IntMetadataValue(len(diff.improved)),
            "cases_regressed": dg.IntMetadataValue(len(diff.regressed)),
            "cases_compared": dg.IntMetadataValue(diff.compared or 0),
            "stage_seconds": dg.FloatMetadataValue(round(seconds, 2)),
            **_judge_metadata(result),
            **_mlflow_links(kolm, experiment, parent_run_id, run_id),
            "dagster/uri": workdir.evaluation.as_uri(),
        }
    )


def _judge_metadata(result: EvaluationResult) -> dict:
    """What the free-text judge (evaluate/judge.py) cost this evaluation, both sides together (its `judge_*`
    numbers); none without one."""
    totals: dict[str, float] = {}
    for side in (result.candidate, result.current):
        for key, value in (side.model_extra or {}).items():
            if key.startswith("judge_"):
                totals[key] = totals.get(key, 0) + value
    return {key: round(value, 6) if isinstance(value, float) else value for key, value in totals.items()}


@dg.asset(
    deps=[evaluation],
    partitions_def=namespace_partitions,
    group_name=KOLM_GROUP,
    # Automation may deploy a fresh evaluation, but never one whose blocking checks failed.
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    description="Signed .kolm, registry row (from-CID → to-CID) and atomic pointer swap. Never runs after a "
    "failed gate.",
)
def deployment(context: dg.AssetExecutionContext, kolm: KolmResource) -> dg.MaterializeResult:
    import mlflow

    workdir = _workdir(context, kolm)
    settings = kolm.settings
    experiment, parent_run_id, tags = _mlflow_parent(context, kolm, workdir)
    try:
        with mlflow_run(settings.mlflow_tracking_uri, workdir.task, settings.home / "mlflow-artifacts",
                        "deployment", tags, parent_run_id=parent_run_id) as run:
            result = deploy(workdir, settings, kolm.store, actor=f"dagster:{context.run.run_id}")
            version = model_version_of(settings.mlflow_tracking_uri, workdir.task, result.artifact_cid)
            mlflow.set_tags({"kolm.artifact_cid": result.artifact_cid,
                             "kolm.previous_cid": result.previous_cid or "(bare base)",
                             "registry_row": str(result.registry_row),
                             "model_version": f"{version.name}/{version.version}" if version else "-"})
            run_id = run.info.run_id
    except DeployRefused as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    links = _mlflow_links(kolm, experiment, parent_run_id, run_id)
    if version is not None:
        links["mlflow_model_version"] = dg.UrlMetadataValue(
            model_version_ui_url(settings.mlflow_ui_url, version.name, version.version))
    return dg.MaterializeResult(
        metadata={
            "artifact_cid": result.artifact_cid,
            "previous_cid": result.previous_cid or "(bare base)",
            "registry_row": dg.IntMetadataValue(result.registry_row),
            **links,
            "dagster/uri": result.artifact_path.as_uri(),
        }
    )


loop_assets = [triaged_captures, corpus, recipe, adapter, evaluation, deployment]
