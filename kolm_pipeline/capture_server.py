"""The capture proxy: sits between an application and its frontier LLM API, forwards every call with
the caller's own provider key, and records the request/response pair for later distillation. The same
server answers the inbox: listing, triage, feedback, switches, corpus export and the `/inbox` page.

The tenant comes only from the kolm key in the client's API-key slot; the provider key travels in
`x-upstream-api-key`, is forwarded upstream and is never stored, logged or echoed. The two capture routes
are answered by `forward.Forwarder` as bare ASGI ahead of FastAPI (see there for what the response path
does); everything else is an ordinary FastAPI route.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from kolm_pipeline.capture.forward import (
    CAPTURE_ID_HEADER,
    MAX_TAG_LENGTH,
    MAX_TAGS,
    ApiError,
    Forwarder,
    KeyCache,
    Receive,
    Scope,
    Send,
    parse_namespace,
)
from kolm_pipeline.capture.providers import ANTHROPIC, OPENAI, PROVIDERS, Provider
from kolm_pipeline.capture.recorder import Recorder
from kolm_pipeline.capture.redact import validate_entities
from kolm_pipeline.capture.spool import Spool
from kolm_pipeline.corpus.build import build_corpus
from kolm_pipeline.settings import CaptureConfig, Settings, load_capture_config
from kolm_pipeline.store import Capture, CaptureStore, Tenant, partition_key
from kolm_pipeline.store.rules import MATCH_KEYS

__all__ = ["CAPTURE_ID_HEADER", "CaptureApp", "create_app"]

logger = logging.getLogger(__name__)

CAPTURE_ROUTES: dict[str, Provider] = {
    "/v1/capture/openai/chat/completions": OPENAI,
    "/v1/capture/anthropic/v1/messages": ANTHROPIC,
}
_ENDPOINTS = {"openai": "chat/completions", "anthropic": "v1/messages"}
_INBOX_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found_error", what)


def _capture_json(capture: Capture) -> dict[str, Any]:
    data = asdict(capture)
    for name in ("created_at", "expired_at", "distilled_at", "merged_at"):
        value = getattr(capture, name)
        data[name] = value.isoformat() if value is not None else None
    return data


class CaptureApp(FastAPI):
    """FastAPI for the inbox; a POST to a capture route goes straight to the forwarder, skipping FastAPI's
    routing, dependency injection and middleware on the path every proxied call takes."""

    forwarder: Forwarder | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http" and scope["method"] == "POST" and self.forwarder is not None:
            path = scope["path"]
            root = scope.get("root_path")
            if root and path.startswith(root):
                path = path[len(root) :]
            provider = CAPTURE_ROUTES.get(path)
            if provider is not None:
                await self.forwarder(scope, receive, send, provider)
                return
        await super().__call__(scope, receive, send)


async def tenant_of(request: Request) -> Tenant:
    """The tenant whose kolm key the request carries; 401 when there is none or it is unknown."""
    keys: KeyCache = request.app.state.keys
    return await keys.tenant_of(request.headers)


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
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    remove_tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)


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


def create_app(settings: Settings, store: CaptureStore, config: CaptureConfig | None = None) -> CaptureApp:
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
    keys = KeyCache(store, config.key_cache_ttl_s)
    forwarder = Forwarder(settings, config, keys, recorder)

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
        await forwarder.start()
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
            await forwarder.close()

    app = CaptureApp(title="kolm capture proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.forwarder = forwarder
    app.state.settings = settings
    app.state.store = store
    app.state.recorder = recorder
    app.state.keys = keys

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
        return None if namespace is None else parse_namespace(namespace)

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
        tag: Annotated[str | None, Query(max_length=MAX_TAG_LENGTH)] = None,
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
        rules = await asyncio.to_thread(store.rules, tenant.name, parse_namespace(namespace))
        return {
            "rules": [{"id": r.id, "action": r.action, "match": r.match, "created_by": r.created_by} for r in rules]
        }

    @app.post("/v1/namespaces/{namespace}/rules")
    async def add_rule(namespace: str, body: RuleBody, tenant: InboxTenant) -> dict[str, Any]:
        namespace = parse_namespace(namespace)
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
        return {"applied": await asyncio.to_thread(store.apply_rules, tenant.name, parse_namespace(namespace))}

    @app.get("/v1/namespaces/{namespace}/status")
    async def status(namespace: str, tenant: InboxTenant) -> dict[str, Any]:
        return await asyncio.to_thread(store.status, tenant.name, parse_namespace(namespace))

    @app.post("/v1/namespaces/{namespace}/switches")
    async def switches(namespace: str, body: SwitchesBody, tenant: InboxTenant) -> dict[str, Any]:
        namespace = parse_namespace(namespace)
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
        namespace = parse_namespace(namespace)

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
        namespace = parse_namespace(namespace)
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
