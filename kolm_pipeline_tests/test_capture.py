"""The capture proxy end to end: official SDKs → proxy (BackgroundServer) → stand-in teacher."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psycopg
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from psycopg import sql

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture.forward import new_request_id
from kolm_pipeline.capture_server import create_app
from kolm_pipeline.demo.teacher import approx_tokens, create_teacher_app
from kolm_pipeline.settings import CaptureConfig, load_settings
from kolm_pipeline.store import Capture, CaptureStore

ANSWERS = {
    "I was charged twice": "fin-ops",
    "Where is my parcel?": "logistics, the parcel is on its way to you",
}
CANARY = "sk-canary-7f3e9b1c5d2a4e6f8a0b"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_DUMP = shutil.which("pg_dump") or "/usr/lib/postgresql/15/bin/pg_dump"
SERVER_LOGGERS = [
    "kolm_pipeline",
    "uvicorn",
    "httpx",
    "httpcore",
    "aiohttp",
    "fastapi",
    "starlette",
    "sqlalchemy.engine",
]


@dataclasses.dataclass
class Proxy:
    url: str
    store: CaptureStore
    key: str
    app: FastAPI
    home: Path

    def flush(self) -> None:
        self.app.state.recorder.flush_threadsafe()

    def captures(self) -> list[Capture]:
        self.flush()
        return self.store.list_captures("acme")[::-1]

    def headers(self, namespace: str = "support", **extra: str) -> dict[str, str]:
        return {"x-kolm-namespace": namespace, "x-upstream-api-key": CANARY, **extra}

    def openai(self, key: str | None = None, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1/capture/openai",
            api_key=key or self.key,
            default_headers=self.headers(**headers),
            max_retries=0,
        )

    def anthropic(self, **headers: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=f"{self.url}/v1/capture/anthropic",
            api_key=self.key,
            default_headers=self.headers(**headers),
            max_retries=0,
        )


@pytest.fixture(scope="module")
def teacher() -> Iterator[str]:
    with BackgroundServer(create_teacher_app(ANSWERS)) as server:
        yield server.url


@pytest.fixture(scope="module")
def slow_teacher() -> Iterator[str]:
    with BackgroundServer(create_teacher_app(ANSWERS, latency_s=0.3)) as server:
        yield server.url


@pytest.fixture(scope="module")
def broken_upstream() -> Iterator[str]:
    """An upstream that fails the way real ones do, echoing the caller's key back in its error bodies."""
    app = FastAPI()

    async def reply(request: Request, key: str, cut_off: list[bytes]) -> Any:
        body = await request.json()
        mode = body["messages"][-1]["content"]
        if mode == "401":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, status_code=401)
        if mode == "500":
            return JSONResponse({"error": {"message": f"internal error for key {key}"}}, status_code=500)
        if mode == "429":
            return JSONResponse(
                {"error": {"message": f"rate limited: {key}"}}, status_code=429, headers={"retry-after": "7"}
            )
        if mode == "echo-stream":
            # A stream that spells the caller's key out, split across chunks at an awkward place.
            half = len(key) // 2
            chunk = '{"choices": [{"index": 0, "delta": {"content": "your key is %s"}}]}'

            async def echo() -> AsyncIterator[bytes]:
                text = f"data: {chunk % key}\n\ndata: [DONE]\n\n".encode()
                cut = text.index(key.encode()) + half
                yield text[:cut]
                yield text[cut:]

            return StreamingResponse(echo(), media_type="text/event-stream")

        async def events() -> AsyncIterator[bytes]:
            for event in cut_off:
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        key = request.headers["authorization"].removeprefix("Bearer ")
        return await reply(request, key, [b'data: {"choices": [{"index": 0, "delta": {"content": "half an"}}]}\n\n'])

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        start = {
            "type": "message_start",
            "message": {
                "id": "m",
                "type": "message",
                "role": "assistant",
                "model": "m",
                "content": [],
                "usage": {"input_tokens": 1, "output_tokens": 1},
            },
        }
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "half an"},
        }
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        events = [f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in (start, block, delta)]
        return await reply(request, request.headers["x-api-key"], events)

    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    servers: list[tuple[BackgroundServer, CaptureStore]] = []

    def start(upstream: str, store_url: str | None = None, config: CaptureConfig | None = None) -> Proxy:
        home = tmp_path / f"home{len(servers)}"
        settings = load_settings(home).model_copy(
            update={"upstream_openai": f"{upstream}/v1", "upstream_anthropic": upstream, "retention_days": 30}
        )
        store = CaptureStore(store_url or settings.store_url)
        key = store.create_tenant("acme")
        app = create_app(settings, store, config or CaptureConfig(retention_sweep_s=0, replay_interval_s=0.2))
        server = BackgroundServer(app)
        servers.append((server, store))
        return Proxy(server.url, store, key, app, home)

    yield start
    for server, store in servers:
        server.stop()
        store.close()


