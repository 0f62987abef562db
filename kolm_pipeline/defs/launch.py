"""Launch the loop for one namespace in the configured Dagster instance, as `kolm distill` does.

Runs go through the same job the UI launches, so they show up there with every asset's metadata.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from kolm_pipeline.defs.instance_check import check_instance_reachable
from kolm_pipeline.defs.partitions import NAMESPACE_PARTITIONS_NAME
from kolm_pipeline.settings import Settings

DAGSTER_YAML = """\
# Dagster instance of this kolm installation (embedded default: SQLite under KOLM_HOME/dagster).
telemetry:
  enabled: false
# No welcome pop-up over the first page.
nux:
  enabled: false
"""

STAGES = ("triaged_captures", "corpus", "recipe", "adapter", "evaluation", "deployment")


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str
    seconds: float


def ensure_instance(settings: Settings) -> dg.DagsterInstance:
    """The instance under DAGSTER_HOME (default KOLM_HOME/dagster), created on first use.

    A database that dagster.yaml names but that does not answer raises `InstanceUnreachable` (naming the
    file and host:port) within seconds, instead of dagster-postgres' long retries."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    check_instance_reachable(home)
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def materialize_namespace(
    instance: dg.DagsterInstance,
    partition: str,
    run_config: dict | None = None,
    tags: dict | None = None,
    log_level: str = "INFO",
    stages: list[str] | None = None,
) -> tuple[dg.ExecuteInProcessResult, list[StageOutcome]]:
    """Materialize the whole loop for `partition`; returns the result and per-stage outcomes.

    Console output stays at `log_level`; the instance's event log keeps everything for the UI."""
    from kolm_pipeline.defs.definitions import defs

    if not instance.has_dynamic_partition(NAMESPACE_PARTITIONS_NAME, partition):
        instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, [partition])
    job = defs.resolve_job_def("distill")
    config = {"loggers": {"console": {"config": {"log_level": log_level}}}, **(run_config or {})}
    result = job.execute_in_process(
        partition_key=partition,
        instance=instance,
        run_config=config,
        tags=tags or {},
        raise_on_error=False,
        asset_selection=[dg.AssetKey(stage) for stage in stages] if stages else None,
    )
    stats = {stat.step_key: stat for stat in instance.get_run_step_stats(result.run_id)}
    outcomes = []
    for stage in STAGES:
        stat = stats.get(stage)
        if stat is None:
            outcomes.append(StageOutcome(stage, "skipped", 0.0))
            continue
        seconds = (stat.end_time or stat.start_time or 0) - (stat.start_time or 0)
        outcomes.append(StageOutcome(stage, stat.status.value.lower() if stat.status else "?", seconds))
    return result, outcomes


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """The error of each failed step, as the user should read it."""
    messages = []
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.user_failure_data or None
            text = (error.description if error else None) or event.step_failure_data.error.message
            messages.append(f"{event.step_key}: {text.strip()}")
    return messages
