"""Bad input and broken upstreams. Hypothesis fuzzes the whole HTTP surface of a real proxy: never a 5xx,
every refusal a JSON error, and no stored row for any request the proxy refused itself. Upstream failures
(connection refused, truncated bodies and streams, 429, 500) reach the client faithfully."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from kolm_pipeline.capture_server import CAPTURE_ID_HEADER
from kolm_pipeline.settings import CaptureConfig
from kolm_pipeline.store.tables import captures
from kolm_pipeline_tests.test_capture import Proxy, start_proxy, teacher  # noqa: F401 (fixtures)

ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
PATHS = [
    "/v1/capture/openai/chat/completions",
    "/v1/capture/anthropic/v1/messages",
    "/v1/capture/{text}/chat/completions",
    "/v1/capture/openai/{text}",
    "/v1/captures",
    "/v1/captures/{id}",
    "/v1/captures/{id}/triage",
    "/v1/captures/{id}/feedback",
    "/v1/captures/triage",
    "/v1/namespaces",
    "/v1/namespaces/{text}/status",
    "/v1/namespaces/{text}/rules",
    "/v1/namespaces/{text}/switches",
    "/v1/labels/synthesize-corpus",
    "/v1/bridges/observations",
    "/v1/audit",
    "/inbox",
    "/{text}",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ASCII,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ASCII, inner, max_size=4),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": JSON}),
    max_size=3,
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda value: __import__("json").dumps(value).encode()),
    st.fixed_dictionaries(
        {"model": JSON | ASCII, "messages": MESSAGES | JSON},
        optional={"stream": JSON, "max_tokens": JSON, "system": JSON, "state": JSON, "ids": JSON, "output": JSON},
    ).map(lambda value: __import__("json").dumps(value).encode()),
    st.just(b"[" * 5_000),  # nesting deep enough to break a recursive parser
)


@pytest.fixture
def fuzz_proxy(start_proxy: Callable[..., Proxy], teacher: str) -> Proxy:  # noqa: F811
    return start_proxy(teacher, None, CaptureConfig(retention_sweep_s=0, max_body_bytes=64 * 1024))


def _rows(proxy: Proxy) -> int:
    proxy.flush()
    with proxy.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(captures)).scalar_one()


def test_fuzz_http_surface(fuzz_proxy: Proxy) -> None:
    proxy = fuzz_proxy
    capture_only = proxy.store.create_tenant("sensor", capture_only=True)
    keys = st.sampled_from([proxy.key, capture_only, "kolm_wrong", "", "Bearer", "x" * 300])
    http = httpx.Client(base_url=proxy.url, timeout=10)
    seen: Counter[int] = Counter()

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
        template=st.sampled_from(PATHS),
        text=ASCII.filter(lambda t: "/" not in t and "?" not in t and "#" not in t),
        capture_id=st.integers(-(2**70), 2**70) | ASCII,
        query=st.dictionaries(
            st.sampled_from(["namespace", "state", "status", "limit", "offset", "tag", "model"]), ASCII, max_size=3
        ),
        key=keys,
        key_header=st.sampled_from(["authorization", "x-api-key"]),
        namespace=st.none() | st.sampled_from(["support", "Bad.NS", "", "a" * 70]) | ASCII,
        upstream_key=st.none() | ASCII,
        tags=st.none() | ASCII,
        body=BODIES,
    )
    def fuzz(
        method: str,
        template: str,
        text: str,
        capture_id: object,
        query: dict[str, str],
        key: str,
        key_header: str,
        namespace: str | None,
        upstream_key: str | None,
        tags: str | None,
        body: bytes,
    ) -> None:
        path = template.format(text=text, id=capture_id)
        headers = {key_header: f"Bearer {key}" if key_header == "authorization" else key}
        for name, value in (
            ("x-kolm-namespace", namespace),
            ("x-upstream-api-key", upstream_key),
            ("x-kolm-tags", tags),
        ):
            if value is not None:
                headers[name] = value
        before = _rows(proxy)
        try:
            resp = http.request(method, path, params=query, headers=headers, content=body)
        except httpx.LocalProtocolError:
            reject()  # the client itself refuses to send it (e.g. a header value h11 rejects)
        seen[resp.status_code] += 1
        assert resp.status_code < 500, (method, path, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            error = resp.json()["error"]
            assert set(error) == {"type", "message"} and error["message"]
        if CAPTURE_ID_HEADER not in resp.headers:
            assert _rows(proxy) == before, (method, path, resp.status_code)

    fuzz()
    http.close()
    assert sum(seen.values()) >= 150, seen  # most examples reached the server
    assert len(seen) >= 5, seen  # and drew a spread of answers (200, 400, 401, 403, 404, 405, 413, ...)


def test_oversized_and_unknown_are_refused(fuzz_proxy: Proxy) -> None:
    proxy = fuzz_proxy
    url = f"{proxy.url}/v1/capture/openai/chat/completions"
    headers = {"authorization": f"Bearer {proxy.key}", **proxy.headers()}
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 70_000}]}
    resp = httpx.post(url, json=big, headers=headers)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no content-length: the limit holds while reading
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 10_000
        yield b'"}]}'

    assert httpx.post(url, content=chunked(), headers=headers).status_code == 413
    resp = httpx.post(f"{proxy.url}/v1/capture/mistral/chat/completions", json=big, headers=headers)
    assert resp.status_code == 404 and "unknown provider" in resp.json()["error"]["message"]
    assert httpx.get(url, headers=headers).status_code == 405
    assert _rows(proxy) == 0


@pytest.fixture
def truncating_upstream() -> Iterator[str]:
    """A raw socket server that promises a longer body than it sends, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n"
                    b'{"choices": [{"index": 0, "message": {"content": "cut'
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


def test_upstream_failures_reach_the_client(start_proxy: Callable[..., Proxy], truncating_upstream: str) -> None:  # noqa: F811
    cut = start_proxy(truncating_upstream)
    with pytest.raises(openai.APIStatusError) as excinfo:
        cut.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert excinfo.value.status_code == 502
    assert excinfo.value.body["type"] == "upstream_error"
    refused = start_proxy("http://127.0.0.1:9")
    with pytest.raises(anthropic.APIStatusError) as excinfo:
        refused.anthropic().messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert excinfo.value.status_code == 502
    for proxy in (cut, refused):
        [row] = proxy.captures()
        assert (row.status, row.http_status) == ("error", 502)
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200  # the proxy is still up
