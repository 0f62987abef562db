"""Routing at the capture endpoint (issue 23), end to end with real servers: the official openai and anthropic
SDKs → the capture proxy → the stand-in teacher (a frontier API's stand-in) and `kolm serve` (the serving runtime
with a labels adapter on the tiny random-weight base, deployed by `swap_artifact` with its registry row).

The stand-in teacher's answers are chosen from the student's own confidences: it agrees with the adapter on
its most confident prompts and not on the least confident ones, so the threshold routing chooses must keep the
first and escalate the second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture_server import create_app
from kolm_pipeline.cli import main
from kolm_pipeline.demo.teacher import create_teacher_app
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.registry.manage import swap_artifact
from kolm_pipeline.serve.monitor import Trip, roll_back_on_trip
from kolm_pipeline.settings import CaptureConfig, Settings, load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.store.student_routing import Comparison, choose_threshold
from kolm_pipeline_tests.test_registry_support import LABELS, free_port, real_adapter, signed_artifact, wait_until

UPSTREAM_KEY = "sk-teacher-key-for-the-stand-in"
PROMPTS = [f"Ticket {index}: {topic} (order {1000 + index})" for index, topic in enumerate(
    ["I was charged twice", "my parcel is late", "the app crashes", "refund please", "wrong address",
     "cannot log in", "invoice missing", "package damaged", "slow website", "card declined"] * 4)]
DISAGREE = 8  # the stand-in teacher answers otherwise on the student's 8 least confident prompts


@dataclass
class World:
    settings: Settings
    store: CaptureStore
    key: str
    cid: str
    serve_url: str
    proxy_url: str
    proxy_app: object
    serve: subprocess.Popen
    teacher_answers: dict[str, str]
    confidence: dict[str, float]

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.proxy_url, headers={"authorization": f"Bearer {self.key}"}, timeout=60)

    def status(self, namespace: str = "labels") -> dict:
        with self.api() as api:
            return api.get(f"/v1/namespaces/{namespace}/status").json()

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy_url}/v1/capture/openai", api_key=self.key, max_retries=0,
                             default_headers={"x-kolm-namespace": "labels", "x-upstream-api-key": UPSTREAM_KEY},
                             timeout=60)

    def ask(self, prompt: str) -> tuple[str, str]:
        """(answer, who answered) for one request through the proxy with the openai SDK."""
        raw = self.openai().chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], max_tokens=8)
        return raw.parse().choices[0].message.content, raw.headers["x-kolm-served-by"]


def start_kolm_serve(settings: Settings, base: Path) -> tuple[subprocess.Popen, str]:
    """`kolm serve` as its own process on `settings.home` and the base model `base`, ready to answer."""
    port = free_port()
    env = {**os.environ, "KOLM_HOME": str(settings.home), "KOLM_BASE_MODEL": str(base), "HF_HUB_OFFLINE": "1"}
    env.pop("KOLM_STORE_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "kolm_pipeline.cli", "serve", "--port", str(port),
                                "--no-live-monitor", "--poll-interval", "0.05", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, "kolm serve exited"
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=120, interval=0.2, what="kolm serve to start")
    return process, url


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    from kolm_pipeline.train.base_model import resolve_base_model

    root: Path = tmp_path_factory.mktemp("routing")
    settings = load_settings(root / "home")
    store = CaptureStore(settings.store_url)
    key = store.create_tenant("acme")
    digest = resolve_base_model(str(tiny_base), settings.models_dir).digest
    adapter = real_adapter(tiny_base, root / "adapter", seed=3)
    artifact = signed_artifact(root / "labels.kolm", adapter_dir=adapter, keys_dir=settings.keys_dir,
                               task="acme.labels", labels=LABELS, salt="routing", base_digest=digest)
    cid = swap_artifact(settings, store, artifact, "force", "test").to_cid

    serve, serve_url = start_kolm_serve(settings, tiny_base)

    # What the student answers, and how sure it is, for each prompt (asked directly, one by one).
    confidence, student = {}, {}
    with httpx.Client(headers={"authorization": f"Bearer {key}"}, timeout=60) as http:
        for prompt in PROMPTS:
            reply = http.post(f"{serve_url}/v1/chat/completions",
                              json={"model": "acme.labels", "messages": [{"role": "user", "content": prompt}]})
            assert reply.status_code == 200, reply.text
            student[prompt] = reply.json()["choices"][0]["message"]["content"]
            confidence[prompt] = float(reply.headers["x-kolm-confidence"])
            assert reply.headers["x-kolm-answer-kind"] == "label"
    least_sure = sorted(PROMPTS, key=lambda p: confidence[p])[:DISAGREE]
    teacher_answers = {p: LABELS[(LABELS.index(student[p]) + 1) % len(LABELS)] if p in least_sure else student[p]
                       for p in PROMPTS}

    with BackgroundServer(create_teacher_app(teacher_answers)) as teacher:
        proxy_settings = settings.model_copy(update={"upstream_openai": f"{teacher.url}/v1",
                                                     "upstream_anthropic": teacher.url})
        config = CaptureConfig(retention_sweep_s=0, replay_interval_s=0.2, serve_url=serve_url,
                               routing_refresh_s=0.1, student_timeout_s=30)
        app = create_app(proxy_settings, store, config)
        with BackgroundServer(app) as proxy:
            yield World(settings, store, key, cid, serve_url, proxy.url, app, serve, teacher_answers, confidence)
    serve.kill()
    serve.wait(timeout=30)


def test_bad_routing_changes_nothing(world, monkeypatch, capsys):
    """An unknown value, `student` before enough agreement, `shadow` without a deployed adapter: each a clear
    error (400 JSON or a CLI message), and the switch stays as it was."""
    with world.api() as api:
        for body, namespace, expected in [
            ({"routing": "sometimes"}, "labels", "routing"),
            ({"routing": "student"}, "labels", "0 of 200 requests compared"),
            ({"routing": "shadow"}, "nothing", "no adapter is deployed"),
            ({"routing": "student"}, "nothing", "no adapter is deployed"),
            ({"canary_share": 1.5}, "labels", "canary_share"),
        ]:
            reply = api.post(f"/v1/namespaces/{namespace}/switches", json=body)
            assert reply.status_code == 400, reply.text
            assert expected in reply.json()["error"]["message"]
    assert world.status()["switches"]["routing"] == "teacher"

    monkeypatch.setenv("KOLM_HOME", str(world.settings.home))
    monkeypatch.delenv("KOLM_STORE_URL", raising=False)
    assert main(["capture", "status", "--namespace", "acme.labels", "--routing", "student"]) == 1
    assert "routing student refused: 0 of 200 requests compared" in capsys.readouterr().err
    assert world.store.namespace_settings("acme", "labels").routing == "teacher"


def test_shadow_then_student_through_the_proxy(world, monkeypatch, capsys):
    with world.api() as api:
        assert api.post("/v1/namespaces/labels/switches", json={"routing": "shadow"}).status_code == 200

    # Shadow: the teacher's answers, unchanged; the student answers off the response path and is compared.
    for prompt in PROMPTS:
        assert world.ask(prompt) == (world.teacher_answers[prompt], "teacher")
    wait_until(lambda: world.status()["routing"]["compared"] == len(PROMPTS), timeout=60,
               what="every shadowed request to be compared")
    routing = world.status()["routing"]
    assert routing["adapter_cid"] == world.cid and routing["mode"] == "shadow"
    assert routing["agreement"] == pytest.approx((len(PROMPTS) - DISAGREE) / len(PROMPTS), abs=0.051)
    assert routing["disagreements"] >= DISAGREE - 2
    assert routing["threshold"] is None and routing["ready"] is False  # 40 requests cannot show 0.98
    # A disagreement is listed with its capture, which the capture writer stores a moment after the comparison.
    with world.api() as api:
        def listed_all() -> list[dict] | None:
            found = api.get("/v1/namespaces/labels/disagreements").json()["disagreements"]
            return found if len(found) == routing["disagreements"] else None

        listed = wait_until(listed_all, timeout=30, interval=0.2, what="each disagreement listed")
    for item in listed:  # each names its capture, for triage, with both answers
        capture = world.store.get_capture("acme", item["capture_id"])
        assert item["teacher_output"] == world.teacher_answers[capture.messages[-1]["content"]]
        assert item["student_output"] != item["teacher_output"] and item["kind"] == "shadow"

    # Student: allowed now that enough requests agree at the chosen threshold (40 requests can show 0.9 with
    # 95 % confidence, not 0.98).
    with world.api() as api:
        assert "no confidence threshold" in api.post(
            "/v1/namespaces/labels/switches", json={"routing": "student", "shadow_min": len(PROMPTS)}
        ).json()["error"]["message"]
        switched = api.post("/v1/namespaces/labels/switches", json={
            "routing": "student", "shadow_min": len(PROMPTS), "canary_share": 0.0, "routing_target": 0.9})
    assert switched.status_code == 200, switched.text
    assert switched.json()["switches"]["routing"] == "student"
    time.sleep(0.3)  # the proxy reads a namespace's routing again within routing_refresh_s (0.1 s here)

    served = {prompt: world.ask(prompt) for prompt in PROMPTS}
    by_student = [p for p, (_, who) in served.items() if who == world.cid]
    assert len(by_student) >= len(PROMPTS) - DISAGREE - 4  # most requests, from the adapter (its header says so)
    for prompt, (answer, who) in served.items():
        assert who in (world.cid, "teacher")
        assert answer == world.teacher_answers[prompt]  # what it kept agrees; what it escalated is the teacher's
    least_sure = sorted(PROMPTS, key=lambda p: world.confidence[p])[:DISAGREE]
    assert all(served[p][1] == "teacher" for p in least_sure)  # the low-confidence ones were escalated

    # Streaming and the Anthropic shape, answered by the student too.
    sure = by_student[0]
    with world.openai().chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": sure}], stream=True) as response:
        assert response.headers["x-kolm-served-by"] == world.cid
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == world.teacher_answers[sure]
    claude = anthropic.Anthropic(
        base_url=f"{world.proxy_url}/v1/capture/anthropic", api_key=world.key, max_retries=0,
        default_headers={"x-kolm-namespace": "labels", "x-upstream-api-key": UPSTREAM_KEY})
    message = claude.messages.create(model="claude-haiku-4", max_tokens=8, messages=[{"role": "user", "content": sure}])
    assert message.content[0].text == world.teacher_answers[sure]
    with claude.messages.stream(model="claude-haiku-4", max_tokens=8,
                                messages=[{"role": "user", "content": sure}]) as events:
        assert events.response.headers["x-kolm-served-by"] == world.cid
        assert events.get_final_text() == world.teacher_answers[sure]

    # Every request is captured, saying who answered; the student's own answers never become training pairs.
    world.proxy_app.state.recorder.flush_threadsafe()
    captures = world.store.list_captures("acme")
    answered = [c for c in captures if c.served_by == world.cid]
    assert len(answered) == len(by_student) + 3
    assert len(captures) == 2 * len(PROMPTS) + 3
    world.store.set_triage("acme", [c.id for c in captures], "kept", "test")
    assert len(world.store.kept_pairs("acme", "labels")) == len(captures) - len(answered)

    escalated = len(PROMPTS) - len(by_student)  # compared off the response path: written within a flush
    wait_until(lambda: world.status()["routing"]["escalated"] == escalated, timeout=30, what="the escalations")
    routing = world.status()["routing"]
    assert routing["student_answered"] == len(answered)
    assert routing["student_share"] == pytest.approx(len(answered) / (len(answered) + routing["escalated"]))
    assert routing["dollars_avoided"] > 0

    monkeypatch.setenv("KOLM_HOME", str(world.settings.home))
    monkeypatch.delenv("KOLM_STORE_URL", raising=False)
    capsys.readouterr()
    assert main(["capture", "status", "--namespace", "acme.labels"]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[-1] for line in printed.splitlines() if line.strip()}
    assert (rows["student_answered"], rows["adapter_cid"]) == (str(len(answered)), world.cid)
    assert ["routing", "student"] in [line.split() for line in printed.splitlines()]  # the switches table


def test_a_slow_student_or_a_new_adapter_leaves_the_answer_to_the_teacher(world, tiny_base, tmp_path):
    """Student routing on: a proxy whose student timeout is shorter than any answer, and then a swap to an adapter
    no shadow traffic has judged yet: every request is answered, by the teacher."""
    with world.api() as api:
        assert api.post("/v1/namespaces/labels/switches", json={
            "routing": "student", "shadow_min": len(PROMPTS), "canary_share": 0.0, "routing_target": 0.9,
        }).status_code == 200
    impatient = create_app(world.proxy_app.state.settings, world.store,
                           CaptureConfig(retention_sweep_s=0, serve_url=world.serve_url, student_timeout_s=0.001))
    with BackgroundServer(impatient) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1/capture/openai", api_key=world.key, max_retries=0,
                               default_headers={"x-kolm-namespace": "labels", "x-upstream-api-key": UPSTREAM_KEY})
        for prompt in PROMPTS[:5]:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
            assert (raw.parse().choices[0].message.content, raw.headers["x-kolm-served-by"]) == (
                world.teacher_answers[prompt], "teacher")
        assert impatient.state.router.stats["fallbacks"] == 5

    from kolm_pipeline.train.base_model import resolve_base_model

    adapter = real_adapter(tiny_base, tmp_path / "adapter", seed=11)
    digest = resolve_base_model(str(tiny_base), world.settings.models_dir).digest
    artifact = signed_artifact(tmp_path / "new.kolm", adapter_dir=adapter, keys_dir=world.settings.keys_dir,
                               task="acme.labels", labels=LABELS, salt="new", base_digest=digest)
    new_cid = swap_artifact(world.settings, world.store, artifact, "force", "test").to_cid

    def serving_new() -> bool:
        models = httpx.get(f"{world.serve_url}/v1/models", headers={"authorization": f"Bearer {world.key}"}).json()
        return any(model.get("kolm_adapter_cid") == new_cid for model in models["data"])

    wait_until(serving_new, timeout=60, what="kolm serve to flip to the new adapter")
    time.sleep(0.3)  # and the proxy to read the new deployment (routing_refresh_s)
    for prompt in PROMPTS[:10]:  # the new adapter has no threshold yet: the old one's does not carry over
        assert world.ask(prompt) == (world.teacher_answers[prompt], "teacher")
    routing = world.status()["routing"]
    assert (routing["adapter_cid"], routing["threshold"], routing["ready"]) == (new_cid, None, False)


def test_killing_the_serving_runtime_mid_traffic_fails_no_request(world):
    """With the student answering, `kolm serve` is killed (SIGKILL) while four clients send: every client
    request still gets its answer, the teacher's from then on."""
    with world.api() as api:
        api.post("/v1/namespaces/labels/switches", json={
            "routing": "student", "shadow_min": len(PROMPTS), "canary_share": 0.0, "routing_target": 0.9})
    time.sleep(0.3)
    answered: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def client(prompts: list[str]) -> None:
        for prompt in prompts:
            answer, who = world.ask(prompt)
            with lock:
                answered.append((prompt, answer, who))
                if len(answered) == 12:
                    world.serve.kill()  # mid-traffic: the other clients' requests are in flight

    threads = [threading.Thread(target=client, args=(PROMPTS[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert world.serve.wait(timeout=10) == -signal.SIGKILL
    assert len(answered) == len(PROMPTS)  # no client request failed
    assert all(answer == world.teacher_answers[prompt] for prompt, answer, _ in answered)
    assert {who for _, _, who in answered[16:]} == {"teacher"}
    assert world.proxy_app.state.router.stats["fallbacks"] >= len(PROMPTS) - 16


def test_threshold_keeps_the_most_answers_at_the_target_with_confidence():
    """The kept answers' agreement must reach the target by its 95 % lower bound, not only on the sample."""
    sure = [(0.5 + i / 1000, 1.0) for i in range(50, 200)]  # 150 agreeing answers above 0.55
    unsure = [(i / 1000, 0.0) for i in range(50)]
    chosen = choose_threshold(sure + unsure, 0.98)
    assert (chosen.threshold, chosen.kept_share, chosen.kept_agreement) == (0.55, 0.75, 1.0)
    assert chosen.kept_lower == pytest.approx(150 / (150 + 1.645**2))  # Wilson's bound for 150 of 150
    assert choose_threshold(sure + unsure, 0.99).threshold is None  # 150 agreeing answers cannot show 0.99
    assert choose_threshold(sure[:100] + unsure, 0.98).threshold is None  # nor can 100 show 0.98
    one_wrong = [*sure, (0.9999, 0.0)]  # the most confident answer disagrees: the sample still shows 0.98
    assert choose_threshold(one_wrong, 0.97).threshold == 0.55
    # Equal confidences are kept or cut together: 300 agreeing and 20 not at 0.5 show 0.91, not 0.95.
    assert choose_threshold([(0.5, 1.0)] * 300 + [(0.5, 0.0)] * 20, 0.95).threshold is None
    assert choose_threshold([(0.5, 1.0)] * 300 + [(0.5, 0.0)] * 20, 0.9).threshold == 0.5


def _two_versions_routed(settings: Settings, tiny_base: Path, tmp_path: Path) -> tuple[CaptureStore, list[str]]:
    """acme.labels deployed twice (registry rows, MLflow versions), 200 agreeing comparisons of the second."""
    store = CaptureStore(settings.store_url)
    store.create_tenant("acme")
    cids = []
    for seed in (1, 2):
        adapter = real_adapter(tiny_base, tmp_path / f"adapter{seed}", seed=seed)
        artifact = signed_artifact(tmp_path / f"v{seed}.kolm", adapter_dir=adapter, keys_dir=settings.keys_dir,
                                   task="acme.labels", labels=LABELS, salt=f"v{seed}")
        cids.append(swap_artifact(settings, store, artifact, "force", "test").to_cid)
    store.add_comparisons([Comparison("acme", "labels", f"r{i}", cids[1], "shadow", 1.0 if i >= 20 else 0.0,
                                      0.5 + i / 1000, "billing", 1000, 2000) for i in range(200)])
    return store, cids


def test_routing_sensor_observes_captures_and_logs_the_deployed_version(kolm_settings, tiny_base, tmp_path):
    import dagster as dg
    import mlflow

    from kolm_pipeline.definitions import defs
    from kolm_pipeline.defs.automation import routing_sensor
    from kolm_pipeline.defs.partitions import NAMESPACE_PARTITIONS_NAME
    from kolm_pipeline.defs.resources import KolmResource

    store, cids = _two_versions_routed(kolm_settings, tiny_base, tmp_path)
    store.set_switches("acme", "labels", "test", routing="shadow")
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster"), set_dagster_home=False) as instance:
        instance.add_dynamic_partitions(NAMESPACE_PARTITIONS_NAME, ["acme.labels", "acme.quiet"])
        context = dg.build_sensor_context(instance_ref=instance.get_ref(), resources={"kolm": KolmResource()},
                                          definitions=defs)
        tick = routing_sensor.evaluate_tick(context)
    [event] = tick.asset_events  # acme.quiet routes nothing: no observation
    observed = {name: value.value for name, value in event.metadata.items()}
    assert (event.partition, observed["routing"], observed["adapter_cid"]) == ("acme.labels", "shadow", cids[1])
    assert (observed["compared"], observed["agreement"]) == (200, pytest.approx(0.9))
    assert observed["kept_share"] > 0 and observed["teacher_p50_ms"] == 2.0
    client = mlflow.MlflowClient(kolm_settings.mlflow_tracking_uri)
    [version] = client.search_model_versions("name='kolm-acme.labels' and tag.`kolm.artifact_cid`='" + cids[1] + "'")
    [metric] = client.get_metric_history(version.run_id, "routing.agreement")
    assert metric.value == pytest.approx(0.9)


def test_live_rollback_returns_the_namespace_to_shadow(kolm_settings, tiny_base, tmp_path):
    settings = kolm_settings
    store, cids = _two_versions_routed(settings, tiny_base, tmp_path)
    store.set_switches("acme", "labels", "test", routing="student")
    outcome = roll_back_on_trip(settings, Trip(task="acme.labels", cid=cids[1], live_score=0.2,
                                               evaluated_score=0.9, tolerance=0.1, observed=50, counts={}))
    assert outcome.startswith(f"rolled back {cids[1]} → {cids[0]}")
    assert store.namespace_settings("acme", "labels").routing == "shadow"
    assert [row.action for row in store.audit_rows("acme", "labels")][0] == "switch.routing"


def test_compared_answers_leave_with_the_retention_window(tmp_path):
    from kolm_pipeline_tests.test_store import Clock, capture

    clock = Clock()
    path = tmp_path / "captures.db"
    store = CaptureStore(f"sqlite:///{path}", clock=clock, default_retention_days=1)
    store.insert_captures([capture(1, namespace="labels")])
    store.add_comparisons([Comparison("acme", "labels", "r1", "bafkreiexample", "shadow", 0.0, 0.7,
                                      "Zebra-Quokka-Student-Answer " * 10, 1000, 2000)])
    clock.advance(hours=23)
    assert store.apply_retention() == {} and len(store.comparisons("acme", "labels", "bafkreiexample")) == 1
    clock.advance(hours=2)
    store.apply_retention()
    assert store.comparisons("acme", "labels", "bafkreiexample") == []
    store.close()
    for file in tmp_path.iterdir():
        assert b"Zebra-Quokka-Student-Answer" not in file.read_bytes(), file.name


def test_requests_the_student_cannot_honour_stay_with_the_teacher():
    from kolm_pipeline.routing.student_client import max_tokens_of, student_can_answer, student_messages

    assert student_can_answer({"messages": []}) and student_can_answer({"n": 1})
    for body in ({"tools": [{"type": "function"}]}, {"n": 2}, {"response_format": {"type": "json_object"}},
                 {"logprobs": True}):
        assert not student_can_answer(body)
    assert student_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]) is None
    assert student_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == [
        {"role": "user", "content": "hi"}]
    assert (max_tokens_of({"max_tokens": 9}), max_tokens_of({"max_tokens": 10**6}), max_tokens_of({})) == (9, 4096, 256)


def test_compared_answers_are_stored_redacted_and_a_bad_row_does_not_block_the_others(tmp_path):
    """Review of issue 23: the student's answer went into the store raw (PII, even the provider key it echoed),
    and one row the store refused kept every later comparison from being written."""
    import asyncio

    from kolm_pipeline.capture.forward import Call
    from kolm_pipeline.capture.providers import OPENAI
    from kolm_pipeline.capture.redact import Redactor
    from kolm_pipeline.routing.router import NamespaceRoute, StudentRouter
    from kolm_pipeline.routing.student_client import StudentClient, StudentReply

    store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
    secret = "sk-upstream-secret-0123456789"
    router = StudentRouter(store, StudentClient("http://127.0.0.1:9", 1.0))
    teacher = json.dumps({"choices": [{"message": {"content": "billing"}}]}).encode()

    def call(request_id: str) -> Call:
        made = Call(None, OPENAI, "acme", "labels", "gpt-4o-mini", b"{}", (), secret, False)
        made.request_id = request_id
        return made

    leaky = StudentReply(text=f"write to bob@example.com with {secret}", confidence=0.4, cid="bafkreiexample",
                         kind="text", latency_us=1000, prompt_tokens=None, completion_tokens=None)

    async def run() -> None:
        route = NamespaceRoute("shadow", adapter_cid="bafkreiexample", redactor=Redactor())
        await router._compare(call("r1"), leaky, "shadow", route, "reply", 200, teacher, 500)
        await router._compare(call("r2"), leaky, "not-a-kind", route, "reply", 200, teacher, 500)  # refused
        await router._compare(call("r3"), leaky, "escalated", route, "reply", 200, teacher, 500)
        await router._flush()

    asyncio.run(run())
    stored = store.comparisons("acme", "labels", "bafkreiexample")
    assert sorted(c.request_id for c in stored) == ["r1", "r3"] and router.stats["dropped"] == 1
    for comparison in stored:
        assert "bob@example.com" not in comparison.student_output and secret not in comparison.student_output


def test_routing_knobs_that_could_never_be_met_are_refused(tmp_path):
    store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
    for changes, message in [({"routing_target": 1.0}, "below 1"), ({"shadow_min": 6000}, "from 1 to 5000"),
                             ({"canary_share": False}, "canary_share"), ({"routing_target": "high"}, "above 0")]:
        with pytest.raises(InvalidInput, match=message):
            store.set_switches("acme", "labels", "test", **changes)


def test_rules_leave_the_students_answers_to_a_person(tmp_path):
    from kolm_pipeline_tests.test_store import capture

    store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
    store.insert_captures([capture(1, namespace="labels"), capture(2, namespace="labels", served_by="bafkreiexample")])
    store.add_rule("acme", "labels", "keep", {"status": "ok"}, "test")
    assert store.apply_rules("acme", "labels") == {"kept": 1, "discarded": 0}
    assert store.counters("acme", "labels")["kept"] == 1


def test_a_halt_left_in_an_old_state_file_survives_its_import(kolm_settings):
    from kolm_pipeline.stages.workdir import NamespaceWorkdir

    store = CaptureStore(kolm_settings.store_url)
    workdir = NamespaceWorkdir(kolm_settings, "acme.labels")
    workdir.root.mkdir(parents=True)
    store.update_tripwire_state("acme.labels", lambda _state: {"last_good": {"holdout_score": 0.8}})
    workdir.legacy_tripwire_state.write_text(json.dumps({"halted": True, "halt_reasons": ["collapsed"]}))
    ledger = workdir.tripwire_ledger(store)
    assert ledger.tripwire_state("acme.labels") == {"last_good": {"holdout_score": 0.8}, "halted": True,
                                                     "halt_reasons": ["collapsed"]}
    assert not workdir.legacy_tripwire_state.exists()
