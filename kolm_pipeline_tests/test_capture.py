"""The capture proxy end to end: official SDKs → proxy (BackgroundServer) → stand-in teacher."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kolm_pipeline.capture.app import create_app
from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.demo.teacher import approx_tokens, create_teacher_app
from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import Capture, CaptureStore

ANSWERS = {
    "I was charged twice": "fin-ops",
    "Where is my parcel?": "logistics, the parcel is on its way to you",
}
CANARY = "sk-canary-7f3e9b1c5d2a4e6f8a0b"
SERVER_LOGGERS = [
    "kolm_pipeline",
    "uvicorn",
    "httpx",
    "httpcore",
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

        async def events() -> AsyncIterator[bytes]:
            for event in cut_off:
                yield event

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        key = request.headers["authorization"].removeprefix("Bearer ")
        return await reply(
            request, key, [b'data: {"choices": [{"index": 0, "delta": {"content": "half an"}}]}\n\n']
        )

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
        events = [
            f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            for event in (start, block, delta)
        ]
        return await reply(request, request.headers["x-api-key"], events)

    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[[str], Proxy]]:
    servers: list[tuple[BackgroundServer, CaptureStore]] = []

    def start(upstream: str) -> Proxy:
        home = tmp_path / f"home{len(servers)}"
        settings = dataclasses.replace(
            load_settings(home),
            upstream_openai=f"{upstream}/v1",
            upstream_anthropic=upstream,
            retention_days=30,
        )
        store = CaptureStore(settings.store_url)
        key = store.create_tenant("acme")
        app = create_app(settings, store)
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


def test_first_chunk_arrives_before_upstream_finishes(
    start_proxy: Callable[[str], Proxy], slow_teacher: str
) -> None:
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
        client.stream(
            "POST", f"{proxy.url}/v1/capture/openai/chat/completions", json=body, headers=headers
        ) as resp,
    ):
        assert resp.status_code == 200
        next(resp.iter_bytes())
    [row] = proxy.captures()
    assert row.status == "incomplete" and row.streamed
    assert proxy.store.set_triage("acme", [row.id], "kept", "alice") == 0


def test_stream_cut_off_upstream_is_incomplete(
    start_proxy: Callable[[str], Proxy], broken_upstream: str
) -> None:
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


def test_upstream_key_never_stored_logged_or_echoed(
    start_proxy: Callable[[str], Proxy], teacher: str, broken_upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    for name in SERVER_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    good, bad = start_proxy(teacher), start_proxy(broken_upstream)
    question = [{"role": "user", "content": "I was charged twice"}]
    good.openai().chat.completions.create(model="gpt-4o", messages=question)
    list(good.openai().chat.completions.create(model="gpt-4o", messages=question, stream=True))
    good.anthropic().messages.create(model="claude-sonnet-4", max_tokens=8, messages=question)

    seen = []
    with httpx.Client() as client:
        for path, auth in [
            ("/v1/capture/openai/chat/completions", {"authorization": f"Bearer {bad.key}"}),
            ("/v1/capture/anthropic/v1/messages", {"x-api-key": bad.key}),
        ]:
            for mode, stream in [("401", False), ("500", False), ("401", True), ("500", True)]:
                body = {
                    "model": "m",
                    "max_tokens": 8,
                    "stream": stream,
                    "messages": [{"role": "user", "content": mode}],
                }
                resp = client.post(f"{bad.url}{path}", json=body, headers={**auth, **bad.headers()})
                assert resp.status_code == int(mode)
                assert "redacted" in resp.json()["error"]["message"]
                seen.append(resp.text + repr(resp.headers))
    with pytest.raises(openai.AuthenticationError) as excinfo:
        bad.openai().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "401"}])
    seen.append(str(excinfo.value))

    errors = bad.captures()
    assert len(errors) == 9
    assert {(r.status, r.output_text) for r in errors} == {("error", "")}
    assert {r.http_status for r in errors} == {401, 500}
    assert len(good.captures()) == 3
    good.store.close()
    bad.store.close()
    for proxy in (good, bad):
        files = list(proxy.home.rglob("*"))
        assert any(f.name == "captures.db" for f in files)
        for path in files:
            if path.is_file():
                assert CANARY.encode() not in path.read_bytes(), path
    assert not any(CANARY in text for text in seen)
    assert CANARY not in caplog.text
    assert all(CANARY not in str(record.args) for record in caplog.records)


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
        resp = httpx.request(
            method, f"{proxy.url}{path}", json={"state": "kept", "output": "x"}, headers=auth
        )
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
    assert fixed.json() == {"id": second_id, "feedback_output": "logistics"}
    kept = api.get("/v1/captures", params={"state": "kept"}).json()["captures"]
    assert [c["id"] for c in kept] == [first_id]
    assert api.get("/v1/captures?state=untriaged").json()["captures"][0]["feedback_output"] == "logistics"

    status = api.get("/v1/namespaces/support/status").json()
    assert status == {
        "namespace": "support",
        "counters": {"captured": 3, "kept": 1, "discarded": 1, "untriaged": 1},
        "switches": {"distill_enabled": False, "implicit_signals": False, "retention_days": 30},
    }

    for method, path, payload, code in [
        ("POST", f"/v1/captures/{first_id}/triage", {"state": "maybe"}, 400),
        ("POST", f"/v1/captures/{first_id}/triage", {}, 400),
        ("POST", "/v1/captures/abc/triage", {"state": "kept"}, 400),
        ("POST", "/v1/captures/999999/triage", {"state": "kept"}, 404),
        ("POST", "/v1/captures/999999/feedback", {"output": "x"}, 404),
        ("POST", f"/v1/captures/{first_id}/feedback", {"output": ""}, 400),
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
        failing.openai().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "500"}]
        )
    failing.flush()
    [error_row] = failing.store.list_captures("acme")
    failing_api = httpx.Client(base_url=failing.url, headers={"authorization": f"Bearer {failing.key}"})
    resp = failing_api.post(f"/v1/captures/{error_row.id}/triage", json={"state": "kept"})
    assert resp.status_code == 409 and resp.json()["error"]["type"] == "conflict_error"
    assert failing.store.get_capture("acme", error_row.id).triage_state == "untriaged"
    for client_ in (api, rival, failing_api):
        client_.close()
