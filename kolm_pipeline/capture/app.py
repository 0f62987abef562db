"""The capture proxy: sits between an application and its frontier LLM API, forwards every call with
the caller's own provider key, and records the request/response pair for later distillation.

The tenant comes only from the kolm key in the client's API-key slot; the provider key travels in
`x-upstream-api-key`, is forwarded upstream and is never stored, logged or echoed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any, Literal

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from kolm_pipeline.capture.providers import ANTHROPIC, OPENAI, Provider, RequestError, StreamState
from kolm_pipeline.capture.recorder import Recorder
from kolm_pipeline.settings import Settings
from kolm_pipeline.store import Capture, CaptureStore, NewCapture, Tenant, validate_namespace

logger = logging.getLogger(__name__)

UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=10.0)
REDACTED = "[redacted]"
CAPTURE_ID_HEADER = "x-kolm-capture-id"
_FORWARDED_RESPONSE_HEADERS = ("retry-after", "x-request-id", "request-id", "openai-processing-ms")
_FORWARDED_RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
_MAX_TAGS = 32
_MAX_TAG_LENGTH = 64


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def error_response(
    status: int, type_: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _scrub(value: Any, secret: str) -> Any:
    """Replace every occurrence of `secret` in the strings of a JSON-like value."""
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, list):
        return [_scrub(item, secret) for item in value]
    if isinstance(value, dict):
        return {_scrub(k, secret): _scrub(v, secret) for k, v in value.items()}
    return value


def _scrub_bytes(content: bytes, secret: str) -> bytes:
    return content.replace(secret.encode("utf-8"), REDACTED.encode("utf-8"))


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


def _response_headers(upstream: httpx.Response, secret: str, request_id: str) -> dict[str, str]:
    headers = {
        name: value.replace(secret, REDACTED)
        for name, value in upstream.headers.items()
        if name in _FORWARDED_RESPONSE_HEADERS or name.startswith(_FORWARDED_RESPONSE_PREFIXES)
    }
    headers[CAPTURE_ID_HEADER] = request_id
    return headers


def _capture_json(capture: Capture) -> dict[str, Any]:
    data = asdict(capture)
    data["created_at"] = capture.created_at.isoformat()
    return data


class _Call:
    """One proxied call: what is known from the request, and the single record it ends in."""

    def __init__(
        self,
        recorder: Recorder,
        provider: Provider,
        tenant: str,
        namespace: str,
        model: str,
        messages: list[dict[str, Any]],
        tags: list[str],
        upstream_key: str,
        streamed: bool,
    ) -> None:
        self.request_id = uuid.uuid4().hex
        self.recorder = recorder
        self.provider = provider
        self.tenant = tenant
        self.namespace = namespace
        self.model = model
        self.messages = messages
        self.tags = tags
        self.upstream_key = upstream_key
        self.streamed = streamed
        self.recorded = False
        self.start_ns = time.perf_counter_ns()

    def record(
        self,
        output_text: str,
        status: str,
        http_status: int,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        end_ns: int | None = None,
    ) -> None:
        """Queue the capture once; later calls are ignored. The provider key is scrubbed from every text."""
        if self.recorded:
            return
        self.recorded = True
        key = self.upstream_key
        self.recorder.submit(
            NewCapture(
                request_id=self.request_id,
                tenant=self.tenant,
                namespace=self.namespace,
                provider=self.provider.name,
                model=_scrub(self.model, key),
                messages=_scrub(self.messages, key),
                output_text=_scrub(output_text, key),
                latency_us=((end_ns or time.perf_counter_ns()) - self.start_ns) // 1000,
                status=status,
                http_status=http_status,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                tags=[_scrub(tag, key) for tag in self.tags],
                streamed=self.streamed,
            )
        )


class _Relay:
    """Passes an upstream SSE stream through chunk by chunk while reading the text and usage out of it."""

    def __init__(self, call: _Call, upstream: httpx.Response, state: StreamState) -> None:
        self.call = call
        self.upstream = upstream
        self.state = state
        self.last_chunk_ns: int | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_bytes():
                self.last_chunk_ns = time.perf_counter_ns()
                self.state.feed(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            logger.warning(
                "upstream stream of capture %s broke off: %s", self.call.request_id, type(exc).__name__
            )
        finally:
            self.finish()

    def finish(self) -> None:
        """Record the call: 'ok' only if the provider's end marker arrived, else 'incomplete' or 'error'."""
        if self.state.failed:
            status, output = "error", ""
        elif self.state.complete:
            status, output = "ok", self.state.text
        else:
            status, output = "incomplete", self.state.text
        self.call.record(
            output,
            status,
            self.upstream.status_code,
            self.state.prompt_tokens,
            self.state.completion_tokens,
            self.last_chunk_ns,
        )


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


def _plain_response(
    call: _Call, upstream: httpx.Response, content: bytes, headers: dict[str, str], done_ns: int
) -> Response:
    """Answer a non-streamed upstream reply as it came, except that error bodies lose the provider key."""
    if not upstream.is_success:
        call.record("", "error", upstream.status_code, end_ns=done_ns)
        content = _scrub_bytes(content, call.upstream_key)
    else:
        try:
            completion = call.provider.completion(json.loads(content))
        except ValueError:
            call.record("", "error", upstream.status_code, end_ns=done_ns)
        else:
            call.record(
                completion.output_text,
                "ok",
                upstream.status_code,
                completion.prompt_tokens,
                completion.completion_tokens,
                done_ns,
            )
    media_type = upstream.headers.get("content-type", "application/json")
    return Response(content=content, status_code=upstream.status_code, headers=headers, media_type=media_type)


