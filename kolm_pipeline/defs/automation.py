"""Sensors and the nightly schedule. All ship STOPPED: distillation is operator-gated by default."""


import json

import dagster as dg

from kolm_pipeline.defs.assets import loop_assets
from kolm_pipeline.defs.partitions import NAMESPACE_PARTITIONS_NAME, namespace_partitions
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.store import partition_key

distill_job = dg.define_asset_job(
    "distill",
    selection=dg.AssetSelection.assets(*loop_assets),
    partitions_def=namespace_partitions,
    description="triaged_captures → corpus → recipe → adapter → evaluation → deployment for one namespace.",
)


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Adds a kolm_namespace partition for every namespace that appears in the capture store.")
def namespace_discovery_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(NAMESPACE_PARTITIONS_NAME))
    found = sorted(partition_key(tenant, ns) for tenant, ns in kolm.store.namespaces())
    new = [key for key in found if key not in known]
    return dg.SensorResult(dynamic_partitions_requests=[namespace_partitions.build_add_request(new)] if new else [])


@dg.sensor(job=distill_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Requests a distill when kept pairs since the last distill reach the threshold.")
def volume_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
    marks: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    threshold = kolm.settings.distill_threshold
    requests = []
    for key in context.instance.get_dynamic_partitions(NAMESPACE_PARTITIONS_NAME):
        tenant, ns = key.split(".", 1)
        kept = kolm.store.counters(tenant, ns)["kept"]
        if kept - marks.get(key, 0) >= threshold:
            requests.append(dg.RunRequest(run_key=f"{key}:{kept}", partition_key=key))
            marks[key] = kept
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(marks, sort_keys=True))


@dg.schedule(job=distill_job, cron_schedule="0 2 * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Nightly distill at 02:00 of every namespace with new kept pairs.")
def nightly_distill(context: dg.ScheduleEvaluationContext, kolm: KolmResource):
    for key in context.instance.get_dynamic_partitions(NAMESPACE_PARTITIONS_NAME):
        tenant, ns = key.split(".", 1)
        kept = kolm.store.counters(tenant, ns)["kept"]
        yield dg.RunRequest(run_key=f"nightly:{key}:{kept}", partition_key=key)


automation_sensor = dg.AutomationConditionSensorDefinition(
    "kolm_automation",
    target=dg.AssetSelection.assets("deployment"),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Deploys a passing evaluation (never one whose blocking checks failed). Ships STOPPED.",
)