@pytest.fixture
def proxy(start_proxy: Callable[[str], Proxy], teacher: str) -> Proxy:
    return start_proxy(teacher)


def test_openai_plain_is_recorded(proxy: Proxy) -> None:
    client = proxy.openai(**{"x-kolm-tags": "gold, web,gold"})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[
            {"role": "system", "content": "Route it."},
            {"role": "user", "content": "I was charged twice"},
        ],
    )
    assert raw.parse().choices[0].message.content == "fin-ops"
    [row] = proxy.captures()
    assert row.request_id == raw.headers["x-kolm-capture-id"]
    assert (row.tenant, row.namespace, row.provider, row.model) == ("acme", "support", "openai", "gpt-4o")
    assert row.messages[1] == {"role": "user", "content": "I was charged twice"}
    assert (row.output_text, row.status, row.http_status, row.streamed) == ("fin-ops", "ok", 200, False)
    assert (row.prompt_tokens, row.completion_tokens) == (approx_tokens("Route it. I was charged twice"), 1)
    assert row.tags == ["gold", "web"] and row.latency_us > 0 and row.triage_state == "untriaged"


def test_request_ids_are_uuid7_in_the_order_they_were_made() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_request_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(value) for value in ids]
    assert all(len(value) == 32 and u.hex == value for value, u in zip(ids, parsed, strict=True))
    assert {u.version for u in parsed} == {7} and {u.variant for u in parsed} == {uuid.RFC_4122}
    assert all(before <= u.int >> 80 <= after for u in parsed)
    assert len(set(ids)) == len(ids)
    stamps = [u.int >> 80 for u in parsed]
    assert stamps == sorted(stamps)
    random.seed(7)  # another library seeding the global generator must not make ids repeat
    first = new_request_id()
    random.seed(7)
    assert new_request_id()[13:] != first[13:]


def test_openai_stream_is_recorded(proxy: Proxy) -> None:
    stream = proxy.openai().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Where is my parcel?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == ANSWERS["Where is my parcel?"]
    [row] = proxy.captures()
    assert (row.output_text, row.status, row.streamed, row.model) == (
        ANSWERS["Where is my parcel?"],
        "ok",
        True,
        "gpt-4o-mini",
    )
    assert row.completion_tokens == approx_tokens(ANSWERS["Where is my parcel?"])
    assert row.prompt_tokens == approx_tokens("Where is my parcel?")


def test_anthropic_plain_is_recorded(proxy: Proxy) -> None:
    message = proxy.anthropic().messages.create(
        model="claude-sonnet-4",
        max_tokens=64,
        system="Route the ticket.",
        messages=[{"role": "user", "content": "I was charged twice"}],
    )
    assert message.content[0].text == "fin-ops"
    [row] = proxy.captures()
    assert row.provider == "anthropic" and row.model == "claude-sonnet-4"
    assert row.messages == [
        {"role": "system", "content": "Route the ticket."},
        {"role": "user", "content": "I was charged twice"},
    ]
    assert (row.output_text, row.status, row.streamed) == ("fin-ops", "ok", False)
    assert (row.prompt_tokens, row.completion_tokens) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
    )


