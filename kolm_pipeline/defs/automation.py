"""Sensors and the nightly schedule. All ship STOPPED: distillation is operator-gated by default.

Each one reads the capture store, the work dir or the event log, decides with a domain function, and
answers with run requests (deduplicated by `run_key`), a cursor and observations that carry the numbers
it decided on. A store that does not answer skips the tick with the reason, never fails the daemon.
See docs/automation.md.
"""

import json
import time

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from kolm_pipeline.corpus.embeddings import EmbeddingModelError
from kolm_pipeline.defs.assets import captures, evaluation, loop_assets
from kolm_pipeline.defs.partitions import NAMESPACE_PARTITIONS_NAME, namespace_partitions
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.evaluate.alerts import send_alert
from kolm_pipeline.evaluate.gate import ALERT_DELTA
from kolm_pipeline.evaluate.result import RegressionAlert
from kolm_pipeline.stages.backlog import distill_backlog, unrequested_kept
from kolm_pipeline.stages.drift import DriftConfig, DriftOutcome, check_drift, embedding_cache
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import partition_key

# What an unreachable or broken store raises: a refused or dropped connection, an unwritable SQLite path.
STORE_ERRORS = (SQLAlchemyError, OSError)
ALERT_ATTEMPTS = 5  # deliveries tried per alert (one per tick) before it is given up, logged as such
ALERT_BATCH = 100  # evaluation events read per tick
DRIFT_TICK_SECONDS = 30.0  # namespaces left when a tick has spent this long wait for the next tick

distill_job = dg.define_asset_job(
    "distill",
    selection=dg.AssetSelection.assets(*loop_assets),  # partitioned by kolm_namespace, as its assets are
    description="triaged_captures → corpus → recipe → adapter → evaluation → deployment for one namespace.",
)


def _store_down(exc: Exception) -> str:
    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"capture store unreachable, tick skipped ({type(exc).__name__}: {detail})"


