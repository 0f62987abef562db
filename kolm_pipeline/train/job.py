"""The training job: everything the out-of-process trainer needs, declared once.

The adapter stage builds it, Dagster Pipes carries it as the run's extras (plain JSON: `to_extras()`), and the
trainer entry point (`pipes_entry.py`, on this machine or a GPU node) reads it back with `from_extras()`, so
both ends agree on every field and a malformed job fails before training starts, naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel as Model
from pydantic import ConfigDict, ValidationError

from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.train.base_model import BaseModel


class TrainingJob(Model):
    """One adapter to train: from which base and rows, with which settings, logged where."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    base_model_id: str
    base_model_path: Path
    base_digest: str
    train_path: Path
    output_dir: Path
    recipe_cid: str
    config: TrainConfig = TrainConfig()
    # A closed-vocabulary recipe's label set (its `labels`): what the label loss scores answers among.
    labels: list[str] | None = None
    init_adapter: Path | None = None
    mlflow_uri: str
    mlflow_artifacts: Path
    tags: dict[str, str] = {}
    # The MLflow run of the Dagster run this training belongs to; the training run is its child.
    mlflow_parent_run_id: str | None = None
    # Where the trainer leaves a one-line explanation when it fails, for the orchestrator to report.
    error_path: Path | None = None
    # The same inputs by CID, for a trainer on a host that does not hold the paths above (a training pod with its
    # own KOLM_HOME): it fetches them from the object store (KOLM_ARTIFACTS_URL) and checks every byte.
    train_cid: str | None = None
    init_adapter_cid: str | None = None
    # Put the trained adapter in the object store and report its CID (`adapter_cid`), so the orchestrator reads
    # it back by CID instead of from `output_dir`.
    publish: bool = False

    @property
    def base(self) -> BaseModel:
        return BaseModel(model_id=self.base_model_id, path=self.base_model_path, digest=self.base_digest)

    def to_extras(self) -> dict[str, Any]:
        """Plain JSON for the Pipes extras; settings left at their defaults are carried too."""
        return self.model_dump(mode="json")

    @classmethod
    def from_extras(cls, extras: dict[str, Any]) -> TrainingJob:
        """The job a Pipes launch carried; a bad field is an error naming it."""
        settings = extras.get("config") or {}
        problems = TrainConfig.problems(settings)
        if problems:
            raise InvalidInput("training job: config: " + "; ".join(problems))
        try:
            return cls.model_validate({**extras, "config": TrainConfig.model_validate(settings)})
        except ValidationError as exc:
            where = ", ".join(".".join(str(part) for part in error["loc"]) for error in exc.errors())
            raise InvalidInput(f"training job: invalid {where}") from None
