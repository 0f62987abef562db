"""Sensors and the nightly schedule, ticked the way the daemon ticks them: against a real Dagster instance
(SQLite in a temp dir), a real capture store, a real champion artifact, real MiniLM embeddings and a real
HTTP webhook. Each tick starts from the cursor the previous one returned."""

from __future__ import annotations

import random
import socket
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.definitions import defs
from kolm_pipeline.defs.automation import (
    build_drift_sensor,
    kolm_schedules,
    kolm_sensors,
    namespace_discovery_sensor,
    nightly_distill,
    regression_alert_sensor,
    volume_sensor,
)
from kolm_pipeline.defs.partitions import NAMESPACE_PARTITIONS_NAME
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.demo.tickets import Ticket, generate_tickets
from kolm_pipeline.evaluate.gate import decide
from kolm_pipeline.registry.artifact import build_kolm
from kolm_pipeline.registry.swap import publish_artifact, swap_pointer
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.backlog import last_distill
from kolm_pipeline.stages.corpus import run_corpus_stage
from kolm_pipeline.stages.drift import DriftConfig
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import CaptureStore

from .conftest import capture_tickets

PARTITION = "acme.support"


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster"), set_dagster_home=False) as instance:
        yield instance


def _tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None = None):
    """One tick as the daemon runs it: an instance reference, so partitioned run requests are validated."""
    context = dg.build_sensor_context(instance_ref=instance.get_ref(), cursor=cursor,
                                      resources={"kolm": KolmResource()}, definitions=defs)
    return sensor.evaluate_tick(context)


def _observed(tick, partition: str = PARTITION) -> dict:
    """The metadata of the tick's observation of `partition`, as plain values."""
    [event] = [event for event in tick.asset_events if event.partition == partition]
    return {name: value.value for name, value in event.metadata.items()}


def _keep(store: CaptureStore, tickets: list[Ticket], namespace: str = "support") -> None:
    capture_tickets(store, "acme", namespace, tickets)
    store.apply_rules("acme", namespace)


def _store_with_keep_rule(settings: Settings, *namespaces: str) -> CaptureStore:
    store = CaptureStore(settings.store_url)
    for namespace in namespaces:
        store.add_rule("acme", namespace, "keep", {"status": "ok"}, actor="test")
    return store


def test_everything_ships_stopped():
    assert {sensor.name for sensor in kolm_sensors} == {
        "namespace_discovery_sensor", "volume_sensor", "drift_sensor", "regression_alert_sensor", "kolm_automation",
        "routing_sensor"}
    assert all(sensor.default_status == dg.DefaultSensorStatus.STOPPED for sensor in kolm_sensors)
    assert [(s.name, s.cron_schedule, s.default_status) for s in kolm_schedules] == [
        ("nightly_distill", "0 2 * * *", dg.DefaultScheduleStatus.STOPPED)]


def test_discovery_adds_a_partition_per_namespace(kolm_settings, instance):
    store = CaptureStore(kolm_settings.store_url)
    capture_tickets(store, "acme", "support", generate_tickets(3))
    capture_tickets(store, "acme", "billing", generate_tickets(2))
    capture_tickets(store, "globex", "sales", generate_tickets(1))
    first = _tick(namespace_discovery_sensor, instance)
    [request] = first.dynamic_partitions_requests
    assert request.partitions_def_name == NAMESPACE_PARTITIONS_NAME
    assert list(request.partition_keys) == ["acme.billing", "acme.support", "globex.sales"]
    instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, list(request.partition_keys))

    assert not _tick(namespace_discovery_sensor, instance).dynamic_partitions_requests
    capture_tickets(store, "globex", "legal", generate_tickets(1))
    assert list(_tick(namespace_discovery_sensor, instance).dynamic_partitions_requests[0].partition_keys) == [
        "globex.legal"]


