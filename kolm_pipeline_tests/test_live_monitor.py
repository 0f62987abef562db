"""Live monitoring and automatic rollback.

The monitor's bookkeeping on its own (sampling, the window, feedback, tripping once), then the whole path on
the tiny model behind a real HTTP server: adapters really trained (one on valid JSON answers, one on garbage
that its artifact nonetheless claims scores high), deployed through the registry, queried with the `openai`
SDK; a degrading adapter is rolled back by the live monitor (registry row, pointer, alert to a real webhook
receiver, the runtime serving the previous adapter again), a healthy one is not, explicit feedback alone
trips it too, and a version the monitor condemned before is never restored automatically."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from kolm_pipeline.cli import main
from kolm_pipeline.provenance.receipts import receipt_cid
from kolm_pipeline.registry import (
    build_kolm,
    cid_for_bytes,
    ensure_tenant_keys,
    load_private_key,
    make_receipt,
    read_pointer,
)
from kolm_pipeline.registry.artifact import adapter_file_cids
from kolm_pipeline.registry.manage import LIVE_MONITOR_ACTOR, PointerMoved, rollback, swap_artifact
from kolm_pipeline.serve.monitor import LiveMonitor, MonitorConfig, MonitorConfigError, Profile, Trip, sampled
from kolm_pipeline.settings import Settings, load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_registry_support import clean_env, free_port, shared_mlflow_uri, wait_until

SCHEMA = {"type": "object", "properties": {"queue": {"type": "string"}}, "required": ["queue"],
          "additionalProperties": False}
ANSWERS = {"good": '{"queue": "billing"}', "bad": "Sorry, I cannot help with that."}
MIN_REQUESTS = 8
ROOM = 24  # the manifest's max_new_tokens: the room the (claimed) evaluation gave an answer


# --- the monitor on its own ---------------------------------------------------------------------------------

JSON_PROFILE = Profile(verifier="json_schema", json_schema=SCHEMA, evaluated_accuracy=0.9, evaluated_coverage=1.0)
ASK = [{"role": "user", "content": "Where is my parcel?"}]


class Trips:
    def __init__(self) -> None:
        self.seen: list[Trip] = []

    def __call__(self, trip: Trip) -> str:
        self.seen.append(trip)
        return "recorded"


def _monitor(**config) -> tuple[LiveMonitor, Trips]:
    trips = Trips()
    return LiveMonitor(MonitorConfig(**{"sample_share": 1.0, "min_requests": 5, "window": 10, **config}), trips), trips


def test_trips_once_past_min_requests_with_the_numbers():
    monitor, trips = _monitor()
    monitor.activate("t", "cid-1", JSON_PROFILE)
    for index in range(4):
        monitor.observe("t", "cid-1", f"r{index}", ASK, "not json")
    assert trips.seen == []  # below min_requests nothing trips, however bad
    monitor.observe("t", "cid-1", "r4", ASK, "not json")
    monitor.wait()
    assert len(trips.seen) == 1
    trip = trips.seen[0]
    assert (trip.task, trip.cid, trip.live_score, trip.evaluated_score, trip.observed) == ("t", "cid-1", 0.0, 1.0, 5)
    assert "live score 0.000 over 5 judged responses" in trip.reason
    for index in range(5, 20):
        monitor.observe("t", "cid-1", f"r{index}", ASK, "not json")
    monitor.wait()
    assert len(trips.seen) == 1  # once per activation
    active = monitor.status()["tasks"]["t"]["active"]
    assert (active["state"], active["outcome"], active["served"], active["format_failed"]) == \
        ("tripped", "recorded", 20, 20)

    # A new activation of the task (the rollback landing) is watched afresh.
    monitor.activate("t", "cid-0", JSON_PROFILE)
    for index in range(20, 30):
        monitor.observe("t", "cid-0", f"r{index}", ASK, '{"queue": "billing"}')
    monitor.wait()
    status = monitor.status()["tasks"]["t"]
    assert len(trips.seen) == 1
    assert (status["active"]["cid"], status["active"]["state"], status["active"]["live_score"]) == \
        ("cid-0", "watching", 1.0)
    assert [(s["cid"], s["state"]) for s in status["previous"]] == [("cid-1", "tripped")]


def test_tolerance_window_and_missing_baselines():
    monitor, trips = _monitor(tolerance=0.25)
    monitor.activate("t", "a", JSON_PROFILE)
    for index in range(10):  # 80 % in format against an evaluated 100 %: within a 0.25 tolerance
        monitor.observe("t", "a", f"a{index}", ASK, "oops" if index % 5 == 4 else '{"queue": "x"}')
    monitor.wait()
    assert trips.seen == []
    assert monitor.status()["tasks"]["t"]["active"]["live_score"] == 0.8

    # The window slides: a late failure is judged against recent answers, not diluted by a good start
    # (over all 13 answers the live score would be 0.77, within a 0.5 tolerance).
    monitor, trips = _monitor(window=5, tolerance=0.5)
    monitor.activate("t", "a", JSON_PROFILE)
    for index in range(10):
        monitor.observe("t", "a", f"good{index}", ASK, '{"queue": "x"}')
    for index in range(3):
        monitor.observe("t", "a", f"bad{index}", ASK, "oops")
    monitor.wait()
    assert [(trip.live_score, trip.observed) for trip in trips.seen] == [(pytest.approx(0.4), 5)]

    # Without the evaluated coverage in the artifact, format checks are counted but judge nothing.
    monitor, trips = _monitor()
    monitor.activate("t", "a", Profile(verifier="json_schema", json_schema=SCHEMA))
    for index in range(10):
        monitor.observe("t", "a", f"n{index}", ASK, "oops")
    monitor.wait()
    active = monitor.status()["tasks"]["t"]["active"]
    assert trips.seen == [] and active["window"] == 0 and active["format_failed"] == 10
    assert active["not_judged_for_lack_of"] == ["accuracy", "coverage"]


def test_feedback_judges_by_accuracy_replaces_itself_and_is_forgotten():
    monitor, trips = _monitor(remember_responses=6, tolerance=0.2)
    monitor.activate("t", "a", JSON_PROFILE)
    for index in range(6):
        monitor.observe("t", "a", f"r{index}", ASK, '{"queue": "x"}')
    recorded = monitor.feedback("r0", good=False)
    assert (recorded["task"], recorded["cid"], recorded["session"]["feedback_bad"]) == ("t", "a", 1)
    # one response judged bad against accuracy 0.9, five in format against coverage 1.0
    assert recorded["session"]["live_score"] == pytest.approx(5 / 6, abs=1e-4)
    assert recorded["session"]["evaluated_score"] == pytest.approx((0.9 + 5 * 1.0) / 6, abs=1e-4)
    again = monitor.feedback("r0", good=True)
    assert (again["session"]["feedback_bad"], again["session"]["feedback_good"]) == (0, 1)
    assert again["session"]["live_score"] == 1.0
    monitor.wait()
    assert trips.seen == []
    for index in range(1, 6):
        monitor.feedback(f"r{index}", good=False)
    monitor.wait()
    assert len(trips.seen) == 1 and trips.seen[0].counts["feedback_good"] == 1
    with pytest.raises(KeyError):
        monitor.feedback("never-served", good=True)
    monitor.observe("t", "a", "r6", ASK, "x")  # one more than it remembers: the oldest is forgotten
    with pytest.raises(KeyError):
        monitor.feedback("r0", good=True)


def test_sampling_is_a_fixed_share_by_response_id():
    ids = [f"chatcmpl-{index}" for index in range(2000)]
    chosen = [i for i in ids if sampled(i, 0.2)]
    assert 0.15 < len(chosen) / len(ids) < 0.25
    assert chosen == [i for i in ids if sampled(i, 0.2)]
    assert all(sampled(i, 1.0) for i in ids) and not any(sampled(i, 0.0) for i in ids)
    monitor, _ = _monitor(sample_share=0.0)
    monitor.activate("t", "a", JSON_PROFILE)
    monitor.observe("t", "a", "r", ASK, "oops")
    active = monitor.status()["tasks"]["t"]["active"]
    assert (active["served"], active["format_checked"], active["window"]) == (1, 0, 0)
    assert monitor.feedback("r", good=True)["cid"] == "a"  # unsampled answers still take feedback


@pytest.mark.parametrize(("profile", "good", "bad"), [
    (Profile(verifier="closed_vocab", labels=["billing", "shipping"]), "billing", "refunds"),
    (Profile(verifier="json_schema", json_schema=SCHEMA), '{"queue": "x"}', '{"queue": 3}'),
    (Profile(verifier="json_schema"), "[1, 2]", "{not json"),
    (Profile(verifier="byte_grounded"), "my parcel", "your refund"),
    (Profile(verifier="text_match"), "anything", "  "),
])
def test_reference_free_checks_are_the_verifiers_coverage(profile, good, bad):
    messages = [{"role": "user", "content": "Where is my parcel?"}]
    assert profile.in_format(messages, good) is True
    assert profile.in_format(messages, bad) is False


def test_profile_reads_the_artifact_and_config_refuses_nonsense():
    manifest = {"verifier": "json_schema", "labels": None,
                "evals": {"candidate": {"k": 0.8, "accuracy": 0.7, "coverage": 0.95}}}
    profile = Profile.from_artifact(manifest, {"recipe_spec": {"json_schema": SCHEMA}})
    assert profile == Profile(verifier="json_schema", json_schema=SCHEMA, evaluated_accuracy=0.7,
                              evaluated_coverage=0.95)
    assert Profile.from_artifact({"verifier": "telepathy"}).verifier is None
    for bad, text in [({"sample_share": 1.5}, "sample share"), ({"tolerance": -0.1}, "tolerance"),
                      ({"min_requests": 0}, "min requests"), ({"min_requests": 60, "window": 50}, "window")]:
        with pytest.raises(MonitorConfigError, match=text):
            MonitorConfig(**bad)


# --- the whole path on the tiny model -----------------------------------------------------------------------


class AlertReceiver:
    """A real HTTP server standing in for the alert webhook; keeps every JSON body it was sent."""

    def __init__(self) -> None:
        received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_task(self, task: str) -> list[dict]:
        return [alert for alert in self.received if alert.get("task") == task]


@dataclass
class World:
    settings: Settings
    url: str
    runtime: object
    alerts: AlertReceiver
    adapters: dict[str, Path]
    base_digest: str
    key: str = ""
    built: dict[tuple[str, str], Path] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    @property
    def store(self) -> CaptureStore:
        return CaptureStore(self.settings.store_url)

    def artifact(self, task: str, name: str, *, k: float, release: str) -> Path:
        """A signed artifact of ``task`` around adapter ``name`` whose evaluation claims A 0.9 and V 1.0; each
        release is another artifact (another CID) around the same weights."""
        key = (task, release)
        if key not in self.built:
            self.built[key] = monitored_artifact(self.settings.home / "incoming" / f"{task}-{release}.kolm",
                                                 adapter_dir=self.adapters[name], keys_dir=self.settings.keys_dir,
                                                 task=task, k=k, base_digest=self.base_digest, salt=release)
        return self.built[key]

    def deploy(self, task: str, name: str, *, k: float, strategy: str = "force", release: str | None = None) -> str:
        artifact = self.artifact(task, name, k=k, release=release or name)
        activation = swap_artifact(self.settings, self.store, artifact, strategy, actor="test")
        wait_until(lambda: self.serving(task) == activation.to_cid, what=f"{task} to serve {name}")
        return activation.to_cid

    def serving(self, task: str) -> str | None:
        return self.runtime.status()["tasks"].get(task, {}).get("cid")

    def pointer(self, task: str) -> str:
        return read_pointer(self.settings.adapters_dir, task).name.removesuffix(".kolm")

    def ask(self, task: str, count: int, stream: bool = False) -> list[tuple[str, str, str]]:
        """``count`` chat completions through the openai SDK, naming no ``max_tokens`` (the task's room, ROOM):
        (completion id, serving CID, answer) each."""
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key)
        from kolm_pipeline.demo.tickets import generate_tickets

        answered = []
        for ticket in generate_tickets(count, seed=len(self.built) + count):
            if stream:
                chunks = list(client.chat.completions.create(model=task, messages=ticket.messages(), stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks).strip()
                answered.append((chunks[0].id, chunks[0].system_fingerprint, text))
                continue
            completion = client.chat.completions.create(model=task, messages=ticket.messages())
            answered.append((completion.id, completion.system_fingerprint, completion.choices[0].message.content))
        return answered

    def feedback(self, body) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/feedback", json=body, timeout=30, headers=self.auth)

    def monitor(self, task: str) -> dict:
        return httpx.get(f"{self.url}/v1/monitor", timeout=30, headers=self.auth).json()["tasks"][task]


def monitored_artifact(output: Path, *, adapter_dir: Path, keys_dir: Path, task: str, k: float, base_digest: str,
                       salt: str, accuracy: float = 0.9, coverage: float = 1.0) -> Path:
    """A ``.kolm`` shaped as the deployment stage builds it for a JSON task, with a full evals block."""
    keyid = ensure_tenant_keys(keys_dir, "acme")
    key = load_private_key(keys_dir, "acme")
    cids = {stage: cid_for_bytes(f"{stage} {task} {salt}".encode()) for stage in ("corpus", "recipe", "adapter")}
    receipts: list[bytes] = []
    for stage, predicate in [("corpus", {"capture_range": [1, 16]}), ("recipe", {"corpus_cid": cids["corpus"]}),
                             ("adapter", {"recipe_cid": cids["recipe"], "trainer_version": "kolm-distill/0.1",
                                          "files": adapter_file_cids(adapter_dir)}),
                             ("evaluation", {"candidate_k": k, "current_k": 0.5})]:
        receipts.append(make_receipt(stage=stage, subject_name=stage,
                                     subject_cid=cids.get(stage, cid_for_bytes(f"evaluation {salt}".encode())),
                                     predicate={"task": task, "tenant": "acme", **predicate},
                                     previous_cid=receipt_cid(receipts[-1]) if receipts else None,
                                     private_key=key, keyid=keyid))
    evals = {"candidate": {"name": "candidate", "k": k, "accuracy": accuracy, "coverage": coverage},
             "current": {"name": "base", "k": 0.5, "accuracy": 0.0, "coverage": 0.1},
             "decision": {"swap": True, "reason": f"swap: K improves by {k - 0.5:+.4f}", "k_floor": 0.3,
                          "k_new": k, "k_current": 0.5, "delta": k - 0.5, "alert": False}}
    manifest = {"task": task, "tenant": "acme", "namespace": task.split(".", 1)[-1],
                "base_model": {"id": "tiny-base", "digest": base_digest}, "lora": {"r": 16},
                "corpus_cid": cids["corpus"], "recipe_cid": cids["recipe"], "adapter_cid": cids["adapter"],
                "trainer_version": "kolm-distill/0.1", "output_kind": "json", "verifier": "json_schema",
                "labels": None, "json_schema": SCHEMA, "evals": evals, "max_new_tokens": ROOM,
                "counters": {"captured": 16, "kept": 16, "discarded": 0, "untriaged": 0}, "parent_cid": None}
    build_kolm(output, manifest=manifest, adapter_dir=adapter_dir, evals={**evals, "recipe_spec": {}},
               receipts=receipts, signer=(key, keyid))
    return output


def _train(tiny_base: Path, models_dir: Path, root: Path) -> dict[str, Path]:
    """Three LoRA adapters trained for real on ticket prompts, each answering every ticket the same way."""
    from kolm_pipeline.demo.tickets import generate_tickets
    from kolm_pipeline.train.base_model import resolve_base_model
    from kolm_pipeline.train.distill import TrainConfig, train_adapter

    base = resolve_base_model(str(tiny_base), models_dir)
    tickets = generate_tickets(16, seed=3)
    trained = {}
    for name, reply in ANSWERS.items():
        rows = [{"messages": [*ticket.messages(), {"role": "assistant", "content": reply}]} for ticket in tickets]
        train = root / f"{name}.jsonl"
        train.write_text("\n".join(json.dumps(row) for row in rows))
        trained[name] = root / name
        train_adapter(train, base, trained[name], TrainConfig(epochs=6, learning_rate=0.03, batch_size=8),
                      show_progress=False)
    return trained


@contextlib.contextmanager
def serving(runtime) -> Iterator[str]:
    """``kolm serve``'s app around ``runtime`` on a real HTTP server; yields its base URL."""
    import uvicorn

    from kolm_pipeline.serve.app import create_serving_app

    server = uvicorn.Server(uvicorn.Config(create_serving_app(runtime), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=60, what="the serving app to start")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    from kolm_pipeline.serve.backends import TransformersBackend
    from kolm_pipeline.serve.runtime import ServingRuntime
    from kolm_pipeline.train.base_model import resolve_base_model

    root = tmp_path_factory.mktemp("live")
    alerts = AlertReceiver()
    with pytest.MonkeyPatch.context() as env:
        for name in ("KOLM_STORE_URL", "KOLM_BASE_MODEL"):
            env.delenv(name, raising=False)
        clean_env(env, KOLM_MLFLOW_URI=shared_mlflow_uri(tmp_path_factory), KOLM_ALERT_WEBHOOK=alerts.url)
        settings = load_settings(root / "home")
        adapters = _train(tiny_base, settings.models_dir, root)
        config = MonitorConfig(sample_share=1.0, min_requests=MIN_REQUESTS, tolerance=0.10, window=50)
        runtime = ServingRuntime(settings, TransformersBackend(str(tiny_base), settings.models_dir),
                                 poll_interval=0.05, grace_seconds=0.3, monitor=config)
        key = CaptureStore(settings.store_url).create_tenant("acme")
        with serving(runtime) as url:
            yield World(settings=settings, url=url, runtime=runtime, alerts=alerts, adapters=adapters,
                        base_digest=resolve_base_model(str(tiny_base), settings.models_dir).digest, key=key)
    alerts.server.shutdown()


def _is_json_answer(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def test_a_degrading_adapter_is_rolled_back_once(world, capsys):
    task = "acme.live-degrade"
    good = world.deploy(task, "good", k=0.80)
    assert all(cid == good and _is_json_answer(text) for _, cid, text in world.ask(task, 3))

    # v2 claims a higher K and passes the gate, but was trained to answer every ticket with text that is not JSON.
    bad = world.deploy(task, "bad", k=0.90, strategy="higher-k-wins")
    served = world.ask(task, MIN_REQUESTS - 2) + world.ask(task, 2, stream=True)
    assert {cid for _, cid, _ in served} == {bad}
    # Held to the task's schema (evaluate/structured.py), it can only start the object; its apology then runs on
    # inside the string until the room the task's evaluation gave an answer is nearly spent, and the object is closed
    # early (finish_reason "length"): the answers parse, but none fitted its room, which the monitor counts as out of
    # format.
    assert all(text.startswith("{") for _, _, text in served)

    alerts = wait_until(lambda: world.alerts.for_task(task), timeout=60, what="the live monitor's alert")
    wait_until(lambda: world.pointer(task) == good and world.serving(task) == good,
               what="the runtime to serve v1 again")
    row = world.store.registry_rows(task)[0]
    assert (row.decision, row.actor, row.from_cid, row.to_cid) == ("rollback", LIVE_MONITOR_ACTOR, bad, good)
    assert (row.k_before, row.k_after) == pytest.approx((0.90, 0.80))
    assert row.details["live_monitor"] == {
        "cid": bad, "live_score": 0.0, "evaluated_score": 1.0, "tolerance": 0.10, "observed": MIN_REQUESTS,
        "counts": {"served": MIN_REQUESTS, "format_checked": MIN_REQUESTS, "format_failed": MIN_REQUESTS,
                   "feedback_good": 0, "feedback_bad": 0}}
    assert row.details["reason"].startswith(f"live score 0.000 over {MIN_REQUESTS} judged responses is below the "
                                            "evaluated score 1.000")
    assert len(alerts) == 1
    assert {key: alerts[0][key] for key in ("kind", "adapter_cid", "action", "rolled_back_to", "registry_row",
                                            "observed", "live_score", "evaluated_score")} == {
        "kind": "kolm.live_regression", "adapter_cid": bad, "action": "rollback", "rolled_back_to": good,
        "registry_row": row.id, "observed": MIN_REQUESTS, "live_score": 0.0, "evaluated_score": 1.0}

    # v1 serves again and is watched afresh; the monitor does not act again.
    after = world.ask(task, MIN_REQUESTS + 2)
    assert {cid for _, cid, _ in after} == {good} and all(_is_json_answer(text) for _, _, text in after)
    status = world.monitor(task)
    assert (status["active"]["cid"], status["active"]["state"], status["active"]["live_score"]) == \
        (good, "watching", 1.0)
    assert status["previous"][0]["cid"] == bad and status["previous"][0]["state"] == "tripped"
    assert status["previous"][0]["outcome"].startswith(f"rolled back {bad} → {good}")

    # Feedback on an answer v2 gave still lands on v2, though it no longer serves.
    response = world.feedback({"id": served[0][0], "rating": -1})
    assert response.status_code == 200
    assert (response.json()["adapter_cid"], response.json()["monitor"]["feedback_bad"]) == (bad, 1)

    # A second replica that condemned the same CID finds the pointer moved on and does nothing.
    with pytest.raises(PointerMoved, match="moved already"):
        rollback(world.settings, world.store, task, actor=LIVE_MONITOR_ACTOR, expected_cid=bad)
    time.sleep(0.3)
    assert len(world.store.registry_rows(task)) == 3 and len(world.alerts.for_task(task)) == 1

    assert main(["--home", str(world.settings.home), "registry", "log", "--task", task]) == 0
    log = capsys.readouterr().out
    assert f"by {LIVE_MONITOR_ACTOR}" in log and "live score 0.000" in log
    assert main(["--home", str(world.settings.home), "registry", "log", "--cid", bad]) == 0
    described = capsys.readouterr().out
    assert f"rollback  {bad} → {good}" in described and "live score 0.000" in described


def test_a_healthy_adapter_is_not_rolled_back(world):
    task = "acme.live-healthy"
    world.deploy(task, "good", k=0.80)
    healthy = world.deploy(task, "good", k=0.85, strategy="higher-k-wins", release="good-v3")
    served = world.ask(task, 2 * MIN_REQUESTS)
    assert all(cid == healthy and _is_json_answer(text) for _, cid, text in served)
    for index, (completion_id, _, _) in enumerate(served[:MIN_REQUESTS]):
        body = {"id": completion_id, "rating": 1} if index % 2 else {"id": completion_id, "correct": True}
        assert world.feedback(body).status_code == 200
    time.sleep(0.5)  # several watcher polls: nothing moves
    assert world.pointer(task) == healthy == world.serving(task)
    assert world.store.registry_rows(task)[0].decision == "swap"
    assert world.alerts.for_task(task) == []
    active = world.monitor(task)["active"]
    assert (active["state"], active["live_score"], active["feedback_good"], active["window"]) == \
        ("watching", 1.0, MIN_REQUESTS, 2 * MIN_REQUESTS)
    assert active["evaluated_score"] == pytest.approx((MIN_REQUESTS * 0.9 + MIN_REQUESTS * 1.0) / (2 * MIN_REQUESTS))


def test_answers_cut_to_a_clients_own_max_tokens_are_not_held_against_the_adapter(world):
    """Only an answer that ran out of the task's own room counts against the adapter: one cut to the ``max_tokens``
    a client asked for (closed early, or cut mid-object when the limit is smaller than the object's forced text) is
    not format-checked at all, or a client could trip a rollback."""
    import openai

    task = "acme.live-client-room"
    world.deploy(task, "good", k=0.80)
    client = openai.OpenAI(base_url=f"{world.url}/v1", api_key=world.key)
    from kolm_pipeline.demo.tickets import generate_tickets

    texts = []
    for index, ticket in enumerate(generate_tickets(2 * MIN_REQUESTS, seed=99)):
        # 10 tokens hold the object's forced text and the little model's wandering whitespace, closed early (with 6,
        # whether one closes depended on the tickets' wording); 2 hold no object.
        completion = client.chat.completions.create(model=task, messages=ticket.messages(),
                                                    max_tokens=10 if index % 2 else 2)
        assert completion.choices[0].finish_reason == "length"
        texts.append(completion.choices[0].message.content)
    assert any(_is_json_answer(text) for text in texts[1::2])  # closed early to fit
    assert not any(_is_json_answer(text) for text in texts[0::2])  # cut: 2 tokens cannot hold the object
    time.sleep(0.3)
    active = world.monitor(task)["active"]
    assert (active["state"], active["served"], active["format_checked"], active["format_failed"]) == \
        ("watching", 2 * MIN_REQUESTS, 0, 0)
    assert world.pointer(task) == world.serving(task)


def test_bad_feedback_trips_it_and_a_condemned_version_is_never_restored(world):
    task = "acme.live-feedback"
    good = world.deploy(task, "good", k=0.80)
    bad = world.deploy(task, "bad", k=0.90, strategy="higher-k-wins")
    world.ask(task, MIN_REQUESTS)
    wait_until(lambda: world.alerts.for_task(task), timeout=60, what="the first rollback and its alert")
    wait_until(lambda: world.serving(task) == good, what="the runtime to serve v1 again")
    assert [row.decision for row in world.store.registry_rows(task)] == ["rollback", "swap", "swap"]

    # An operator puts the condemned v2 back, then v3 over it: the only way back now is the condemned v2.
    assert world.deploy(task, "bad", k=0.90) == bad
    third = world.deploy(task, "good", k=0.85, release="good-v3")
    for _ in range(MIN_REQUESTS):  # valid JSON every time, but the people who read it say it is wrong
        ((completion_id, cid, text),) = world.ask(task, 1)
        assert cid == third and _is_json_answer(text)
        assert world.feedback({"id": completion_id, "correct": False}).status_code == 200
    alerts = wait_until(lambda: len(world.alerts.for_task(task)) == 2 and world.alerts.for_task(task),
                        what="the second alert")
    rows = world.store.registry_rows(task)
    assert [row.decision for row in rows] == ["alert", "swap", "swap", "rollback", "swap", "swap"]
    row = rows[0]
    assert (row.decision, row.actor, row.from_cid, row.to_cid) == ("alert", LIVE_MONITOR_ACTOR, third, None)
    assert "was itself taken out of service by the live monitor" in row.details["reason"]
    # it tripped at the 8th answer, before its feedback: 7 rated bad, 1 in format, against A 0.9 and V 1.0
    assert row.details["live_monitor"]["counts"]["feedback_bad"] == MIN_REQUESTS - 1
    assert row.details["live_monitor"]["live_score"] == pytest.approx(1 / MIN_REQUESTS, abs=1e-4)
    assert (alerts[1]["action"], alerts[1]["adapter_cid"], alerts[1]["rolled_back_to"]) == ("none", third, None)
    time.sleep(0.3)
    assert world.pointer(task) == third == world.serving(task)
    assert world.monitor(task)["active"]["outcome"].startswith("not rolled back")


@pytest.mark.parametrize(("body", "status", "text"), [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 422, "JSON object"),
    ({"rating": 1}, 422, "`id`"),
    ({"id": "chatcmpl-x"}, 422, "exactly one of"),
    ({"id": "chatcmpl-x", "rating": 1, "correct": True}, 422, "exactly one of"),
    ({"id": "chatcmpl-x", "rating": 2}, 422, "`rating` must be 1"),
    ({"id": "chatcmpl-x", "rating": True}, 422, "`rating` must be 1"),
    ({"id": "chatcmpl-x", "correct": "yes"}, 422, "`correct` must be true or false"),
    ({"id": "chatcmpl-never-served", "rating": 1}, 404, "no served response 'chatcmpl-never-served'"),
])
def test_feedback_refuses_bad_bodies_and_unknown_ids(world, body, status, text):
    if isinstance(body, bytes):
        response = httpx.post(f"{world.url}/v1/feedback", content=body, timeout=30,
                              headers={"content-type": "application/json", **world.auth})
    else:
        response = world.feedback(body)
    assert response.status_code == status
    assert text in response.json()["error"]["message"]


def test_with_monitoring_off_feedback_is_refused_clearly(tiny_base, tmp_path):
    from kolm_pipeline.serve.backends import TransformersBackend
    from kolm_pipeline.serve.runtime import ServingRuntime

    settings = load_settings(tmp_path / "home")
    runtime = ServingRuntime(settings, TransformersBackend(str(tiny_base), settings.models_dir),
                             monitor=MonitorConfig(enabled=False))
    auth = {"authorization": f"Bearer {CaptureStore(settings.store_url).create_tenant('acme')}"}
    with serving(runtime) as url:
        assert httpx.get(f"{url}/v1/monitor", timeout=30, headers=auth).json() == {"enabled": False, "tasks": {}}
        response = httpx.post(f"{url}/v1/feedback", json={"id": "chatcmpl-x", "rating": 1}, timeout=30,
                              headers=auth)
        assert response.status_code == 503
        assert "live monitoring is off" in response.json()["error"]["message"]