def _cursor(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _namespaces(context: dg.SensorEvaluationContext | dg.ScheduleEvaluationContext) -> list[str]:
    return sorted(context.instance.get_dynamic_partitions(NAMESPACE_PARTITIONS_NAME))


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Adds a kolm_namespace partition for every namespace that appears in the capture store.")
def namespace_discovery_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
    try:
        found = sorted(partition_key(tenant, ns) for tenant, ns in kolm.store.namespaces())
    except STORE_ERRORS as exc:
        return dg.SensorResult(skip_reason=_store_down(exc))
    known = set(_namespaces(context))
    new = [key for key in found if key not in known]
    if not new:
        return dg.SensorResult(skip_reason=f"no new namespaces ({len(found)} known)")
    return dg.SensorResult(dynamic_partitions_requests=[namespace_partitions.build_add_request(new)])


@dg.sensor(job=distill_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Requests a distill when kept pairs since the last distill reach the threshold "
           "(KOLM_DISTILL_THRESHOLD, default 1,000); reports each namespace's counters on `captures`.")
def volume_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
    """Cursor per namespace: `requested_at` (kept count of a requested distill not written yet), `distill`
    (the last distill when it was requested) and the counters last reported."""
    memos = _cursor(context.cursor)
    threshold = kolm.settings.distill_threshold
    requests, observations = [], []
    try:
        for key in _namespaces(context):
            workdir = NamespaceWorkdir(kolm.settings, key, store=kolm.store)
            counters = kolm.store.counters(workdir.tenant, workdir.namespace)
            backlog = distill_backlog(counters["kept"], workdir)
            memo = memos.get(key) if isinstance(memos.get(key), dict) else {}
            new = unrequested_kept(backlog, memo.get("requested_at"), memo.get("distill"))
            if counters != memo.get("counters"):
                observations.append(dg.AssetObservation(
                    captures.key, partition=key,
                    metadata={**{name: dg.IntMetadataValue(value) for name, value in counters.items()},
                              "kept_since_last_distill": dg.IntMetadataValue(backlog.new_kept),
                              "distill_threshold": dg.IntMetadataValue(threshold)}))
            if new >= threshold:
                requests.append(dg.RunRequest(
                    run_key=f"volume:{key}:{backlog.kept}", partition_key=key,
                    tags={"kolm/trigger": "volume", "kolm/new_kept_pairs": str(new),
                          "kolm/distill_threshold": str(threshold)}))
                memo = {"requested_at": backlog.kept, "distill": backlog.last_distill}
            memos[key] = {**memo, "counters": counters}
    except STORE_ERRORS as exc:
        return dg.SensorResult(skip_reason=_store_down(exc))
    cursor = json.dumps(memos, sort_keys=True)
    if not requests:
        return dg.SensorResult(asset_events=observations, cursor=cursor,
                               skip_reason=f"no namespace has {threshold} kept pairs since its last distill")
    return dg.SensorResult(run_requests=requests, asset_events=observations, cursor=cursor)


@dg.schedule(job=distill_job, cron_schedule="0 2 * * *", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Nightly distill at 02:00 of every namespace with kept pairs that were not distilled yet.")
def nightly_distill(context: dg.ScheduleEvaluationContext, kolm: KolmResource):
    threshold = kolm.settings.distill_threshold
    night = context.scheduled_execution_time.date().isoformat()
    requests, small = [], []
    try:
        for key in _namespaces(context):
            workdir = NamespaceWorkdir(kolm.settings, key, store=kolm.store)
            backlog = distill_backlog(kolm.store.counters(workdir.tenant, workdir.namespace)["kept"], workdir)
            if backlog.new_kept == 0:
                continue
            if backlog.kept < threshold:  # the corpus stage would refuse it
                small.append(f"{key} ({backlog.kept} kept)")
                continue
            requests.append(dg.RunRequest(
                run_key=f"nightly:{night}:{key}", partition_key=key,
                tags={"kolm/trigger": "nightly", "kolm/new_kept_pairs": str(backlog.new_kept)}))
    except STORE_ERRORS as exc:
        return dg.SkipReason(_store_down(exc))
    if requests:
        return requests
    below = f"; below the distill threshold {threshold}: {', '.join(small)}" if small else ""
    return dg.SkipReason(f"no namespace has new kept pairs to distill{below}")


def _drift_metadata(outcome: DriftOutcome, action: str) -> dict:
    test = outcome.test
    return {
        "drift_detected": dg.BoolMetadataValue(test.drifted),
        "drift_statistic": dg.FloatMetadataValue(test.statistic),
        "drift_p_value": dg.FloatMetadataValue(test.p_value),
        "drift_threshold": dg.FloatMetadataValue(test.threshold),
        "drift_alpha": dg.FloatMetadataValue(test.alpha),
        "drift_recent_requests": dg.IntMetadataValue(test.n_recent),
        "drift_reference_requests": dg.IntMetadataValue(test.n_reference),
        "drift_permutations": dg.IntMetadataValue(test.permutations),
        "drift_kernel": test.kernel,
        "drift_window": outcome.window_id,
        "drift_action": action,
        "champion_cid": outcome.champion.artifact_cid,
        "corpus_cid": outcome.champion.corpus_cid,
    }


def _drift_tags(outcome: DriftOutcome) -> dict[str, str]:
    test = outcome.test
    return {"kolm/trigger": "drift", "kolm/drift_window": outcome.window_id,
            "kolm/drift_statistic": f"{test.statistic:.6g}", "kolm/drift_p_value": f"{test.p_value:.4f}",
            "kolm/drift_threshold": f"{test.threshold:.6g}", "kolm/drift_alpha": str(test.alpha),
            "kolm/drift_recent": str(test.n_recent), "kolm/drift_reference": str(test.n_reference)}


def build_drift_sensor(config: DriftConfig | None = None, name: str = "drift_sensor") -> dg.SensorDefinition:
    """The embedding-drift sensor with `config` (window, alpha, permutations, kernel; see DriftConfig)."""
    config = config or DriftConfig()

    @dg.sensor(name=name, job=distill_job, minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"Tests every {config.window} new captures of a namespace against the requests its "
               f"serving adapter was trained on (MMD permutation test on MiniLM embeddings, alpha {config.alpha}); "
               "requests a distill on drift and reports each test on `captures`.")
    def _drift_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
        memos = _cursor(context.cursor)
        settings = kolm.settings
        began = time.monotonic()
        requests, observations, notes = [], [], []
        try:
            cache = embedding_cache(settings)
            for key in _namespaces(context):
                if time.monotonic() - began > DRIFT_TICK_SECONDS:
                    notes.append(f"{key}: deferred to the next tick")
                    continue
                outcome = check_drift(kolm.store, settings, key, cache, config, memos.get(key))
                memos[key] = outcome.memo
                if not outcome.tested:
                    notes.append(f"{key}: {outcome.reason}")
                    continue
                action = "none"
                if outcome.test.drifted:
                    workdir = NamespaceWorkdir(settings, key, store=kolm.store)
                    backlog = distill_backlog(kolm.store.counters(workdir.tenant, workdir.namespace)["kept"], workdir)
                    if backlog.new_kept:
                        action = "distill requested"
                        requests.append(dg.RunRequest(
                            run_key=f"drift:{key}:{outcome.window_id}", partition_key=key,
                            tags={**_drift_tags(outcome), "kolm/new_kept_pairs": str(backlog.new_kept)}))
                    else:
                        action = "no kept pairs since the last distill: triage the recent captures to learn them"
                    context.log.warning(f"{key}: {outcome.reason}; {action}")
                notes.append(f"{key}: {outcome.reason}")
                observations.append(dg.AssetObservation(captures.key, partition=key,
                                                        metadata=_drift_metadata(outcome, action)))
        except STORE_ERRORS as exc:
            return dg.SensorResult(skip_reason=_store_down(exc))
        except EmbeddingModelError as exc:
            return dg.SensorResult(skip_reason=f"embedding model unavailable, tick skipped: {exc}")
        cursor = json.dumps(memos, sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, asset_events=observations, cursor=cursor)
        return dg.SensorResult(asset_events=observations, cursor=cursor,
                               skip_reason="; ".join(notes) or "no namespaces yet")

    return _drift_sensor


drift_sensor = build_drift_sensor()


def _regression_payload(record: dg.EventLogRecord) -> dict | None:
    """The alert of an evaluation event whose gate refused and alerted (Δ ≤ −0.03), else None."""
    metadata = {name: value.value for name, value in record.asset_materialization.metadata.items()}
    status = metadata.get("alert")
    delta = metadata.get("k_delta")
    if status == "none" or (status is None and not (isinstance(delta, float) and delta <= ALERT_DELTA)):
        return None
    alert = RegressionAlert(task=record.partition_key, reason=metadata.get("gate_decision"), delta=delta,
                            k_new=metadata.get("k_candidate"), k_current=metadata.get("k_current"),
                            current=metadata.get("current"), adapter_cid=metadata.get("adapter_cid"),
                            recipe_cid=metadata.get("recipe_cid"))
    return {**alert.model_dump(), "receipt_cid": metadata.get("receipt_cid"),
            "dagster_run_id": record.run_id, "run_delivery": str(status or "")}


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Delivers every gate refusal with alert (Δ ≤ −0.03) to KOLM_ALERT_WEBHOOK exactly once: "
           "the ones the evaluation run could not deliver, retried on later ticks.")
def regression_alert_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
    """Cursor: `after` (the last evaluation event read) and `undelivered` (alerts to retry). The first tick
    starts at the newest evaluation: turning the sensor on does not replay old refusals."""
    state = _cursor(context.cursor)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=evaluation.key, after_storage_id=state.get("after")),
        limit=1 if "after" not in state else ALERT_BATCH, ascending="after" in state)
    if "after" not in state:
        start = records.records[0].storage_id if records.records else 0
        return dg.SensorResult(cursor=json.dumps({"after": start, "undelivered": []}),
                               skip_reason=f"watching evaluations after event {start}")
    after, pending, observations = state["after"], list(state.get("undelivered") or []), []
    for record in records.records:
        after = record.storage_id
        payload = _regression_payload(record)
        if payload is None:
            continue
        if payload["run_delivery"].startswith("delivered"):
            observations.append(dg.AssetObservation(evaluation.key, partition=record.partition_key, metadata={
                "alert_delivery": f"by the evaluation run: {payload['run_delivery']}",
                "alert_event": dg.IntMetadataValue(record.storage_id)}))
            continue
        pending.append({"event": record.storage_id, "partition": record.partition_key, "payload": payload,
                        "attempts": 0})
    retry = []
    for item in pending:
        status = send_alert(kolm.settings.alert_webhook, item["payload"])
        item["attempts"] += 1
        failed = status.startswith("webhook")
        if failed and item["attempts"] < ALERT_ATTEMPTS:
            retry.append(item)
        elif failed:
            context.log.error(f"regression alert of event {item['event']} given up after {item['attempts']} "
                              f"attempts: {status}")
        observations.append(dg.AssetObservation(evaluation.key, partition=item["partition"], metadata={
            "alert_delivery": status, "alert_attempts": dg.IntMetadataValue(item["attempts"]),
            "alert_event": dg.IntMetadataValue(item["event"]),
            "k_delta": dg.FloatMetadataValue(float(item["payload"]["delta"] or 0.0))}))
    cursor = json.dumps({"after": after, "undelivered": retry}, sort_keys=True)
    return dg.SensorResult(asset_events=observations, cursor=cursor,
                           skip_reason=None if observations else "no new regression alerts")