def test_anthropic_stream_is_recorded(proxy: Proxy) -> None:
    client = proxy.anthropic()
    request = {
        "model": "claude-haiku-4",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Where is my parcel?"}],
    }
    with client.messages.stream(**request) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    events = list(client.messages.create(**request, stream=True))
    assert text == ANSWERS["Where is my parcel?"]
    assert [e.type for e in events][-1] == "message_stop"
    rows = proxy.captures()
    assert [(r.provider, r.streamed, r.status, r.output_text) for r in rows] == [
        ("anthropic", True, "ok", text),
        ("anthropic", True, "ok", text),
    ]
    assert rows[0].completion_tokens == final.usage.output_tokens
    assert rows[0].prompt_tokens == final.usage.input_tokens


def test_first_chunk_arrives_before_upstream_finishes(start_proxy: Callable[[str], Proxy], slow_teacher: str) -> None:
    proxy = start_proxy(slow_teacher)
    start = time.monotonic()
    arrivals = []
    for chunk in proxy.openai().chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Where is my parcel?"}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    # The teacher waits 0.3 s before each of its four pieces: the first must not wait for the last.
    assert arrivals[-1] - arrivals[0] > 0.6
    [row] = proxy.captures()
    assert row.status == "ok" and row.latency_us >= 1_100_000


def test_client_disconnect_records_incomplete(start_proxy: Callable[[str], Proxy], slow_teacher: str) -> None:
    proxy = start_proxy(slow_teacher)
    body = {
        "model": "gpt-4o",
        "stream": True,
        "messages": [{"role": "user", "content": "Where is my parcel?"}],
    }
    headers = {"authorization": f"Bearer {proxy.key}", **proxy.headers()}
    with (
        httpx.Client() as client,
        client.stream("POST", f"{proxy.url}/v1/capture/openai/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        next(resp.iter_bytes())
    [row] = proxy.captures()
    assert row.status == "incomplete" and row.streamed
    assert proxy.store.set_triage("acme", [row.id], "kept", "alice") == 0


def test_stream_cut_off_upstream_is_incomplete(start_proxy: Callable[[str], Proxy], broken_upstream: str) -> None:
    proxy = start_proxy(broken_upstream)
    pieces = []
    request = {"model": "claude-haiku-4", "max_tokens": 8, "messages": [{"role": "user", "content": "cut"}]}
    with proxy.anthropic().messages.stream(**request) as stream:
        pieces.extend(stream.text_stream)
    assert "".join(pieces) == "half an"
    openai_text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in proxy.openai().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "cut"}], stream=True
        )
    )
    assert openai_text == "half an"
    rows = proxy.captures()
    assert [(r.provider, r.status, r.output_text) for r in rows] == [
        ("anthropic", "incomplete", "half an"),
        ("openai", "incomplete", "half an"),
    ]
    proxy.store.add_rule("acme", "support", "keep", {}, "alice")
    assert proxy.store.apply_rules("acme", "support") == {"kept": 0, "discarded": 0}


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store_url(request: pytest.FixtureRequest) -> Iterator[Callable[[], str | None]]:
    """Makes store URLs: None for the embedded SQLite file under KOLM_HOME, else a fresh throwaway
    PostgreSQL database per call (dropped afterwards)."""
    if request.param == "sqlite":
        yield lambda: None
        return
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    made: list[str] = []

    def make() -> str:
        db = f"kolm_canary_{uuid.uuid4().hex[:12]}"
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        made.append(db)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"

    with admin:
        try:
            yield make
        finally:
            for db in made:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