def test_volume_sensor_counts_kept_pairs_since_the_last_distill(kolm_settings, instance, monkeypatch):
    monkeypatch.setenv("KOLM_DISTILL_THRESHOLD", "50")
    store = _store_with_keep_rule(kolm_settings, "support")
    instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, [PARTITION])
    tickets = generate_tickets(200, seed=3)

    _keep(store, tickets[:40])
    first = _tick(volume_sensor, instance)
    assert not first.run_requests and "50 kept pairs" in first.skip_message
    assert _observed(first)["kept"] == 40 and _observed(first)["kept_since_last_distill"] == 40

    _keep(store, tickets[40:60])
    second = _tick(volume_sensor, instance, first.cursor)
    [request] = second.run_requests
    assert (request.run_key, request.partition_key) == ("volume:acme.support:60", PARTITION)
    assert request.tags["kolm/new_kept_pairs"] == "60" and request.tags["kolm/trigger"] == "volume"
    # The same tick evaluated twice asks for the same run_key, which the daemon launches once.
    assert _tick(volume_sensor, instance, first.cursor).run_requests[0].run_key == request.run_key

    # The requested distill has not written its corpus yet: the pairs it will take are not asked for again.
    _keep(store, tickets[60:80])
    third = _tick(volume_sensor, instance, second.cursor)
    assert not third.run_requests

    # A distill launched another way (`kolm distill`, the UI) resets the count. The ten exact duplicates it
    # drops stay "not distilled" in the store, so kept − distilled would never come back to zero.
    _keep(store, tickets[:10])
    run_corpus_stage(NamespaceWorkdir(kolm_settings, PARTITION), store, min_pairs=1)
    counters = store.counters("acme", "support")
    assert counters["kept"] == 90 and counters["distilled"] <= 80
    assert last_distill(NamespaceWorkdir(kolm_settings, PARTITION))[1] == 90
    fourth = _tick(volume_sensor, instance, third.cursor)
    assert not fourth.run_requests and _observed(fourth)["kept_since_last_distill"] == 0

    unchanged = _tick(volume_sensor, instance, fourth.cursor)
    assert not unchanged.asset_events  # counters are reported when they change, not every tick

    _keep(store, tickets[80:130])
    fifth = _tick(volume_sensor, instance, fourth.cursor)
    assert [(r.run_key, r.tags["kolm/new_kept_pairs"]) for r in fifth.run_requests] == [
        ("volume:acme.support:140", "50")]


def test_nightly_schedule_distills_only_namespaces_with_new_kept_pairs(kolm_settings, instance, monkeypatch):
    monkeypatch.setenv("KOLM_DISTILL_THRESHOLD", "50")
    store = _store_with_keep_rule(kolm_settings, "support", "billing", "tiny")
    instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, ["acme.billing", "acme.support", "acme.tiny"])
    _keep(store, generate_tickets(60, seed=1), "support")
    _keep(store, generate_tickets(60, seed=2), "billing")
    _keep(store, generate_tickets(5, seed=3), "tiny")
    run_corpus_stage(NamespaceWorkdir(kolm_settings, "acme.support"), store, min_pairs=1)

    def night(day: int):
        context = dg.build_schedule_context(instance_ref=instance.get_ref(), resources={"kolm": KolmResource()},
                                            scheduled_execution_time=datetime(2026, 3, day, 2, 0, tzinfo=UTC),
                                            repository_def=defs.get_repository_def())
        return nightly_distill.evaluate_tick(context)

    first = night(4)
    assert [(r.run_key, r.partition_key, r.tags["kolm/new_kept_pairs"]) for r in first.run_requests] == [
        ("nightly:2026-03-04:acme.billing", "acme.billing", "60")]

    run_corpus_stage(NamespaceWorkdir(kolm_settings, "acme.billing"), store, min_pairs=1)
    quiet = night(5)
    assert not quiet.run_requests
    assert "no namespace has new kept pairs" in quiet.skip_message and "acme.tiny (5 kept)" in quiet.skip_message

    _keep(store, generate_tickets(7, seed=4), "support")
    assert [r.run_key for r in night(6).run_requests] == ["nightly:2026-03-06:acme.support"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_store_skips_the_tick_with_the_reason(kolm_settings, instance, monkeypatch):
    monkeypatch.setenv("KOLM_STORE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/kolm")
    instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, [PARTITION])
    cursor = '{"acme.support": {"tested": "earlier"}}'
    for sensor in (namespace_discovery_sensor, volume_sensor, build_drift_sensor()):
        tick = _tick(sensor, instance, cursor)
        assert tick.skip_message.startswith("capture store unreachable, tick skipped (OperationalError"), sensor.name
        assert not tick.run_requests and tick.cursor == cursor  # the cursor stays as it was
    context = dg.build_schedule_context(instance_ref=instance.get_ref(), resources={"kolm": KolmResource()},
                                        scheduled_execution_time=datetime(2026, 3, 4, 2, 0, tzinfo=UTC))
    assert nightly_distill.evaluate_tick(context).skip_message.startswith("capture store unreachable")


