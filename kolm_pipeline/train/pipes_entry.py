"""Out-of-process training entry point, launched by Dagster Pipes.

`python -m kolm_pipeline.train.pipes_entry` reads its job from the Pipes extras, trains, logs to MLflow
and reports the adapter's metadata back. The same module runs under `PipesSubprocessClient` on the
orchestrator's machine and under `PipesK8sClient` on a GPU node.
"""

from __future__ import annotations

import os
from pathlib import Path

from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.train.distill import TrainResult, train_adapter
from kolm_pipeline.train.job import TrainingJob


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
            job.train_path, base, job.output_dir, config, on_log=on_log, init_adapter=job.init_adapter
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
        Path(error_path).write_text(message)


def main() -> None:
    from dagster_pipes import open_dagster_pipes

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open_dagster_pipes() as pipes:
        extras = dict(pipes.extras)
        try:
            job = TrainingJob.from_extras(extras)
            result, run_id = run_training(job, log=pipes.log.info)
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
                "loss_curve": {"raw_value": [[s, v] for s, v in result.loss_curve], "type": "json"},
            }
        )


if __name__ == "__main__":
    main()
