"""The capture proxy: sits between an application and its frontier LLM API, forwards every call with
the caller's own provider key, and records the request/response pair for later distillation. The same
server answers the inbox: listing, triage, feedback, switches, corpus export and the `/inbox` page.

The tenant comes only from the kolm key in the client's API-key slot; the provider key travels in
`x-upstream-api-key`, is forwarded upstream and is never stored, logged or echoed. The response path
does no database round trip (kolm keys are cached for a few seconds) and no parsing beyond the request
body; the reply is parsed, scrubbed, redacted and written by the recorder off that path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any, Literal

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from kolm_pipeline.capture.providers import ANTHROPIC, OPENAI, Provider, RequestError, StreamState
from kolm_pipeline.capture.recorder import REDACTED, Pending, Recorder
from kolm_pipeline.capture.redact import validate_entities
from kolm_pipeline.capture.spool import Spool
from kolm_pipeline.settings import CaptureConfig, Settings, load_capture_config
from kolm_pipeline.store import (
    Capture,
    CaptureStore,
    NewCapture,
    Tenant,
    partition_key,
    validate_namespace,
)
from kolm_pipeline.store.rules import MATCH_KEYS

logger = logging.getLogger(__name__)

UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=10.0)
CAPTURE_ID_HEADER = "x-kolm-capture-id"
PROVIDERS: dict[str, Provider] = {OPENAI.name: OPENAI, ANTHROPIC.name: ANTHROPIC}
_ENDPOINTS = {"openai": "chat/completions", "anthropic": "v1/messages"}
_FORWARDED_RESPONSE_HEADERS = ("retry-after", "x-request-id", "request-id", "openai-processing-ms")
_FORWARDED_RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
_MAX_TAGS = 32
_MAX_TAG_LENGTH = 64
_NEGATIVE_KEY_TTL_S = 2.0
_KEY_CACHE_MAX = 10_000
_INBOX_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found_error", what)


def _scrub_bytes(content: bytes, secret: str) -> bytes:
    return content.replace(secret.encode("utf-8"), REDACTED.encode("utf-8"))


class _KeyFilter:
    """Removes the provider key from a byte stream even when it straddles two chunks: only a tail that
    could be the start of the key is held back, so ordinary chunks pass at once."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode("utf-8")
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self._held + chunk).replace(self._key, REDACTED.encode("utf-8"))
        keep = 0
        first = self._key[:1]
        start = max(0, len(data) - len(self._key) + 1)
        position = data.find(first, start)
        while position != -1:
            if self._key.startswith(data[position:]):
                keep = len(data) - position
                break
            position = data.find(first, position + 1)
        self._held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def _kolm_keys(request: Request) -> list[str]:
    """Candidates for the kolm key from the client's API-key slot: `Authorization: Bearer`, `x-api-key`
    (SDKs differ in which one carries `api_key`)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    candidates = [
        token.strip() if scheme.lower() == "bearer" else "",
        request.headers.get("x-api-key", "").strip(),
    ]
    return [key for key in candidates if key]


def _tags(header: str | None) -> list[str]:
    tags: list[str] = []
    for raw in (header or "").split(","):
        tag = raw.strip()
        if not tag or tag in tags:
            continue
        if len(tag) > _MAX_TAG_LENGTH or not tag.isprintable():
            raise ApiError(
                400,
                "invalid_request_error",
                f"invalid tag in x-kolm-tags: at most {_MAX_TAG_LENGTH} printable characters per tag",
            )
        tags.append(tag)
    if len(tags) > _MAX_TAGS:
        raise ApiError(400, "invalid_request_error", f"x-kolm-tags: at most {_MAX_TAGS} tags")
    return tags


def _namespace(value: str | None) -> str:
    if not value:
        raise ApiError(400, "invalid_request_error", "missing x-kolm-namespace header")
    try:
        return validate_namespace(value)
    except ValueError as exc:
        raise ApiError(400, "invalid_request_error", str(exc)) from exc


def _response_headers(upstream: httpx.Response, secret: str, request_id: str | None) -> dict[str, str]:
    headers = {
        name: value.replace(secret, REDACTED)
        for name, value in upstream.headers.items()
        if name in _FORWARDED_RESPONSE_HEADERS or name.startswith(_FORWARDED_RESPONSE_PREFIXES)
    }
    if request_id is not None:
        headers[CAPTURE_ID_HEADER] = request_id
    return headers


def _capture_json(capture: Capture) -> dict[str, Any]:
    data = asdict(capture)
    for name in ("created_at", "expired_at", "distilled_at", "merged_at"):
        value = getattr(capture, name)
        data[name] = value.isoformat() if value is not None else None
    return data


class _Call:
    """One proxied call: what is known from the request, and the single record it ends in."""

    def __init__(
        self,
        recorder: Recorder | None,
        provider: Provider,
        tenant: str,
        namespace: str,
        model: str,
        messages: list[dict[str, Any]],
        tags: list[str],
        upstream_key: str,
        streamed: bool,
    ) -> None:
        self.request_id = uuid.uuid4().hex if recorder is not None else None
        self.recorder = recorder
        self.provider = provider
        self.tenant = tenant
        self.namespace = namespace
        self.model = model
        self.messages = messages
        self.tags = tags
        self.upstream_key = upstream_key
        self.streamed = streamed
        self.recorded = recorder is None
        self.start_ns = time.perf_counter_ns()

    def _record(
        self,
        output_text: str,
        status: str,
        http_status: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        end_ns: int,
    ) -> NewCapture:
        assert self.request_id is not None
        return NewCapture(
            request_id=self.request_id,
            tenant=self.tenant,
            namespace=self.namespace,
            provider=self.provider.name,
            model=self.model,
            messages=self.messages,
            output_text=output_text,
            latency_us=(end_ns - self.start_ns) // 1000,
            status=status,
            http_status=http_status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            tags=self.tags,
            streamed=self.streamed,
        )

    def _submit(self, build: Callable[[], NewCapture]) -> None:
        """Queue the capture once; later calls are ignored."""
        if self.recorded or self.recorder is None:
            return
        self.recorded = True
        self.recorder.submit(Pending(build, self.upstream_key))

    def record_failure(self, http_status: int, end_ns: int | None = None) -> None:
        done = end_ns or time.perf_counter_ns()
        self._submit(lambda: self._record("", "error", http_status, None, None, done))

    def record_reply(self, http_status: int, content: bytes, end_ns: int) -> None:
        """A complete non-streamed reply; it is parsed later, on the recorder's thread."""

        def build() -> NewCapture:
            if not 200 <= http_status < 300:
                return self._record("", "error", http_status, None, None, end_ns)
            try:
                completion = self.provider.completion(json.loads(content))
            except (ValueError, RecursionError):
                return self._record("", "error", http_status, None, None, end_ns)
            return self._record(
                completion.output_text,
                "ok",
                http_status,
                completion.prompt_tokens,
                completion.completion_tokens,
                end_ns,
            )

        self._submit(build)

    def record_stream(self, state: StreamState, http_status: int, end_ns: int) -> None:
        """'ok' only if the provider's end marker arrived, else 'incomplete' (or 'error')."""
        if state.failed:
            status, output = "error", ""
        elif state.complete:
            status, output = "ok", state.text
        else:
            status, output = "incomplete", state.text
        prompt, completion = state.prompt_tokens, state.completion_tokens
        self._submit(lambda: self._record(output, status, http_status, prompt, completion, end_ns))


