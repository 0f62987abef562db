"""Out-of-process training entry point, launched by Dagster Pipes.

`python -m kolm_pipeline.train.pipes_entry` reads its job from the Pipes extras, trains, logs to MLflow
and reports the adapter's metadata back. The same module runs under `PipesSubprocessClient` on the
orchestrator's machine and under `PipesK8sClient` on a GPU node.
"""

from __future__ import annotations

import os
from pathlib import Path

from kolm_pipeline.capture.images import image_store
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.cid import cid_for_file
from kolm_pipeline.provenance.objectstore import open_store
from kolm_pipeline.provenance.products import Products, directory_cid
from kolm_pipeline.settings import Settings, load_settings
from kolm_pipeline.train.base_model import BaseModelError, resolve_base_model
from kolm_pipeline.train.distill import TrainResult, train_adapter
from kolm_pipeline.train.job import TrainingJob


def products(settings: Settings) -> Products:
    """The object store the orchestrator publishes to: the same KOLM_ARTIFACTS_URL (the training pod's env)."""
    return Products(open_store(settings.artifacts_url, settings.artifacts_dir))


def localized(job: TrainingJob) -> TrainingJob:
    """The job with paths on this host: inputs this host does not hold (a training pod: its own KOLM_HOME) are
    fetched by CID and checked; the base model is resolved here and must have the digest the job names."""
    updates: dict = {}
    settings = load_settings()
    scratch = settings.home / "trainer"
    if job.train_cid and not (job.train_path.is_file() and cid_for_file(job.train_path) == job.train_cid):
        updates["train_path"] = products(settings).fetch_file(job.train_cid, scratch / job.train_cid / "train.jsonl")
    if job.init_adapter_cid and not (job.init_adapter is not None and job.init_adapter.is_dir()
                                     and directory_cid(job.init_adapter) == job.init_adapter_cid):
        updates["init_adapter"] = products(settings).fetch_dir(job.init_adapter_cid, scratch / job.init_adapter_cid)
    if not (job.base_model_path / "config.json").is_file():
        base = resolve_base_model(job.base_model_id, settings.models_dir)
        if base.digest != job.base_digest:
            raise BaseModelError(f"{job.base_model_id} resolves to weights {base.digest} on this host, the job was "
                                 f"made for {job.base_digest}: use the same base model (image) on both")
        updates["base_model_path"] = base.path
    job.output_dir.parent.mkdir(parents=True, exist_ok=True)  # a training pod's KOLM_HOME starts empty
    return job.model_copy(update=updates) if updates else job


def run_training(job: TrainingJob, log=print) -> tuple[TrainResult, str]:
    """Train the job and log to MLflow (a `training` run, child of the Dagster run's run when the job names
    one): the parameters, `train.loss` and the trainer's other numbers at every logged step, the totals at
    the end. Returns the result and the MLflow run id."""
    import mlflow

    from kolm_pipeline.tracking import mlflow_run

    base, config = job.base, job.config
    with mlflow_run(job.mlflow_uri, job.task, job.mlflow_artifacts, "training", job.tags,
                    parent_run_id=job.mlflow_parent_run_id) as run:
        mlflow.log_params({f"lora.{key}": value for key, value in config.model_dump().items()})
        mlflow.log_params({"base_model": base.model_id, "recipe_cid": job.recipe_cid})

        def on_log(step: int, values: dict[str, float]) -> None:
            mlflow.log_metrics({f"train.{key}": value for key, value in values.items()}, step=step)

        result = train_adapter(
            job.train_path, base, job.output_dir, config, on_log=on_log, init_adapter=job.init_adapter,
            images=image_store(load_settings()) if base.vision else None, labels=job.labels,
        )
        mlflow.log_metrics({f"train.{key}": float(value) for key, value in result.metrics().items()})
        log(f"trained {result.examples} pairs in {result.wall_seconds:.1f}s "
            f"({result.tokens_per_second:.0f} tokens/s), final loss {result.final_loss:.4f}")
        return result, run.info.run_id


def write_error(error_path: str | None, batch_size: int, exc: BaseException) -> None:
    """Leave the failure's one-line explanation where the orchestrator reads it (`error_path`)."""
    if error_path:
        message = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            message += (f" — out of memory at batch size {batch_size}; try batch_size={max(1, batch_size // 2)}"
                        " or activation_checkpointing=true")
        try:  # a training pod has no such directory of its own (the run's): the error still reaches the run's log
            Path(error_path).parent.mkdir(parents=True, exist_ok=True)
            Path(error_path).write_text(message)
        except OSError:
            pass


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open_dagster_pipes() as pipes:
        extras = dict(pipes.extras)
        try:
            job = localized(TrainingJob.from_extras(extras))
            result, run_id = run_training(job, log=pipes.log.info)
            adapter_cid = products(load_settings()).put_dir(result.adapter_dir) if job.publish else None
        except Exception as exc:
            settings = extras.get("config") if isinstance(extras.get("config"), dict) else {}
            batch_size = settings.get("batch_size", TrainConfig().batch_size)
            write_error(extras.get("error_path"), batch_size if isinstance(batch_size, int) else 0, exc)
            raise
        pipes.report_asset_materialization(
            metadata={
                **{key: {"raw_value": float(value), "type": "float"} for key, value in result.metrics().items()},
                "adapter_dir": {"raw_value": str(result.adapter_dir), "type": "path"},
                "mlflow_run_id": {"raw_value": run_id, "type": "text"},
                **({"adapter_cid": {"raw_value": adapter_cid, "type": "text"}} if adapter_cid else {}),
                "loss_curve": {"raw_value": [[s, v] for s, v in result.loss_curve], "type": "json"},
            }
        )


if __name__ == "__main__":
    main()