automation_sensor = dg.AutomationConditionSensorDefinition(
    "kolm_automation",
    target=dg.AssetSelection.assets("deployment"),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Deploys a passing evaluation (never one whose blocking checks failed). Ships STOPPED.",
)

# The routing figures observed on `captures` (and logged on the deployed version in MLflow), as numbers.
ROUTING_FIGURES = ("compared", "agreement", "threshold", "kept_share", "kept_agreement_lower", "student_answered",
                   "escalated", "canaries", "student_share", "escalation_rate", "student_p50_ms", "teacher_p50_ms",
                   "dollars_avoided")


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Observes student routing on `captures` for each namespace routed `shadow` or `student`: "
           "agreement with the teacher, share answered by the student, escalations, p50s, teacher dollars avoided "
           "(plotted over time); the same figures go on the deployed version's run in MLflow.")
def routing_sensor(context: dg.SensorEvaluationContext, kolm: KolmResource) -> dg.SensorResult:
    from kolm_pipeline.registry.champion import log_version_metrics
    from kolm_pipeline.store import split_partition_key

    settings, observations, notes = kolm.settings, [], []
    try:
        for key in _namespaces(context):
            status = kolm.store.routing_status(*split_partition_key(key), settings.price_table)
            if status.mode == "teacher" and not status.compared:
                continue
            figures = {name: float(getattr(status, name)) for name in ROUTING_FIGURES
                       if getattr(status, name) is not None}
            metadata: dict = {"routing": dg.TextMetadataValue(status.mode),
                              **{name: dg.FloatMetadataValue(value) for name, value in figures.items()}}
            if status.adapter_cid:
                metadata["adapter_cid"] = dg.TextMetadataValue(status.adapter_cid)
            observations.append(dg.AssetObservation(captures.key, partition=key, metadata=metadata))
            if status.adapter_cid and settings.mlflow_tracking_uri:
                try:
                    log_version_metrics(settings.mlflow_tracking_uri, key, status.adapter_cid,
                                        {f"routing.{name}": value for name, value in figures.items()})
                except Exception as exc:  # noqa: BLE001 - MLflow down: the observation still counts
                    notes.append(f"{key}: MLflow not updated ({type(exc).__name__})")
    except STORE_ERRORS as exc:
        return dg.SensorResult(skip_reason=_store_down(exc))
    skip = None if observations else "no namespace routes through its student"
    if notes:
        context.log.warning("; ".join(notes))
    return dg.SensorResult(asset_events=observations, skip_reason=skip)


kolm_sensors = [namespace_discovery_sensor, volume_sensor, drift_sensor, regression_alert_sensor, automation_sensor,
                routing_sensor]
kolm_schedules = [nightly_distill]