@pytest.fixture
def webhook():
    """A real HTTP endpoint; `answers` queues the status codes of the next deliveries (then 200)."""
    received: list[tuple[int, dict]] = []
    answers: list[int] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> JSONResponse:
        status = answers.pop(0) if answers else 200
        received.append((status, await request.json()))
        return JSONResponse({"ok": status == 200}, status_code=status)

    with BackgroundServer(app) as server:
        yield f"{server.url}/hook", received, answers


def _evaluated(instance: dg.DagsterInstance, k_new: float, k_current: float, run_delivery: str) -> None:
    """An evaluation event with the metadata the `evaluation` asset writes, decided by the real gate."""
    decision = decide(k_new=k_new, k_current=k_current, k_floor=0.5, tripwire_clear=True)
    instance.report_runless_asset_event(dg.AssetMaterialization("evaluation", partition=PARTITION, metadata={
        "alert": run_delivery if decision.alert else "none",
        "k_candidate": dg.FloatMetadataValue(k_new),
        "k_current": dg.FloatMetadataValue(k_current),
        "k_delta": dg.FloatMetadataValue(round(decision.delta, 4)),
        "gate_decision": decision.reason,
        "current": "champion:bafkreichampion",
        "receipt_cid": f"bafkrei{k_new:.2f}",
    }))


def test_regression_alerts_reach_the_webhook_exactly_once(kolm_settings, instance, webhook, monkeypatch):
    url, received, answers = webhook
    _evaluated(instance, 0.60, 0.70, "logged (no KOLM_ALERT_WEBHOOK configured)")  # before the sensor ran
    start = _tick(regression_alert_sensor, instance)
    assert start.skip_message.startswith("watching evaluations after event")

    monkeypatch.setenv("KOLM_ALERT_WEBHOOK", url)
    _evaluated(instance, 0.61, 0.71, "logged (no KOLM_ALERT_WEBHOOK configured)")  # alert, not delivered by the run
    _evaluated(instance, 0.62, 0.72, "delivered (200)")  # alert the run delivered itself
    _evaluated(instance, 0.80, 0.70, "none")  # swap
    _evaluated(instance, 0.68, 0.70, "none")  # regression within −0.03: refused without alert
    first = _tick(regression_alert_sensor, instance, start.cursor)
    assert [body["receipt_cid"] for _, body in received] == ["bafkrei0.61"]
    status, body = received[0]
    assert status == 200 and body["kind"] == "kolm.regression" and body["task"] == PARTITION
    assert body["delta"] == pytest.approx(-0.10) and body["reason"].startswith("refused and alerted")
    deliveries = sorted(str(event.metadata["alert_delivery"].value) for event in first.asset_events)
    assert deliveries == ["by the evaluation run: delivered (200)", "delivered (200)"]

    again = _tick(regression_alert_sensor, instance, first.cursor)
    assert len(received) == 1 and again.skip_message == "no new regression alerts"

    # A webhook that fails is retried on the next tick, and then not again.
    answers.append(500)
    _evaluated(instance, 0.50, 0.70, "webhook failed: ConnectError")
    failed = _tick(regression_alert_sensor, instance, again.cursor)
    assert [str(e.metadata["alert_delivery"].value) for e in failed.asset_events] == ["webhook answered 500"]
    retried = _tick(regression_alert_sensor, instance, failed.cursor)
    assert [str(e.metadata["alert_delivery"].value) for e in retried.asset_events] == ["delivered (200)"]
    assert not _tick(regression_alert_sensor, instance, retried.cursor).asset_events
    delivered = [body["receipt_cid"] for status, body in received if status == 200]
    assert delivered == ["bafkrei0.61", "bafkrei0.50"]


PRIVACY_REQUESTS = [
    "Please delete all the personal data you hold about me under GDPR.",
    "I want a copy of every piece of data your company stores about me.",
    "Under the CCPA I ask you not to sell my personal information.",
    "Who is your data protection officer and how do I reach them?",
    "Which third parties did you share my data with last year?",
    "I withdraw my consent to marketing emails and cookie tracking.",
    "Someone opened an account with my personal details, please erase it.",
    "How long do you keep recordings of my support calls?",
    "We need a signed data processing agreement before we can continue.",
]


