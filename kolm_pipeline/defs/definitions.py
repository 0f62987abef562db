"""The one Definitions object of kolm pipeline (`kolm_pipeline.definitions` re-exports it for Dagster)."""

import warnings

import dagster as dg

from kolm_pipeline.defs.assets import captures, loop_assets
from kolm_pipeline.defs.automation import distill_job, kolm_schedules, kolm_sensors
from kolm_pipeline.defs.checks import loop_checks
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.defs.trainer import trainer_client
from kolm_pipeline.settings import load_trainer_config

# Dagster's Pipes client reads a preview property of its own on every run and warns about it: not a call of ours,
# and it landed in the middle of every `kolm distill` and `make demo` output.
warnings.filterwarnings("ignore", message=r"Function `PipesMessageReader\.expected_writer_count` is currently",
                        category=dg.PreviewWarning)

defs = dg.Definitions(
    assets=[captures, *loop_assets],
    asset_checks=loop_checks,
    jobs=[distill_job],
    sensors=kolm_sensors,
    schedules=kolm_schedules,
    resources={
        "kolm": KolmResource(),
        # KOLM_TRAINER=subprocess|k8s (defs/trainer.py): a Pipes subprocess where the run runs, or a GPU pod.
        "trainer": trainer_client(load_trainer_config()),
    },
)
