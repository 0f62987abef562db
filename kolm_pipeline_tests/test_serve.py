"""The serving runtime on a tiny random-weight model behind a real HTTP server: OpenAI-compatible chat
completions (streaming and not, through the `openai` SDK), background hot swap with in-flight requests
finishing on the old adapter, constrained decoding for closed-vocabulary tasks, and refusals."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from kolm_pipeline.registry import read_kolm, swap_pointer
from kolm_pipeline.registry.swap import publish_artifact
from kolm_pipeline.serve.app import create_serving_app
from kolm_pipeline.serve.backends import TransformersBackend
from kolm_pipeline.serve.runtime import ServingRuntime, adapter_name
from kolm_pipeline.settings import Settings, load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_registry_support import LABELS, free_port, real_adapter, signed_artifact, wait_until

GRACE = 0.3
PROMPT = [{"role": "user", "content": "My parcel never arrived, where is it?"}]


@dataclass
class World:
    settings: Settings
    artifacts: dict[str, Path]
    runtime: ServingRuntime
    url: str
    key: str = ""

    @functools.cached_property
    def http(self) -> httpx.Client:
        """HTTP with the tenant's kolm key, as a client of `kolm serve` sends it."""
        return httpx.Client(headers={"authorization": f"Bearer {self.key}"})

    def point(self, task: str, name: str) -> str:
        """Swap ``task``'s pointer to artifact ``name`` exactly as a deployment does; returns its CID."""
        published = publish_artifact(self.settings.artifacts_dir, task, self.artifacts[name])
        swap_pointer(self.settings.adapters_dir, task, published)
        return published.stem

    def serving(self, task: str) -> str | None:
        return self.runtime.status()["tasks"].get(task, {}).get("cid")


def _tampered(source: Path, dest: Path) -> Path:
    """The same archive with one byte of the adapter weights changed, repacked canonically."""
    files = dict(read_kolm(source).files)
    weights = bytearray(files["adapter/adapter_model.safetensors"])
    weights[-5] ^= 0x20
    files["adapter/adapter_model.safetensors"] = bytes(weights)
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))
    return dest


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    import uvicorn

    from kolm_pipeline.train.base_model import resolve_base_model

    root = tmp_path_factory.mktemp("serve")
    settings = load_settings(root / "home")
    digest = resolve_base_model(str(tiny_base), settings.models_dir).digest
    build = root / "build"
    artifacts = {}
    for name, task, seed, labels in [("chat-a", "acme.chat", 1, None), ("chat-b", "acme.chat", 2, None),
                                     ("labels", "acme.labels", 3, LABELS), ("other-base", "acme.base", 4, None),
                                     ("labels-2", "acme.labels", 5, LABELS), ("labels-3", "acme.labels", 6, LABELS),
                                     ("room", "acme.room", 7, None)]:
        adapter = real_adapter(tiny_base, build / name, seed=seed)
        artifacts[name] = signed_artifact(build / f"{name}.kolm", adapter_dir=adapter, keys_dir=settings.keys_dir,
                                          task=task, labels=labels, salt=name,
                                          max_new_tokens=ROOM if name == "room" else None,
                                          base_digest="f" * 64 if name == "other-base" else digest)
    artifacts["tampered"] = _tampered(artifacts["chat-b"], build / "tampered.kolm")
    key = CaptureStore(settings.store_url).create_tenant("acme")
    world = World(settings, artifacts, runtime=None, url="", key=key)  # type: ignore[arg-type]
    world.point("acme.chat", "chat-a")
    world.point("acme.labels", "labels")

    # float32: these tests compare answers exactly across batches and adapter switches, which bfloat16's rounding
    # (KOLM_INFERENCE_DTYPE's default on a CPU with bf16 matmuls) may flip at a near-tie.
    backend = TransformersBackend(str(tiny_base), settings.models_dir, dtype="float32")
    runtime = ServingRuntime(settings, backend, poll_interval=0.05, grace_seconds=GRACE)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_serving_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=60, what="the serving app to start")
    world.runtime, world.url = runtime, f"http://127.0.0.1:{port}"
    yield world
    server.should_exit = True
    thread.join(timeout=30)


ROOM = 7  # the "room" artifact's max_new_tokens


