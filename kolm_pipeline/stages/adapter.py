"""The adapter stage: the job handed to the out-of-process trainer, and its receipt."""

from __future__ import annotations

from pathlib import Path

from kolm_pipeline.corpus.recipe import load_recipe
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.cid import cid_for_file
from kolm_pipeline.provenance.products import Products, directory_cid
from kolm_pipeline.registry.artifact import adapter_file_cids
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.train.base_model import BaseModel
from kolm_pipeline.train.distill import TRAINER_VERSION
from kolm_pipeline.train.job import TrainingJob


def training_job(
    settings: Settings,
    base: BaseModel,
    *,
    task: str,
    train_path: Path,
    output_dir: Path,
    recipe_cid: str,
    config: TrainConfig,
    tags: dict[str, str],
    init_adapter: Path | None = None,
    error_path: Path | None = None,
    mlflow_parent_run_id: str | None = None,
    products: Products | None = None,
) -> TrainingJob:
    """Everything the trainer process needs (carried as the Pipes extras); `mlflow_parent_run_id` makes its
    MLflow run a child of that run (the Dagster run's). With `products`, the inputs are named by CID too (the
    train split is in the object store with its recipe; a champion to continue from is put there now) and the
    trainer publishes the adapter, so it may run on a host that shares no filesystem with this one."""
    by_cid = {}
    if products is not None:
        by_cid = {"train_cid": cid_for_file(train_path), "publish": True,
                  "init_adapter_cid": products.put_dir(init_adapter) if init_adapter is not None else None}
    return TrainingJob(
        task=task,
        base_model_id=base.model_id,
        base_model_path=base.path,
        base_digest=base.digest,
        train_path=train_path,
        output_dir=output_dir,
        recipe_cid=recipe_cid,
        config=config,
        # The label loss scores answers among the recipe's labels (beside its train.jsonl); nothing to carry without it.
        labels=load_recipe(train_path.parent).labels if config.label_loss else None,
        init_adapter=init_adapter,
        mlflow_uri=settings.mlflow_tracking_uri,
        mlflow_artifacts=settings.home / "mlflow-artifacts",
        tags={"recipe_cid": recipe_cid, "task": task, **tags},
        mlflow_parent_run_id=mlflow_parent_run_id,
        error_path=error_path,
        **by_cid,
    )


def receive_adapter(workdir: NamespaceWorkdir, adapter_cid: str | None) -> None:
    """Make the workdir's adapter the one the trainer published as `adapter_cid` (fetched by CID when it trained
    elsewhere); None: it trained into the workdir itself."""
    if adapter_cid and not (workdir.adapter.is_dir() and directory_cid(workdir.adapter) == adapter_cid):
        workdir.products.fetch_dir(adapter_cid, workdir.adapter)


def record_adapter(workdir: NamespaceWorkdir, base: BaseModel, recipe_cid: str, metrics: dict) -> tuple[str, str]:
    """Sign the adapter's receipt (and publish the adapter); returns (adapter CID, receipt CID)."""
    cid = directory_cid(workdir.adapter)
    receipt = workdir.write_receipt(
        "adapter",
        "adapter",
        cid,
        {"recipe_cid": recipe_cid, "base_model": base.model_id, "base_digest": base.digest,
         "trainer_version": TRAINER_VERSION, "metrics": metrics, "files": adapter_file_cids(workdir.adapter)},
    )
    return cid, receipt