class _Relay:
    """Passes an upstream SSE stream through chunk by chunk while reading the text and usage out of it."""

    def __init__(self, call: _Call, upstream: httpx.Response, state: StreamState) -> None:
        self.call = call
        self.upstream = upstream
        self.state = state
        self.keys = _KeyFilter(call.upstream_key)
        self.last_chunk_ns: int | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_bytes():
                self.last_chunk_ns = time.perf_counter_ns()
                if not self.call.recorded:
                    self.state.feed(chunk)
                out = self.keys.feed(chunk)
                if out:
                    yield out
            tail = self.keys.flush()
            if tail:
                yield tail
        except httpx.HTTPError as exc:
            logger.warning("upstream stream of capture %s broke off: %s", self.call.request_id, type(exc).__name__)
        finally:
            self.finish()

    def finish(self) -> None:
        self.call.record_stream(self.state, self.upstream.status_code, self.last_chunk_ns or time.perf_counter_ns())


class _RelayResponse(StreamingResponse):
    """A streaming response that records its call however it ends: done, upstream cut, client gone."""

    def __init__(self, relay: _Relay, **kwargs: Any) -> None:
        super().__init__(relay.chunks(), **kwargs)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._relay.finish()
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._relay.upstream.aclose()


class _KeyCache:
    """kolm key → tenant, reused for `ttl` seconds so the response path makes no database round trip.

    Entries are keyed by the key's sha256, never by the key itself; unknown keys are remembered briefly
    so a client hammering with a bad key does not hammer the database either."""

    def __init__(self, store: CaptureStore, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._entries: dict[str, tuple[Tenant | None, float]] = {}

    async def tenant(self, key: str) -> Tenant | None:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[1] > now:
            return entry[0]
        try:
            tenant = await asyncio.to_thread(self._store.tenant_for_key, key)
        except Exception as exc:
            # The store is down: a key seen before keeps working (captures are spooled meanwhile).
            if entry is not None and entry[0] is not None:
                return entry[0]
            logger.warning("kolm key lookup failed: %s", type(exc).__name__)
            raise ApiError(503, "unavailable_error", "the capture store is unavailable; retry shortly") from exc
        if len(self._entries) >= _KEY_CACHE_MAX:
            self._entries.clear()
        self._entries[digest] = (
            tenant,
            now + (self._ttl if tenant is not None else min(self._ttl, _NEGATIVE_KEY_TTL_S)),
        )
        return tenant

    def clear(self) -> None:
        self._entries.clear()


async def tenant_of(request: Request) -> Tenant:
    """The tenant whose kolm key the request carries; 401 when there is none or it is unknown."""
    keys = _kolm_keys(request)
    if not keys:
        raise ApiError(401, "authentication_error", "missing kolm key: send it as the client's API key")
    cache: _KeyCache = request.app.state.keys
    for key in keys:
        tenant = await cache.tenant(key)
        if tenant is not None:
            return tenant
    raise ApiError(401, "authentication_error", "unknown kolm key")


async def inbox_tenant(request: Request) -> Tenant:
    """Like `tenant_of`, but capture-only keys are refused (403): they may record, not read or triage."""
    tenant = await tenant_of(request)
    if tenant.capture_only:
        raise ApiError(403, "permission_error", "this kolm key can only capture; the inbox needs a full key")
    return tenant


InboxTenant = Annotated[Tenant, Depends(inbox_tenant)]


class TriageBody(BaseModel):
    """`tags` are added and `remove_tags` removed with the state change, e.g. `["eval-candidate"]`."""

    state: Literal["kept", "discarded", "untriaged"]
    tags: list[str] = Field(default_factory=list, max_length=_MAX_TAGS)
    remove_tags: list[str] = Field(default_factory=list, max_length=_MAX_TAGS)


class BulkTriageBody(BaseModel):
    ids: list[int] = Field(min_length=1, max_length=10_000)
    state: Literal["kept", "discarded", "untriaged"]


class FeedbackBody(BaseModel):
    output: str | None = Field(default=None, min_length=1, max_length=1_000_000)
    rating: int | None = Field(default=None, ge=1, le=5, strict=True)

    @model_validator(mode="after")
    def _one_of(self) -> FeedbackBody:
        if self.output is None and self.rating is None:
            raise ValueError("give a corrected 'output', a 'rating' from 1 to 5, or both")
        return self


class RuleBody(BaseModel):
    action: Literal["keep", "discard"]
    match: dict[str, str] = Field(default_factory=dict)


class SwitchesBody(BaseModel):
    retention_days: int | None = Field(default=None, ge=1, le=3650, strict=True)
    implicit_signals: bool | None = Field(default=None, strict=True)
    distill_ready: bool | None = Field(default=None, strict=True)
    redact_entities: list[str] | None = None


def _actor(tenant: Tenant) -> str:
    return f"key:{tenant.key_prefix}"


def create_app(settings: Settings, store: CaptureStore, config: CaptureConfig | None = None) -> FastAPI:
    """The proxy and inbox API over `store`, forwarding to the upstreams named in `settings`."""
    config = config or load_capture_config()
    recorder = (
        Recorder(
            store,
            Spool(settings.spool_dir),
            batch_size=config.batch_size,
            max_queue=config.queue_size,
            retry_interval=config.replay_interval_s,
            linger=config.batch_linger_s,
        )
        if config.record
        else None
    )

    async def sweep_retention() -> None:
        while True:
            try:
                expired = await asyncio.to_thread(store.apply_retention)
                if expired:
                    logger.info("retention: expired %s", expired)
            except Exception as exc:
                logger.warning("retention sweep failed: %s", type(exc).__name__)
            await asyncio.sleep(config.retention_sweep_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        app.state.http = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, limits=limits)
        if recorder is not None:
            await recorder.start()
        sweeper = asyncio.create_task(sweep_retention()) if config.retention_sweep_s > 0 else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with suppress(asyncio.CancelledError):
                    await sweeper
            if recorder is not None:
                await recorder.stop()
            await app.state.http.aclose()

    app = FastAPI(title="kolm capture proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.store = store
    app.state.recorder = recorder
    app.state.keys = _KeyCache(store, config.key_cache_ttl_s)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()
        )
        return error_response(400, "invalid_request_error", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error: %s", type(exc).__name__)
        return error_response(500, "internal_error", "internal server error")

    async def read_body(request: Request) -> bytes:
        """The request body, refused with 413 past `max_body_bytes` without reading further."""
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")
        parts: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "request_too_large", f"request body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def proxy(request: Request, provider: Provider) -> Response:
        tenant = await tenant_of(request)
        namespace = _namespace(request.headers.get("x-kolm-namespace"))
        tags = _tags(request.headers.get("x-kolm-tags"))
        upstream_key = request.headers.get("x-upstream-api-key", "").strip()
        if not upstream_key:
            raise ApiError(401, "authentication_error", "missing x-upstream-api-key header (the provider key)")
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "invalid_request_error", "request body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request_error", "request body must be a JSON object")
        try:
            messages = provider.messages(body)
        except RequestError as exc:
            raise ApiError(400, "invalid_request_error", str(exc)) from exc
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "invalid_request_error", "'model' must be a non-empty string")
        streamed = body.get("stream") is True
        call = _Call(recorder, provider, tenant.name, namespace, model, messages, tags, upstream_key, streamed)
        headers = provider.upstream_headers(request.headers, upstream_key)
        upstream_request = app.state.http.build_request(
            "POST", provider.upstream_url(settings), content=raw, headers=headers
        )
        if recorder is not None:
            recorder.begin()
        relay_started = False
        try:
            call.start_ns = time.perf_counter_ns()
            try:
                upstream = await app.state.http.send(upstream_request, stream=streamed)
            except httpx.TimeoutException as exc:
                call.record_failure(504)
                return _upstream_error(504, provider, exc, call)
            except httpx.HTTPError as exc:
                call.record_failure(502)
                return _upstream_error(502, provider, exc, call)
            response_headers = _response_headers(upstream, upstream_key, call.request_id)
            content_type = upstream.headers.get("content-type", "")
            if streamed and upstream.is_success and content_type.startswith("text/event-stream"):
                relay = _Relay(call, upstream, provider.new_stream())
                relay_started = True
                return _RelayResponse(
                    relay,
                    status_code=upstream.status_code,
                    headers={**response_headers, "cache-control": "no-cache"},
                    media_type=content_type,
                )
            try:
                content = await upstream.aread()
            except httpx.HTTPError as exc:
                call.record_failure(502)
                return _upstream_error(502, provider, exc, call)
            finally:
                await upstream.aclose()
            done_ns = time.perf_counter_ns()
            call.record_reply(upstream.status_code, content, done_ns)
            if not upstream.is_success:
                content = _scrub_bytes(content, upstream_key)
            media_type = upstream.headers.get("content-type", "application/json")
            return Response(
                content=content, status_code=upstream.status_code, headers=response_headers, media_type=media_type
            )
        finally:
            if recorder is not None and not relay_started and not call.recorded:
                recorder.abandon()

    def _upstream_error(status: int, provider: Provider, exc: Exception, call: _Call) -> JSONResponse:
        what = "timed out" if status == 504 else "unreachable or broke off"
        headers = {CAPTURE_ID_HEADER: call.request_id} if call.request_id else None
        return error_response(
            status, "upstream_error", f"{provider.name} upstream {what} ({type(exc).__name__})", headers=headers
        )

    @app.post("/v1/capture/openai/chat/completions")
    async def capture_openai(request: Request) -> Response:
        return await proxy(request, OPENAI)

    @app.post("/v1/capture/anthropic/v1/messages")
    async def capture_anthropic(request: Request) -> Response:
        return await proxy(request, ANTHROPIC)

    @app.api_route(
        "/v1/capture/{provider}/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    )
    async def capture_other(provider: str, rest: str, request: Request) -> Response:
        if provider not in PROVIDERS:
            raise _not_found(f"unknown provider {provider[:64]!r}: use one of {', '.join(PROVIDERS)}")
        if rest == _ENDPOINTS[provider]:
            raise ApiError(405, "invalid_request_error", f"{request.method} not allowed here; use POST")
        raise _not_found(f"{provider} endpoint not captured: use /v1/capture/{provider}/{_ENDPOINTS[provider]}")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    # Inbox

    def _ns(namespace: str | None) -> str | None:
        return None if namespace is None else _namespace(namespace)

    @app.get("/v1/namespaces")
    async def list_namespaces(tenant: InboxTenant) -> dict[str, Any]:
        pairs = await asyncio.to_thread(store.namespaces, tenant.name)
        return {"namespaces": [namespace for _, namespace in pairs]}

    @app.get("/v1/captures")
    async def list_captures(
        tenant: InboxTenant,
        namespace: str | None = None,
        state: Literal["untriaged", "kept", "discarded"] | None = None,
        status: Literal["ok", "error", "incomplete"] | None = None,
        model: Annotated[str | None, Query(max_length=255)] = None,
        tag: Annotated[str | None, Query(max_length=_MAX_TAG_LENGTH)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> dict[str, Any]:
        rows = await asyncio.to_thread(
            store.list_captures, tenant.name, _ns(namespace), state, limit, offset, status, model, tag
        )
        return {"captures": [_capture_json(row) for row in rows], "limit": limit, "offset": offset}

    @app.get("/v1/captures/{capture_id}")
    async def get_capture(capture_id: int, tenant: InboxTenant) -> dict[str, Any]:
        capture = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
        if capture is None:
            raise _not_found(f"no capture {capture_id}")
        return _capture_json(capture)

    @app.post("/v1/captures/triage")
    async def triage_bulk(body: BulkTriageBody, tenant: InboxTenant) -> dict[str, Any]:
        owned = await asyncio.to_thread(store.owned_ids, tenant.name, body.ids)
        missing = sorted(set(body.ids) - owned)
        if missing:
            raise _not_found(f"no capture(s) {missing[:20]}; nothing was changed")
        changed = await asyncio.to_thread(store.set_triage, tenant.name, body.ids, body.state, _actor(tenant))
        return {"state": body.state, "changed": changed, "requested": len(set(body.ids))}

    @app.post("/v1/captures/{capture_id}/triage")
    async def triage(capture_id: int, body: TriageBody, tenant: InboxTenant) -> dict[str, Any]:
        capture = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
        if capture is None:
            raise _not_found(f"no capture {capture_id}")
        if body.state == "kept" and (capture.status != "ok" or capture.expired_at is not None):
            reason = f"has status {capture.status!r}" if capture.status != "ok" else "is past its retention window"
            raise ApiError(409, "conflict_error", f"capture {capture_id} {reason}; it cannot be kept")
        try:
            await asyncio.to_thread(
                store.set_triage, tenant.name, [capture_id], body.state, _actor(tenant), body.tags, body.remove_tags
            )
        except ValueError as exc:
            raise ApiError(400, "invalid_request_error", str(exc)) from exc
        if not body.tags and not body.remove_tags:
            return {"id": capture_id, "triage_state": body.state}
        updated = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
        return {"id": capture_id, "triage_state": body.state, "tags": updated.tags if updated else capture.tags}

    @app.post("/v1/captures/{capture_id}/feedback")
    async def feedback(capture_id: int, body: FeedbackBody, tenant: InboxTenant) -> dict[str, Any]:
        try:
            await asyncio.to_thread(
                store.set_feedback, tenant.name, capture_id, body.output, _actor(tenant), body.rating
            )
        except LookupError as exc:
            raise _not_found(f"no capture {capture_id}") from exc
        except ValueError as exc:
            raise ApiError(409, "conflict_error", str(exc)) from exc
        return {"id": capture_id, "feedback_output": body.output, "feedback_rating": body.rating}

    @app.get("/v1/namespaces/{namespace}/rules")
    async def list_rules(namespace: str, tenant: InboxTenant) -> dict[str, Any]:
        rules = await asyncio.to_thread(store.rules, tenant.name, _namespace(namespace))
        return {
            "rules": [{"id": r.id, "action": r.action, "match": r.match, "created_by": r.created_by} for r in rules]
        }

    @app.post("/v1/namespaces/{namespace}/rules")
    async def add_rule(namespace: str, body: RuleBody, tenant: InboxTenant) -> dict[str, Any]:
        namespace = _namespace(namespace)
        try:
            rule_id = await asyncio.to_thread(
                store.add_rule, tenant.name, namespace, body.action, body.match, _actor(tenant)
            )
        except ValueError as exc:
            raise ApiError(400, "invalid_request_error", f"{exc} (match keys: {', '.join(MATCH_KEYS)})") from exc
        applied = await asyncio.to_thread(store.apply_rules, tenant.name, namespace)
        return {"id": rule_id, "applied": applied}

    @app.post("/v1/namespaces/{namespace}/rules/apply")
    async def apply_rules(namespace: str, tenant: InboxTenant) -> dict[str, Any]:
        return {"applied": await asyncio.to_thread(store.apply_rules, tenant.name, _namespace(namespace))}

    @app.get("/v1/namespaces/{namespace}/status")
    async def status(namespace: str, tenant: InboxTenant) -> dict[str, Any]:
        return await asyncio.to_thread(store.status, tenant.name, _namespace(namespace))

    @app.post("/v1/namespaces/{namespace}/switches")
    async def switches(namespace: str, body: SwitchesBody, tenant: InboxTenant) -> dict[str, Any]:
        namespace = _namespace(namespace)
        changes = body.model_dump(exclude_unset=True)
        if "redact_entities" in changes:
            try:
                changes["redact_entities"] = validate_entities(changes["redact_entities"])
            except ValueError as exc:
                raise ApiError(400, "invalid_request_error", str(exc)) from exc
        changes = {k: v for k, v in changes.items() if v is not None or k == "redact_entities"}
        await asyncio.to_thread(store.set_switches, tenant.name, namespace, _actor(tenant), **changes)
        return await asyncio.to_thread(store.status, tenant.name, namespace)

    @app.get("/v1/audit")
    async def audit(tenant: InboxTenant, namespace: str | None = None) -> dict[str, Any]:
        rows = await asyncio.to_thread(store.audit_rows, tenant.name, _ns(namespace))
        return {
            "audit": [
                {
                    "id": r.id,
                    "namespace": r.namespace,
                    "action": r.action,
                    "detail": r.detail,
                    "actor": r.actor,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows[:1000]
            ]
        }

    @app.get("/v1/labels/synthesize-corpus")
    async def synthesize_corpus(namespace: str, tenant: InboxTenant) -> Response:
        from kolm_pipeline.corpus.build import build_corpus

        namespace = _namespace(namespace)

        def build() -> bytes:
            return build_corpus(store.kept_pairs(tenant.name, namespace))[0]

        data = await asyncio.to_thread(build)
        return Response(
            data,
            media_type="application/x-ndjson",
            headers={"content-disposition": f'attachment; filename="{tenant.name}.{namespace}.jsonl"'},
        )

    @app.get("/v1/bridges/observations")
    async def observations(namespace: str, tenant: InboxTenant) -> dict[str, Any]:
        namespace = _namespace(namespace)
        observed = await asyncio.to_thread(store.observation, tenant.name, namespace)
        return {"namespace": namespace, "partition_key": partition_key(tenant.name, namespace), **observed}

    page_files = resources.files("kolm_pipeline.capture")
    inbox_html = page_files.joinpath("inbox.html").read_text("utf-8")
    inbox_js = page_files.joinpath("inbox.js").read_text("utf-8")
    page_headers = {
        "content-security-policy": _INBOX_CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
    }

    @app.get("/inbox", response_class=HTMLResponse)
    async def inbox() -> HTMLResponse:
        """The page holds no data: its script reads the JSON API with the key the person types in."""
        return HTMLResponse(inbox_html, headers=page_headers)

    @app.get("/inbox.js")
    async def inbox_script() -> Response:
        return Response(inbox_js, media_type="text/javascript", headers=page_headers)

    return app
