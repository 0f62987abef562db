"""Slow clients (issue 19, item 7): 300 connections that never finished their request headers were held for
40 s and none was closed. Every server (`kolm capture serve` through `serve`, `kolm serve`, `BackgroundServer`:
all run uvicorn with `server_options`) now cuts a request whose headers are not complete within the header
timeout, and one whose body stops arriving for the read timeout, while well-behaved clients, slow-but-steady
bodies and slow answers are served as before.

Real sockets against the real capture proxy (in front of the stand-in teacher) on short timeouts."""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kolm_pipeline.capture import background
from kolm_pipeline.capture.background import BackgroundServer, serve
from kolm_pipeline.capture_server import create_app
from kolm_pipeline.demo.teacher import create_teacher_app
from kolm_pipeline.settings import CaptureConfig, load_settings
from kolm_pipeline.store import CaptureStore

HEADER_S = 1.0
READ_S = 1.5
SLACK_S = 1.5  # a shared two-core machine: the timer fires late, never early
EARLY_S = 0.1  # how much sooner than its timeout a close may be seen (clock granularity)
PATH = "/v1/capture/openai/chat/completions"
PARTIAL_HEADERS = f"POST {PATH} HTTP/1.1\r\nHost: x\r\n".encode()
ANSWERS = {"Where is my parcel?": "logistics"}