async def tenant_of(request: Request) -> Tenant:
    """The tenant whose kolm key the request carries; 401 when there is none or it is unknown."""
    keys = _kolm_keys(request)
    if not keys:
        raise ApiError(401, "authentication_error", "missing kolm key: send it as the client's API key")
    store: CaptureStore = request.app.state.store
    for key in keys:
        tenant = await asyncio.to_thread(store.tenant_for_key, key)
        if tenant is not None:
            return tenant
    raise ApiError(401, "authentication_error", "unknown kolm key")


async def inbox_tenant(request: Request) -> Tenant:
    """Like `tenant_of`, but capture-only keys are refused (403): they may record, not read or triage."""
    tenant = await tenant_of(request)
    if tenant.capture_only:
        raise ApiError(403, "permission_error", "this kolm key can only capture; the inbox needs a full key")
    return tenant


class TriageBody(BaseModel):
    state: Literal["kept", "discarded"]


class FeedbackBody(BaseModel):
    output: str = Field(min_length=1)


def create_app(settings: Settings, store: CaptureStore) -> FastAPI:
    """The proxy and inbox JSON API over `store`, forwarding to the upstreams named in `settings`."""
    recorder = Recorder(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.http = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT)
        await recorder.start()
        try:
            yield
        finally:
            await recorder.stop()
            await app.state.http.aclose()

    app = FastAPI(
        title="kolm capture proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.settings = settings
    app.state.store = store
    app.state.recorder = recorder

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
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", "internal server error")

    async def proxy(request: Request, provider: Provider) -> Response:
        tenant = await tenant_of(request)
        namespace = _namespace(request.headers.get("x-kolm-namespace"))
        tags = _tags(request.headers.get("x-kolm-tags"))
        upstream_key = request.headers.get("x-upstream-api-key", "").strip()
        if not upstream_key:
            raise ApiError(
                401, "authentication_error", "missing x-upstream-api-key header (the provider key)"
            )
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
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
        call = _Call(
            recorder, provider, tenant.name, namespace, model, messages, tags, upstream_key, streamed
        )
        headers = provider.upstream_headers(request.headers, upstream_key)
        upstream_request = app.state.http.build_request(
            "POST", provider.upstream_url(settings), content=raw, headers=headers
        )
        recorder.begin()
        relay_started = False
        try:
            call.start_ns = time.perf_counter_ns()
            try:
                upstream = await app.state.http.send(upstream_request, stream=streamed)
            except httpx.HTTPError as exc:
                call.record("", "error", 502)
                return error_response(
                    502,
                    "upstream_error",
                    f"{provider.name} upstream unreachable ({type(exc).__name__})",
                    headers={CAPTURE_ID_HEADER: call.request_id},
                )
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
            finally:
                await upstream.aclose()
            return _plain_response(call, upstream, content, response_headers, time.perf_counter_ns())
        finally:
            if not relay_started and not call.recorded:
                recorder.abandon()

    @app.post("/v1/capture/openai/chat/completions")
    async def capture_openai(request: Request) -> Response:
        return await proxy(request, OPENAI)

    @app.post("/v1/capture/anthropic/v1/messages")
    async def capture_anthropic(request: Request) -> Response:
        return await proxy(request, ANTHROPIC)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/captures")
    async def list_captures(
        tenant: Annotated[Tenant, Depends(inbox_tenant)],
        namespace: str | None = None,
        state: Literal["untriaged", "kept", "discarded"] | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        if namespace is not None:
            _namespace(namespace)
        rows = await asyncio.to_thread(store.list_captures, tenant.name, namespace, state, limit, offset)
        return {"captures": [_capture_json(row) for row in rows], "limit": limit, "offset": offset}

    @app.post("/v1/captures/{capture_id}/triage")
    async def triage(
        capture_id: int, body: TriageBody, tenant: Annotated[Tenant, Depends(inbox_tenant)]
    ) -> dict[str, Any]:
        capture = await asyncio.to_thread(store.get_capture, tenant.name, capture_id)
        if capture is None:
            raise ApiError(404, "not_found_error", f"no capture {capture_id}")
        if body.state == "kept" and capture.status != "ok":
            raise ApiError(
                409,
                "conflict_error",
                f"capture {capture_id} has status {capture.status!r}; only 'ok' captures can be kept",
            )
        actor = f"key:{tenant.key_prefix}"
        await asyncio.to_thread(store.set_triage, tenant.name, [capture_id], body.state, actor)
        return {"id": capture_id, "triage_state": body.state}

    @app.post("/v1/captures/{capture_id}/feedback")
    async def feedback(
        capture_id: int, body: FeedbackBody, tenant: Annotated[Tenant, Depends(inbox_tenant)]
    ) -> dict[str, Any]:
        actor = f"key:{tenant.key_prefix}"
        try:
            await asyncio.to_thread(store.set_feedback, tenant.name, capture_id, body.output, actor)
        except LookupError as exc:
            raise ApiError(404, "not_found_error", f"no capture {capture_id}") from exc
        return {"id": capture_id, "feedback_output": body.output}

    @app.get("/v1/namespaces/{namespace}/status")
    async def namespace_status(
        namespace: str, tenant: Annotated[Tenant, Depends(inbox_tenant)]
    ) -> dict[str, Any]:
        _namespace(namespace)
        counters = await asyncio.to_thread(store.counters, tenant.name, namespace)
        return {
            "namespace": namespace,
            "counters": counters,
            "switches": {
                "distill_enabled": False,
                "implicit_signals": False,
                "retention_days": settings.retention_days,
            },
        }

    return app
