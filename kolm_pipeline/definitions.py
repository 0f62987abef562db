"""Dagster's entry point (`[tool.dagster] module_name`, workspace.yaml): the Definitions built in `defs/`."""

from kolm_pipeline.defs.definitions import defs

__all__ = ["defs"]