def test_upstream_key_never_stored_logged_or_echoed(
    start_proxy: Callable[..., Proxy],
    teacher: str,
    broken_upstream: str,
    new_store_url: Callable[[], str | None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Canary: a unique provider key, shaped so that PII redaction would not catch it, goes through every
    kind of call, including failures whose bodies echo it; afterwards no byte of it is anywhere."""
    canary = f"Canary.{uuid.uuid4().hex[:8]}.{uuid.uuid4().hex[:8]}"
    for name in SERVER_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    log_file = tmp_path / "server.log"
    file_handler = logging.FileHandler(log_file)
    file_handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(file_handler)
    good_url, bad_url = new_store_url(), new_store_url()
    good, bad = start_proxy(teacher, good_url), start_proxy(broken_upstream, bad_url)
    headers = {"x-upstream-api-key": canary}
    question = [{"role": "user", "content": f"I was charged twice, my key is {canary}"}]
    seen: list[str] = []
    try:
        reply = good.openai(**headers).chat.completions.with_raw_response.create(model="gpt-4o", messages=question)
        seen.append(reply.text + repr(reply.headers))
        seen.extend(
            repr(c)
            for c in good.openai(**headers).chat.completions.create(model="gpt-4o", messages=question, stream=True)
        )
        seen.append(
            repr(good.anthropic(**headers).messages.create(model="claude-sonnet-4", max_tokens=8, messages=question))
        )

        with httpx.Client() as client:
            for path, auth in [
                ("/v1/capture/openai/chat/completions", {"authorization": f"Bearer {bad.key}"}),
                ("/v1/capture/anthropic/v1/messages", {"x-api-key": bad.key}),
            ]:
                for mode, stream in [("401", False), ("500", False), ("429", False), ("401", True), ("500", True)]:
                    body = {
                        "model": "m",
                        "max_tokens": 8,
                        "stream": stream,
                        "messages": [{"role": "user", "content": mode}],
                    }
                    resp = client.post(f"{bad.url}{path}", json=body, headers={**auth, **bad.headers(**headers)})
                    assert resp.status_code == int(mode)
                    assert "redacted" in resp.json()["error"]["message"]
                    seen.append(resp.text + repr(resp.headers))
                    if mode == "429":
                        assert resp.headers["retry-after"] == "7"
            echo = "".join(
                chunk.choices[0].delta.content or ""
                for chunk in bad.openai(**headers).chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "echo-stream"}], stream=True
                )
            )
            assert echo == "your key is [redacted]"
            seen.append(echo)
        with pytest.raises(openai.AuthenticationError) as excinfo:
            bad.openai(**headers).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "401"}])
        seen.append(str(excinfo.value))

        good_rows, bad_rows = good.captures(), bad.captures()
        assert len(good_rows) == 3 and {r.status for r in good_rows} == {"ok"}
        assert all("[redacted]" in r.messages[-1]["content"] for r in good_rows)
        assert len(bad_rows) == 12
        assert {r.http_status for r in bad_rows} == {401, 429, 500, 200}
        # Artifacts: the corpus export of every kept pair, written where a user would keep it.
        for proxy in (good, bad):
            proxy.store.add_rule("acme", "support", "keep", {}, "canary")
            proxy.store.apply_rules("acme", "support")
            api = httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {proxy.key}"})
            export = api.get("/v1/labels/synthesize-corpus", params={"namespace": "support"})
            api.close()
            assert export.status_code == 200 and export.content
            (proxy.home / "artifacts").mkdir(parents=True, exist_ok=True)
            (proxy.home / "artifacts" / "corpus.jsonl").write_bytes(export.content)
        dumps = []
        if good_url is not None and bad_url is not None:
            for url in (good_url, bad_url):
                dump = subprocess.run(
                    [PG_DUMP, "--no-owner", "--inserts", url.replace("postgresql+psycopg", "postgresql")],
                    capture_output=True,
                    check=True,
                ).stdout
                assert b"INSERT INTO public.captures" in dump  # the dump does hold the captures
                dumps.append(dump)
            # The store goes away: later captures wait in the journal, and the journal must be as clean.
            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                db = good_url.rsplit("/", 1)[1]
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
            good.openai(**headers).chat.completions.create(model="gpt-4o", messages=question)
            assert good.app.state.recorder.unstored() > 0
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
    for proxy in (good, bad):
        proxy.store.close()
        files = [path for path in proxy.home.rglob("*") if path.is_file()]
        if good_url is None:
            assert any(f.name == "captures.db" for f in files)
        assert any(f.name == "corpus.jsonl" for f in files)
        for path in files:
            assert canary.encode() not in path.read_bytes(), path
    for dump in dumps:
        assert canary.encode() not in dump
    assert canary.encode() not in log_file.read_bytes()
    assert not any(canary in text for text in seen)
    assert canary not in caplog.text
    assert all(canary not in str(record.args) for record in caplog.records)


def test_unknown_kolm_key_is_401(proxy: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError) as excinfo:
        proxy.openai(key="kolm_not-a-real-key").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert excinfo.value.status_code == 401
    assert excinfo.value.body["type"] == "authentication_error"
    resp = httpx.post(f"{proxy.url}/v1/capture/anthropic/v1/messages", json={}, headers=proxy.headers())
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    assert proxy.captures() == []


def test_bad_requests_are_4xx_json(proxy: Proxy) -> None:
    url = f"{proxy.url}/v1/capture/openai/chat/completions"
    auth = {"authorization": f"Bearer {proxy.key}"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ({**auth, **proxy.headers(namespace="Bad.NS")}, body, 400),
        ({**auth, "x-upstream-api-key": CANARY}, body, 400),
        ({**auth, **proxy.headers(**{"x-kolm-tags": "x" * 65})}, body, 400),
        ({**auth, "x-kolm-namespace": "support"}, body, 401),
        ({**auth, **proxy.headers()}, {"model": "gpt-4o", "messages": "hi"}, 400),
        ({**auth, **proxy.headers()}, {"messages": []}, 400),
        ({**auth, **proxy.headers()}, [1, 2], 400),
    ]
    for headers, payload, status in cases:
        resp = httpx.post(url, json=payload, headers=headers)
        assert resp.status_code == status, (headers, payload)
        assert set(resp.json()["error"]) == {"type", "message"}
    resp = httpx.post(url, content=b"{not json", headers={**auth, **proxy.headers()})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{proxy.url}/nowhere").json()["error"]["type"] == "not_found_error"
    assert proxy.captures() == []


def test_unreachable_upstream_is_502(start_proxy: Callable[[str], Proxy]) -> None:
    proxy = start_proxy("http://127.0.0.1:9")
    with pytest.raises(openai.InternalServerError) as excinfo:
        proxy.openai().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert excinfo.value.status_code == 502
    [row] = proxy.captures()
    assert (row.status, row.http_status) == ("error", 502)


def test_capture_only_key_cannot_use_inbox(proxy: Proxy) -> None:
    capture_key = proxy.store.create_tenant("sensor", capture_only=True)
    reply = proxy.openai(key=capture_key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "I was charged twice"}]
    )
    assert reply.choices[0].message.content == "fin-ops"
    auth = {"authorization": f"Bearer {capture_key}"}
    for method, path in [
        ("GET", "/v1/captures"),
        ("POST", "/v1/captures/1/triage"),
        ("POST", "/v1/captures/1/feedback"),
        ("GET", "/v1/namespaces/support/status"),
    ]:
        resp = httpx.request(method, f"{proxy.url}{path}", json={"state": "kept", "output": "x"}, headers=auth)
        assert resp.status_code == 403, path
        assert resp.json()["error"]["type"] == "permission_error"
    proxy.flush()
    assert proxy.store.counters("sensor", "support")["captured"] == 1


def test_inbox_routes(start_proxy: Callable[[str], Proxy], teacher: str, broken_upstream: str) -> None:
    proxy = start_proxy(teacher)
    client = proxy.openai()
    for text in ["I was charged twice", "Where is my parcel?", "something else"]:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    api = httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {proxy.key}"})
    proxy.flush()
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}

    listed = api.get("/v1/captures", params={"namespace": "support", "limit": 2}).json()["captures"]
    assert [c["output_text"] for c in listed] == ["unknown", ANSWERS["Where is my parcel?"]]
    first_id, second_id, third_id = sorted(c["id"] for c in api.get("/v1/captures").json()["captures"])

    assert api.post(f"/v1/captures/{first_id}/triage", json={"state": "kept"}).json() == {
        "id": first_id,
        "triage_state": "kept",
    }
    assert api.post(f"/v1/captures/{third_id}/triage", json={"state": "discarded"}).status_code == 200
    fixed = api.post(f"/v1/captures/{second_id}/feedback", json={"output": "logistics"})
    assert fixed.json() == {"id": second_id, "feedback_output": "logistics", "feedback_rating": None}
    rated = api.post(f"/v1/captures/{second_id}/feedback", json={"rating": 4}).json()
    assert rated == {"id": second_id, "feedback_output": None, "feedback_rating": 4}
    single = api.get(f"/v1/captures/{second_id}").json()
    assert (single["feedback_output"], single["feedback_rating"]) == ("logistics", 4)
    kept = api.get("/v1/captures", params={"state": "kept"}).json()["captures"]
    assert [c["id"] for c in kept] == [first_id]
    assert api.get("/v1/captures?state=untriaged").json()["captures"][0]["feedback_output"] == "logistics"

    status = api.get("/v1/namespaces/support/status").json()
    routing = status.pop("routing")
    assert status == {
        "namespace": "support",
        "counters": {"captured": 3, "kept": 1, "discarded": 1, "untriaged": 1, "distilled": 0, "merged": 0},
        "switches": {"retention_days": 30, "implicit_signals": False, "distill_ready": False, "routing": "teacher",
                     "routing_target": 0.98, "canary_share": 0.05, "shadow_min": 200, "image_bytes_limit": 1 << 30},
        "redaction": "all",
    }
    assert (routing["mode"], routing["compared"], routing["adapter_cid"]) == ("teacher", 0, None)
    assert api.get("/v1/namespaces").json() == {"namespaces": ["support"]}

    # Bulk triage is all or nothing; rules are added and applied at once.
    resp = api.post("/v1/captures/triage", json={"ids": [second_id, 999_999], "state": "kept"})
    assert resp.status_code == 404 and proxy.store.get_capture("acme", second_id).triage_state == "untriaged"
    bulk = api.post("/v1/captures/triage", json={"ids": [second_id, third_id], "state": "untriaged"}).json()
    assert bulk == {"state": "untriaged", "changed": 1, "requested": 2}
    rule = api.post("/v1/namespaces/support/rules", json={"action": "keep", "match": {"model": "gpt-4o"}}).json()
    assert rule["applied"] == {"kept": 2, "discarded": 0}
    assert [r["match"] for r in api.get("/v1/namespaces/support/rules").json()["rules"]] == [
        {"status": "ok", "model": "gpt-4o"}
    ]
    assert (
        api.post("/v1/namespaces/support/rules", json={"action": "keep", "match": {"colour": "x"}}).status_code == 400
    )

    # The corpus export is exactly what the corpus stage builds from the same kept pairs.
    from kolm_pipeline.corpus.build import build_corpus

    export = api.get("/v1/labels/synthesize-corpus", params={"namespace": "support"})
    assert export.headers["content-type"] == "application/x-ndjson"
    assert export.content == build_corpus(proxy.store.kept_pairs("acme", "support"))[0]
    assert [json.loads(line)["messages"][-1]["content"] for line in export.text.splitlines()] == [
        "fin-ops",
        "logistics",
        "unknown",
    ]
    observed = api.get("/v1/bridges/observations", params={"namespace": "support"}).json()
    assert observed["partition_key"] == "acme.support" and observed["counters"]["kept"] == 3
    assert observed["last_capture_id"] == third_id

    # Switches: every change is audited with its old and new value.
    changed = api.post("/v1/namespaces/support/switches", json={"retention_days": 7, "distill_ready": True}).json()
    assert changed["switches"] == {"retention_days": 7, "implicit_signals": False, "distill_ready": True,
                                   "routing": "teacher", "routing_target": 0.98, "canary_share": 0.05,
                                   "shadow_min": 200, "image_bytes_limit": 1 << 30}
    redaction = api.post("/v1/namespaces/support/switches", json={"redact_entities": ["EMAIL", "API_KEY"]}).json()
    assert redaction["redaction"] == ["API_KEY", "EMAIL"]
    for bad in [{"retention_days": 0}, {"distill_ready": "yes"}, {"redact_entities": ["NAME"]}]:
        assert api.post("/v1/namespaces/support/switches", json=bad).status_code == 400
    audit = [(row["action"], row["detail"]) for row in api.get("/v1/audit?namespace=support").json()["audit"]]
    assert ("switch.retention_days", {"from": 30, "to": 7}) in audit
    assert ("switch.distill_ready", {"from": False, "to": True}) in audit
    assert ("switch.redact_entities", {"from": None, "to": ["API_KEY", "EMAIL"]}) in audit

    for method, path, payload, code in [
        ("POST", f"/v1/captures/{first_id}/triage", {"state": "maybe"}, 400),
        ("POST", f"/v1/captures/{first_id}/triage", {}, 400),
        ("POST", "/v1/captures/abc/triage", {"state": "kept"}, 400),
        ("POST", "/v1/captures/999999/triage", {"state": "kept"}, 404),
        ("POST", "/v1/captures/999999/feedback", {"output": "x"}, 404),
        ("POST", f"/v1/captures/{first_id}/feedback", {"output": ""}, 400),
        ("POST", f"/v1/captures/{first_id}/feedback", {}, 400),
        ("POST", f"/v1/captures/{first_id}/feedback", {"rating": 6}, 400),
        ("POST", "/v1/captures/triage", {"ids": [], "state": "kept"}, 400),
        ("GET", "/v1/labels/synthesize-corpus", None, 400),
        ("GET", "/v1/bridges/observations?namespace=a.b", None, 400),
        ("GET", "/v1/captures/999999", None, 404),
        ("GET", "/v1/captures?limit=0", None, 400),
        ("GET", "/v1/captures?namespace=Bad.NS", None, 400),
        ("GET", "/v1/captures?state=maybe", None, 400),
        ("GET", "/v1/namespaces/Bad.NS/status", None, 400),
    ]:
        resp = api.request(method, path, json=payload)
        assert resp.status_code == code, (path, payload, resp.text)
        assert set(resp.json()["error"]) == {"type", "message"}

    other_key = proxy.store.create_tenant("rival")
    rival = httpx.Client(base_url=proxy.url, headers={"authorization": f"Bearer {other_key}"})
    assert rival.get("/v1/captures").json()["captures"] == []
    assert rival.post(f"/v1/captures/{first_id}/triage", json={"state": "discarded"}).status_code == 404

    failing = start_proxy(broken_upstream)
    with pytest.raises(openai.InternalServerError):
        failing.openai().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "500"}])
    failing.flush()
    [error_row] = failing.store.list_captures("acme")
    failing_api = httpx.Client(base_url=failing.url, headers={"authorization": f"Bearer {failing.key}"})
    resp = failing_api.post(f"/v1/captures/{error_row.id}/triage", json={"state": "kept"})
    assert resp.status_code == 409 and resp.json()["error"]["type"] == "conflict_error"
    assert failing.store.get_capture("acme", error_row.id).triage_state == "untriaged"
    for client_ in (api, rival, failing_api):
        client_.close()


def test_escaped_or_odd_provider_keys(proxy: Proxy) -> None:
    """A provider key written with JSON escapes in the request body is still scrubbed from the record; a
    key that is not printable ASCII is refused before anything is forwarded."""
    canary = f"sk/{uuid.uuid4().hex}"
    url = f"{proxy.url}/v1/capture/openai/chat/completions"
    auth = {"authorization": f"Bearer {proxy.key}", "content-type": "application/json"}
    escaped = canary.replace("/", "\\/")
    unicode_escaped = "\\u0073" + canary[1:]
    headers = {**auth, **proxy.headers(**{"x-upstream-api-key": canary})}
    for written in (escaped, unicode_escaped):
        body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "my key is ' + written.encode() + b'"}]}'
        assert httpx.post(url, content=body, headers=headers).status_code == 200
    rows = proxy.captures()
    assert [row.messages[0]["content"] for row in rows] == ["my key is [redacted]"] * 2
    odd = httpx.post(
        url,
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        headers={**auth, "x-kolm-namespace": "support", "x-upstream-api-key": "clé-secrète".encode("latin-1")},
    )
    assert odd.status_code == 400 and odd.json()["error"]["type"] == "invalid_request_error"
    assert len(proxy.captures()) == 2


@pytest.fixture(scope="module")
def cookie_upstream() -> Iterator[str]:
    """An upstream that sets a cookie on every reply and answers with the cookie header it was sent."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        seen = request.headers.get("cookie", "none")
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": seen}}]}
        return JSONResponse(body, headers={"set-cookie": f"session={uuid.uuid4().hex}; Path=/"})

    with BackgroundServer(app) as server:
        yield server.url.replace("127.0.0.1", "localhost")  # cookie jars ignore cookies set by IP addresses


def test_upstream_cookies_are_not_carried_between_calls(
    start_proxy: Callable[[str], Proxy], cookie_upstream: str
) -> None:
    """One upstream connection pool serves every tenant: a cookie one call's reply set must never ride
    along on the next call (someone else's, maybe)."""
    proxy = start_proxy(cookie_upstream)
    rival_key = proxy.store.create_tenant("rival")
    replies = [
        proxy.openai(key=key).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        for key in (proxy.key, rival_key, proxy.key)
    ]
    assert [reply.choices[0].message.content for reply in replies] == ["none"] * 3


class DroppingUpstream:
    """A stand-in teacher on raw sockets that keeps connections alive, but closes the first connection
    without answering when its second request arrives: an upstream whose idle timeout crossed the proxy's
    reuse of a pooled connection."""

    def __init__(self) -> None:
        self.requests_per_connection: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = len(self.requests_per_connection)
        self.requests_per_connection.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests_per_connection[connection] += 1
                if connection == 0 and self.requests_per_connection[connection] == 2:
                    return
                body = json.dumps({
                    "id": "chatcmpl-drop", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fin-ops"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def dropping_upstream() -> Iterator[tuple[DroppingUpstream, str]]:
    upstream = DroppingUpstream()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(upstream.handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield upstream, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def shut_down() -> None:
        server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


def test_pooled_connection_the_upstream_dropped_is_sent_again(
    start_proxy: Callable[[str], Proxy], dropping_upstream: tuple[DroppingUpstream, str]
) -> None:
    upstream, url = dropping_upstream
    proxy = start_proxy(url)
    client = proxy.openai()
    for _ in range(2):
        reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "fin-ops"
    assert upstream.requests_per_connection == [2, 1], "the second call reused the pooled connection and went again"
    assert [(row.status, row.http_status) for row in proxy.captures()] == [("ok", 200), ("ok", 200)]
