"""Dagster resources: thin handles on the domain packages' configuration."""


from functools import cached_property

import dagster as dg

from kolm_pipeline.settings import Settings, load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.train.base_model import BaseModel, resolve_base_model


class KolmResource(dg.ConfigurableResource):
    """Settings, capture store and base model of one kolm installation.

    Every field left empty falls back to the `KOLM_*` environment (see settings.py).
    """

    home: str | None = None
    base_model: str | None = None

    @cached_property
    def settings(self) -> Settings:
        settings = load_settings(self.home)
        if self.base_model:
            settings = settings.model_copy(update={"base_model": self.base_model})
        return settings

    @cached_property
    def store(self) -> CaptureStore:
        return CaptureStore(self.settings.store_url, default_retention_days=self.settings.retention_days)

    def base(self) -> BaseModel:
        return resolve_base_model(self.settings.base_model, self.settings.models_dir)