def _privacy_tickets(count: int, seed: int) -> list[Ticket]:
    rng = random.Random(seed)
    return [Ticket(f"{rng.choice(['', 'Hi, ', 'Hello, '])}{rng.choice(PRIVACY_REQUESTS)}", "privacy")
            for _ in range(count)]


def _tiny_lora(path: Path) -> None:
    """A real PEFT LoRA adapter (of a one-layer random Llama): what a champion artifact carries."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(path)


def _deploy_champion(settings: Settings, store: CaptureStore) -> str:
    """Distill the namespace's corpus and put a signed .kolm naming it behind the task's pointer."""
    workdir = NamespaceWorkdir(settings, PARTITION)
    corpus = run_corpus_stage(workdir, store, min_pairs=1)
    _tiny_lora(workdir.root / "champion-adapter")
    staging = workdir.root / "champion.kolm"
    build_kolm(staging, manifest={"task": PARTITION, "tenant": "acme", "namespace": "support",
                                  "corpus_cid": corpus.cid},
               adapter_dir=workdir.root / "champion-adapter", evals={},
               receipts=[workdir.receipt_path("corpus").read_bytes()], signer=workdir.signer())
    swap_pointer(settings.adapters_dir, PARTITION, publish_artifact(settings.artifacts_dir, PARTITION, staging))
    return corpus.cid


def test_drift_sensor_tests_each_window_against_the_champions_requests(kolm_settings, instance):
    config = DriftConfig(window=60, min_samples=40, permutations=500, alpha=0.05, max_new_embeddings=100)
    sensor = build_drift_sensor(config)
    store = _store_with_keep_rule(kolm_settings, "support")
    instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, [PARTITION])
    _keep(store, generate_tickets(150, seed=21))
    assert "no adapter is deployed" in _tick(sensor, instance).skip_message
    corpus_cid = _deploy_champion(kolm_settings, store)

    warming = _tick(sensor, instance)  # 150 training requests, 100 embedded per tick
    assert "warming the embedding cache (100 texts embedded" in warming.skip_message
    warm = _tick(sensor, instance, warming.cursor)
    assert "0 requests since the champion's corpus; a test needs 40" in warm.skip_message
    assert (kolm_settings.home / "drift" / PARTITION / f"reference-{corpus_cid}.json").is_file()

    # 210 captures make window 3: the same kind of tickets, untriaged. No drift, no run.
    capture_tickets(store, "acme", "support", generate_tickets(60, seed=22))
    quiet = _tick(sensor, instance, warm.cursor)
    measured = _observed(quiet)
    assert not quiet.run_requests and not measured["drift_detected"] and measured["drift_p_value"] > 0.05
    assert (measured["drift_recent_requests"], measured["drift_reference_requests"]) == (60, 150)
    assert measured["drift_window"] == f"{corpus_cid}:3" and measured["corpus_cid"] == corpus_cid
    assert "no drift" in quiet.skip_message
    tested = _tick(sensor, instance, quiet.cursor)
    assert not tested.asset_events and "window 3 is tested" in tested.skip_message

    # Window 4: a third of the requests are about a topic the champion never saw, none kept yet.
    drifted = generate_tickets(40, seed=23) + _privacy_tickets(20, seed=23)
    random.Random(4).shuffle(drifted)
    capture_tickets(store, "acme", "support", drifted)
    unkept = _tick(sensor, instance, tested.cursor)
    measured = _observed(unkept)
    assert measured["drift_detected"] and measured["drift_p_value"] <= 0.05
    assert measured["drift_statistic"] > measured["drift_threshold"]
    assert not unkept.run_requests and measured["drift_action"].startswith("no kept pairs since the last distill")

    # Window 5: more of the new topic, and the operator's rule keeps what came in: a distill is requested.
    capture_tickets(store, "acme", "support", generate_tickets(40, seed=24) + _privacy_tickets(20, seed=24))
    store.apply_rules("acme", "support")
    requested = _tick(sensor, instance, unkept.cursor)
    [request] = requested.run_requests
    assert request.run_key == f"drift:{PARTITION}:{corpus_cid}:5" and request.partition_key == PARTITION
    assert request.tags["kolm/trigger"] == "drift" and float(request.tags["kolm/drift_p_value"]) <= 0.05
    assert request.tags["kolm/new_kept_pairs"] == "180"
    assert _observed(requested)["drift_action"] == "distill requested"