def _chat(world: World, task: str, **extra) -> httpx.Response:
    return world.http.post(f"{world.url}/v1/chat/completions", timeout=60,
                      json={"model": task, "messages": PROMPT, "max_tokens": 12, **extra})


def test_openai_sdk_streaming_and_not(world):
    import openai

    client = openai.OpenAI(base_url=f"{world.url}/v1", api_key=world.key)
    cid = world.serving("acme.chat")
    raw = client.chat.completions.with_raw_response.create(model="acme.chat", messages=PROMPT, max_tokens=12)
    completion = raw.parse()
    assert raw.headers["x-kolm-adapter-cid"] == cid == completion.system_fingerprint
    text = completion.choices[0].message.content
    assert text and completion.model == "acme.chat"

    stream = client.chat.completions.create(model="acme.chat", messages=PROMPT, max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason == "length"  # 12 tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == text
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # streamed piece by piece

    models = client.models.list()
    assert {"acme.chat", "acme.labels"} <= {model.id for model in models.data}


def test_a_request_naming_no_max_tokens_gets_the_room_its_evaluation_gave(world):
    """Without max_tokens an answer gets the manifest's max_new_tokens (the room evaluation gave it: a JSON answer
    is not cut off at a server-wide 128 tokens it was never evaluated under), else 128; an answer cut off there
    finishes with `length`, as OpenAI's do."""
    import openai

    client = openai.OpenAI(base_url=f"{world.url}/v1", api_key=world.key)
    world.point("acme.room", "room")
    wait_until(lambda: world.serving("acme.room") is not None, timeout=60, what="acme.room to load")
    cut = client.chat.completions.create(model="acme.room", messages=PROMPT)
    assert cut.usage.completion_tokens == ROOM and cut.choices[0].finish_reason == "length"  # random weights
    streamed = list(client.chat.completions.create(model="acme.room", messages=PROMPT, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in streamed).strip() == cut.choices[0].message.content
    named = client.chat.completions.create(model="acme.room", messages=PROMPT, max_tokens=ROOM + 3)
    assert named.usage.completion_tokens == ROOM + 3 and named.choices[0].finish_reason == "length"
    labelled = client.chat.completions.create(model="acme.labels", messages=PROMPT)
    assert labelled.choices[0].finish_reason == "stop"


def test_usage_is_counted_and_streamed_when_asked(world):
    """Issue 22: `kolm serve` answered `usage: null`. Counted by the base model's tokenizer; streamed in a last
    chunk without choices when `stream_options.include_usage` asks, as OpenAI streams it."""
    import openai

    client = openai.OpenAI(base_url=f"{world.url}/v1", api_key=world.key)
    backend = world.runtime.backend
    completion = client.chat.completions.create(model="acme.chat", messages=PROMPT, max_tokens=12)
    usage = completion.usage
    assert usage is not None and 0 < usage.completion_tokens <= 12
    assert usage.prompt_tokens == backend.count_tokens(PROMPT, "")["prompt_tokens"] > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(client.chat.completions.create(model="acme.chat", messages=PROMPT, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == usage  # the same answer, so the same counts
    assert all(chunk.usage is None for chunk in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    plain = list(client.chat.completions.create(model="acme.chat", messages=PROMPT, max_tokens=12, stream=True))
    assert all(chunk.choices and chunk.usage is None for chunk in plain)

    # A closed vocabulary answers with one label: its tokens are the completion.
    labelled = client.chat.completions.create(model="acme.labels", messages=PROMPT)
    label = labelled.choices[0].message.content
    assert labelled.usage.completion_tokens == backend.count_tokens(PROMPT, label)["completion_tokens"] >= 1
    streamed = list(client.chat.completions.create(model="acme.labels", messages=PROMPT, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[-1].choices == [] and streamed[-1].usage == labelled.usage

    bad = world.http.post(f"{world.url}/v1/chat/completions", timeout=30, json={
        "model": "acme.chat", "messages": PROMPT, "stream": True, "stream_options": {"include_usage": "yes"}})
    assert bad.status_code == 400 and "`stream_options`" in bad.json()["error"]["message"]


def test_an_unknown_task_answers_404_listing_the_callers_tasks(world):
    """Issue 22: the 404 for an unknown task did not say which tasks there are; it lists the caller tenant's."""
    import openai

    client = openai.OpenAI(base_url=f"{world.url}/v1", api_key=world.key)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="acme.nosuch", messages=PROMPT)
    error = raised.value.body
    own = sorted(task for task, info in world.runtime.status()["tasks"].items() if info["tenant"] == "acme")
    assert {"acme.chat", "acme.labels"} <= set(own)
    assert error["message"] == f"no adapter is deployed for task 'acme.nosuch'; your tasks: {', '.join(own)}"
    assert (error["code"], error["param"], error["available_tasks"]) == ("model_not_found", "model", own)


def test_live_monitor_is_on_by_default_and_takes_feedback(world):
    response = _chat(world, "acme.chat")
    cid = response.headers["x-kolm-adapter-cid"]
    active = world.http.get(f"{world.url}/v1/monitor", timeout=30).json()["tasks"]["acme.chat"]["active"]
    assert (active["cid"], active["verifier"], active["state"]) == (cid, "text_match", "watching")
    assert active["served"] >= 1
    assert active["not_judged_for_lack_of"] == ["accuracy", "coverage"]  # these test artifacts record only K
    feedback = world.http.post(f"{world.url}/v1/feedback", json={"id": response.json()["id"], "rating": 1},
                               timeout=30)
    assert feedback.status_code == 200
    assert (feedback.json()["adapter_cid"], feedback.json()["monitor"]["feedback_good"]) == (cid, 1)


def test_closed_vocabulary_decodes_to_a_label(world):
    for content in ("I was charged twice", "The app crashes on start", "Where is my order?", "hello"):
        response = world.http.post(f"{world.url}/v1/chat/completions", timeout=60, json={
            "model": "acme.labels", "messages": [{"role": "user", "content": content}]})
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] in LABELS


def test_concurrent_label_requests_get_the_answers_they_get_alone(world):
    """Waiting label requests are scored as one batch; batching must not change anyone's answer."""
    from concurrent.futures import ThreadPoolExecutor

    contents = [f"ticket {index}: {text}" for index, text in enumerate(
        ["charged twice", "app crashes", "parcel lost", "cannot log in", "refund please", "slow dashboard",
         "wrong address", "invoice wrong"])]

    def ask(content: str) -> str:
        response = world.http.post(f"{world.url}/v1/chat/completions", timeout=60, json={
            "model": "acme.labels", "messages": [{"role": "user", "content": content}]})
        return response.json()["choices"][0]["message"]["content"]

    alone = [ask(content) for content in contents]
    with ThreadPoolExecutor(len(contents)) as pool:
        together = list(pool.map(ask, contents * 3))
    assert together == alone * 3


@pytest.mark.parametrize(("body", "status", "text"), [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "acme.chat"}, 400, "`messages` must be a non-empty list"),
    ({"model": "acme.chat", "messages": [{"role": "user"}]}, 400, "messages[0]"),
    ({"model": "acme.chat", "messages": PROMPT, "max_tokens": 0}, 400, "`max_tokens`"),
    ({"model": "acme.chat", "messages": PROMPT, "stream": "yes"}, 400, "`stream`"),
    ({"model": "acme.nosuch", "messages": PROMPT}, 404, "no adapter is deployed for task 'acme.nosuch'"),
])
def test_bad_requests_get_clear_errors(world, body, status, text):
    if isinstance(body, bytes):
        response = world.http.post(f"{world.url}/v1/chat/completions", content=body, timeout=30,
                              headers={"content-type": "application/json"})
    else:
        response = world.http.post(f"{world.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    assert text in response.json()["error"]["message"]


def test_swap_in_background_in_flight_finishes_on_old_adapter(world):
    runtime, backend = world.runtime, world.runtime.backend
    old_cid = world.serving("acme.chat")
    expected_old = _chat(world, "acme.chat", max_tokens=24).json()["choices"][0]["message"]["content"]

    # A request in flight on the old adapter: it has produced part of its answer when the pointer moves.
    lease = runtime.acquire("acme.chat")
    assert lease.cid == old_cid
    pieces = backend.stream(lease.name, PROMPT, lease.labels, 24)
    head = [next(pieces), next(pieces)]

    new_cid = world.point("acme.chat", "chat-b")
    wait_until(lambda: world.serving("acme.chat") == new_cid, what="the watcher to flip acme.chat")
    response = _chat(world, "acme.chat", max_tokens=24)
    assert response.headers["x-kolm-adapter-cid"] == new_cid
    expected_new = response.json()["choices"][0]["message"]["content"]
    assert expected_new != expected_old

    # Past the grace period the old adapter stays loaded while the request holds it, and it finishes there.
    threading.Event().wait(GRACE * 3)
    assert adapter_name(old_cid) in backend.loaded()
    assert "".join([*head, *pieces]).strip() == expected_old
    runtime.release(lease)
    wait_until(lambda: adapter_name(old_cid) not in backend.loaded(), what="the old adapter to be unloaded")
    assert backend.loaded().count(adapter_name(new_cid)) == 1


def test_answers_do_not_change_while_other_adapters_load_and_switch(world):
    """Loading runs beside live forward passes (see TransformersBackend); it must never change an answer."""
    expected = _chat(world, "acme.chat", max_tokens=16).json()["choices"][0]["message"]["content"]
    chat_answers: list[str] = []
    label_answers: list[str] = []
    stop = threading.Event()

    def chat() -> None:
        while not stop.is_set():
            chat_answers.append(_chat(world, "acme.chat", max_tokens=16).json()["choices"][0]["message"]["content"])

    def labels() -> None:
        while not stop.is_set():
            label_answers.append(_chat(world, "acme.labels").json()["choices"][0]["message"]["content"])

    clients = [threading.Thread(target=chat), threading.Thread(target=chat), threading.Thread(target=labels)]
    for client in clients:
        client.start()
    try:
        for name in ("labels-2", "labels-3", "labels") * 2:
            cid = world.point("acme.labels", name)
            wait_until(lambda cid=cid: world.serving("acme.labels") == cid, what=f"acme.labels to serve {name}")
            threading.Event().wait(GRACE * 1.5)  # the replaced adapter unloads, so the next flip loads afresh
        wait_until(lambda: len(chat_answers) >= 6, what="a few answers")
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert set(chat_answers) == {expected}
    assert label_answers and set(label_answers) <= set(LABELS)


def test_tampered_or_foreign_artifacts_are_refused_and_the_old_one_keeps_serving(world):
    serving = world.serving("acme.chat")
    tampered = world.settings.artifacts_dir / "acme.chat" / "tampered-copy.kolm"
    tampered.write_bytes(world.artifacts["tampered"].read_bytes())
    swap_pointer(world.settings.adapters_dir, "acme.chat", tampered)
    reason = wait_until(lambda: world.runtime.status()["refused"].get("acme.chat"), what="the refusal")["reason"]
    assert "adapter/adapter_model.safetensors: content does not match its CID in the manifest" in reason
    response = _chat(world, "acme.chat")
    assert response.status_code == 200 and response.headers["x-kolm-adapter-cid"] == serving

    # A task whose only artifact was trained on another base model is refused with that reason.
    world.point("acme.base", "other-base")
    wait_until(lambda: world.runtime.status()["refused"].get("acme.base"), what="the base-model refusal")
    response = _chat(world, "acme.base")
    assert response.status_code == 404
    assert "trained on base tiny-base" in response.json()["error"]["message"]


def test_removed_pointer_drains_and_the_last_adapter_unloads_to_the_bare_base(tiny_base, tmp_path):
    settings = load_settings(tmp_path / "home")
    source = signed_artifact(tmp_path / "only.kolm", adapter_dir=real_adapter(tiny_base, tmp_path / "ad", seed=9),
                             keys_dir=settings.keys_dir, task="acme.only", base_digest="")
    swap_pointer(settings.adapters_dir, "acme.only", publish_artifact(settings.artifacts_dir, "acme.only", source))
    runtime = ServingRuntime(settings, TransformersBackend(str(tiny_base), settings.models_dir), grace_seconds=0)
    runtime.start()
    try:
        cid = runtime.status()["tasks"]["acme.only"]["cid"]
        assert runtime.backend.loaded() == [adapter_name(cid)]
        (settings.adapters_dir / "acme.only").unlink()
        runtime.sync()
        runtime.sync()
        assert runtime.status()["tasks"] == {} and runtime.backend.loaded() == []
        with pytest.raises(Exception, match="no adapter is deployed for task 'acme.only'"):
            runtime.acquire("acme.only")
        swap_pointer(settings.adapters_dir, "acme.only", settings.artifacts_dir / "acme.only" / f"{cid}.kolm")
        runtime.sync()
        with runtime.lease("acme.only") as adapter:
            assert "".join(runtime.backend.stream(adapter.name, PROMPT, None, 4))
    finally:
        runtime.stop()


def test_serving_needs_a_tenant_key_and_shows_each_tenant_only_its_own_tasks(world):
    """Issue 19, item 1: unauthenticated calls and feedback made the live monitor roll a task back, and
    `/v1/monitor`, `/v1/models` and `/healthz` listed every tenant's tasks."""
    anonymous = httpx.Client()
    for method, path, body in [("POST", "/v1/chat/completions", {"model": "acme.chat", "messages": PROMPT}),
                               ("GET", "/v1/models", None), ("GET", "/v1/monitor", None),
                               ("POST", "/v1/feedback", {"id": "chatcmpl-x", "rating": -1})]:
        for headers in ({}, {"authorization": "Bearer kolm-not-a-key"}):
            response = anonymous.request(method, f"{world.url}{path}", json=body, headers=headers, timeout=30)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    health = anonymous.get(f"{world.url}/healthz", timeout=30).json()
    assert health["ok"] and "acme" not in json.dumps(health)
    assert health["runs_on"] == f"{'cuda' if torch.cuda.is_available() else 'cpu'} float32"  # the world's dtype
    # On a CPU decoding passes leave a core to HTTP (docs/benchmarks.md, session 22); on a GPU torch's choice.
    assert health["threads"] == (world.runtime.backend._all_threads if torch.cuda.is_available()
                                 else max(1, len(os.sched_getaffinity(0)) - 1))

    mallory_key = CaptureStore(world.settings.store_url).create_tenant("mallory")
    mallory = httpx.Client(headers={"authorization": f"Bearer {mallory_key}"})
    assert mallory.get(f"{world.url}/v1/models", timeout=30).json()["data"] == []
    assert mallory.get(f"{world.url}/v1/monitor", timeout=30).json()["tasks"] == {}
    refused = mallory.post(f"{world.url}/v1/chat/completions", timeout=30,
                           json={"model": "acme.chat", "messages": PROMPT, "max_tokens": 4})
    assert refused.status_code == 404
    assert refused.json()["error"]["message"] == ("no adapter is deployed for task 'acme.chat'; no task is deployed "
                                                  "for your tenant yet")
    assert refused.json()["error"]["available_tasks"] == []  # never another tenant's

    served = _chat(world, "acme.chat")
    completion_id = served.json()["id"]
    foreign = mallory.post(f"{world.url}/v1/feedback", json={"id": completion_id, "rating": -1}, timeout=30)
    assert foreign.status_code == 404  # as for an id never served: a caller cannot probe for ids
    before = world.http.get(f"{world.url}/v1/monitor", timeout=30).json()["tasks"]["acme.chat"]["active"]
    for _ in range(3):  # one verdict per completion: the same key's later verdicts replace it
        assert world.http.post(f"{world.url}/v1/feedback", json={"id": completion_id, "rating": -1},
                               timeout=30).status_code == 200
    after = world.http.get(f"{world.url}/v1/monitor", timeout=30).json()["tasks"]["acme.chat"]["active"]
    assert after["feedback_bad"] == before["feedback_bad"] + 1


def test_big_bodies_and_prompts_past_the_context_are_refused_before_any_work(world):
    """Issue 19, item 7: a 200 MiB body was read whole and a 9k-token prompt held the model for 58 s."""
    big = b'{"model": "acme.chat", "messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}'
    response = world.http.post(f"{world.url}/v1/chat/completions", content=big, timeout=60,
                               headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over 4194304 bytes" in response.json()["error"]["message"]

    long = [{"role": "user", "content": "where is my parcel " * 400}]  # the tiny base has 512 positions
    response = world.http.post(f"{world.url}/v1/chat/completions", timeout=60,
                               json={"model": "acme.chat", "messages": long, "max_tokens": 8})
    assert response.status_code == 400
    assert "over the model's context of 512 tokens" in response.json()["error"]["message"]
    assert _chat(world, "acme.chat").status_code == 200  # and the next request is answered as usual