class Proxy:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        parts = urlsplit(url)
        self.address = (parts.hostname or "", parts.port or 80)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", "x-upstream-api-key": "sk-upstream",
                "x-kolm-namespace": "support", "content-type": "application/json"}

    def connect(self, first: bytes = b"") -> socket.socket:
        sock = socket.create_connection(self.address, timeout=10)
        if first:
            sock.sendall(first)
        return sock

    def chat(self) -> httpx.Response:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Where is my parcel?"}]}
        return httpx.post(self.url + PATH, headers=self.headers(), json=body, timeout=30)

    def request_head(self, body: bytes) -> bytes:
        lines = [f"POST {PATH} HTTP/1.1", "Host: x", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers().items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    home: Path = tmp_path_factory.mktemp("timeouts") / "home"
    with BackgroundServer(create_teacher_app(ANSWERS)) as teacher:
        settings = load_settings(home).model_copy(
            update={"upstream_openai": f"{teacher.url}/v1", "upstream_anthropic": teacher.url}
        )
        store = CaptureStore(settings.store_url)
        key = store.create_tenant("acme")
        app = create_app(settings, store, CaptureConfig(retention_sweep_s=0, replay_interval_s=0.2))
        with BackgroundServer(app, header_timeout=HEADER_S, read_timeout=READ_S) as server:
            yield Proxy(server.url, key)
        store.close()


def _closed(sockets: list[socket.socket], deadline: float) -> dict[socket.socket, tuple[float, bytes]]:
    """When each socket was closed by the server (EOF or reset) and what it had sent; open ones are absent."""
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    received = {sock: b"" for sock in sockets}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[sock] += data
                    continue
                closed[sock] = (time.monotonic(), received[sock])
                selector.unregister(sock)
    return closed


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_unfinished_headers_are_cut_at_the_header_timeout_while_others_are_served(proxy: Proxy) -> None:
    started = time.monotonic()
    slow = [proxy.connect(PARTIAL_HEADERS) for _ in range(50)]
    silent = [proxy.connect() for _ in range(5)]  # connected and never wrote a byte
    try:
        reply = proxy.chat()  # while they all hang
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "logistics"
        closed = _closed(slow + silent, deadline=started + HEADER_S + SLACK_S)
        assert len(closed) == len(slow + silent), f"{len(slow + silent) - len(closed)} connections still open"
        assert min(at for at, _ in closed.values()) >= started + HEADER_S - EARLY_S
        for _, sent in closed.values():
            assert sent == b"" or sent.startswith(b"HTTP/1.1 408 ")
    finally:
        _close_all(slow + silent)
    assert proxy.chat().status_code == 200


def test_headers_trickled_line_by_line_are_cut_too(proxy: Proxy) -> None:
    """The header timeout counts from the connection (or the request's first byte), not from the last line."""
    sock = proxy.connect(PARTIAL_HEADERS)
    started = time.monotonic()
    try:
        while time.monotonic() < started + HEADER_S + SLACK_S:
            try:
                sock.sendall(b"x-pad: 1\r\n")
            except OSError:
                break
            time.sleep(HEADER_S / 5)
        assert _closed([sock], deadline=started + HEADER_S + SLACK_S)
    finally:
        sock.close()


def test_a_stalled_body_is_cut_at_the_read_timeout(proxy: Proxy) -> None:
    head = proxy.request_head(b"x" * 1000)
    sock = proxy.connect(head + b'{"model": ')
    started = time.monotonic()
    try:
        closed = _closed([sock], deadline=started + READ_S + SLACK_S)
        assert closed, "a request whose body stopped after 10 of 1000 bytes is still open"
        at, sent = closed[sock]
        assert at >= started + READ_S - EARLY_S
        assert sent == b"" or sent.startswith(b"HTTP/1.1 408 ")
    finally:
        sock.close()
    assert proxy.chat().status_code == 200


def test_a_body_that_keeps_arriving_is_served_however_long_it_takes(proxy: Proxy) -> None:
    """The read timeout is an idle timeout: pieces a little closer together than it, over longer than both
    timeouts in all, are one request served."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Where is my parcel?"}]})
    data = body.encode()
    size = len(data) // 4 + 1
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    sock = proxy.connect(proxy.request_head(data))
    started = time.monotonic()
    try:
        for piece in pieces:
            time.sleep(READ_S * 0.6)
            sock.sendall(piece)
        assert time.monotonic() - started > HEADER_S + READ_S
        reply = _read_reply(sock)
    finally:
        sock.close()
    assert reply["status"] == 200, reply
    assert json.loads(reply["body"])["choices"][0]["message"]["content"] == "logistics"


def test_an_answer_slower_than_both_timeouts_is_not_cut() -> None:
    """Waiting on the app (here the teacher itself, answering after both timeouts) is never the client's stall."""
    app = create_teacher_app(ANSWERS, latency_s=HEADER_S + READ_S)
    with BackgroundServer(app, header_timeout=HEADER_S, read_timeout=READ_S) as server:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Where is my parcel?"}]}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30,
                           headers={"authorization": "Bearer sk-upstream"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "logistics"


def test_time_the_app_takes_to_ask_for_the_body_is_not_the_clients() -> None:
    """A client that sent `Expect: 100-continue` waits for the app to want its body: however long the app takes
    (here longer than the read timeout), the client's clock only starts once it is asked."""

    async def late_reader(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        await asyncio.sleep(READ_S * 1.5)
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    with BackgroundServer(late_reader, header_timeout=HEADER_S, read_timeout=READ_S) as server:
        host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"hello")
            reply = _read_reply(sock)
    assert (reply["status"], reply["body"]) == (200, b"hello")


def test_a_kept_alive_connection_is_cut_when_its_next_request_stalls_in_its_headers(proxy: Proxy) -> None:
    sock = proxy.connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert _read_reply(sock)["status"] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        closed = _closed([sock], deadline=started + HEADER_S + SLACK_S)
        assert closed and closed[sock][0] >= started + HEADER_S - EARLY_S
    finally:
        sock.close()


def test_serve_runs_uvicorn_with_the_same_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` (what `kolm capture serve` runs) and `BackgroundServer` take their uvicorn settings from
    `server_options` (as `kolm serve` does); the tests above, run on BackgroundServer, hold for `serve` too."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(background.gc, "freeze", lambda: None)
    monkeypatch.setattr(background.uvicorn, "run", lambda app, **options: seen.update(options))
    serve(object(), "127.0.0.1", 8000, log_level="warning", header_timeout=3.0, read_timeout=4.0)
    expected = background.server_options("warning", header_timeout=3.0, read_timeout=4.0)
    protocol, expected_protocol = seen.pop("http"), expected.pop("http")
    assert (protocol.header_timeout, protocol.read_timeout) == (3.0, 4.0)
    assert protocol.__mro__[1:] == expected_protocol.__mro__[1:]
    assert {name: seen[name] for name in expected} == expected
    defaults = background.server_options("info")["http"]
    assert (defaults.header_timeout, defaults.read_timeout) == (10.0, 30.0)


def _read_reply(sock: socket.socket) -> dict[str, Any]:
    """One HTTP/1.1 response with a content-length (what both apps send for a plain answer)."""
    sock.setblocking(True)
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return {"status": int(lines[0].split()[1]), "headers": headers, "body": body}
