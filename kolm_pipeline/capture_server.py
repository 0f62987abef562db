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
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kolm_pipeline.capture.forward import (
    CAPTURE_ID_HEADER,
    ApiError,
    Forwarder,
    KeyCache,
    Receive,
    Scope,
    Send,
    parse_namespace,
)
from kolm_pipeline.capture.inbox import InboxTenant, StoreDep, not_found
from kolm_pipeline.capture.inbox import router as inbox_router
from kolm_pipeline.capture.providers import ANTHROPIC, OPENAI, PROVIDERS, Provider
from kolm_pipeline.capture.recorder import Recorder
from kolm_pipeline.corpus.build import build_corpus
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.routing.router import StudentRouter
from kolm_pipeline.routing.student_client import StudentClient
from kolm_pipeline.settings import CaptureConfig, Settings, load_capture_config
from kolm_pipeline.stages.retention import sweep_retention
from kolm_pipeline.store import CaptureStore

__all__ = ["CAPTURE_ID_HEADER", "CaptureApp", "create_app"]

logger = logging.getLogger(__name__)

CAPTURE_ROUTES: dict[str, Provider] = {
    "/v1/capture/openai/chat/completions": OPENAI,
    "/v1/capture/anthropic/v1/messages": ANTHROPIC,
}
_ENDPOINTS = {"openai": "chat/completions", "anthropic": "v1/messages"}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


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


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message)


async def _user_error(_request: Request, exc: UserError) -> JSONResponse:
    return error_response(400, "invalid_request_error", str(exc))


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
        for error in exc.errors()
    )
    return error_response(400, "invalid_request_error", problems or "invalid request")


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, type_, str(exc.detail))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error: %s", type(exc).__name__)
    return error_response(500, "internal_error", "internal server error")


# Every error is a JSON body `{"error": {"type", "message"}}`, as the providers' own APIs answer.
ERROR_HANDLERS = {
    ApiError: _api_error,
    UserError: _user_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    Exception: _unexpected,
}

server_router = APIRouter()


@server_router.api_route(
    "/v1/capture/{provider}/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
)
async def capture_other(provider: str, rest: str, request: Request) -> Response:
    if provider not in PROVIDERS:
        raise not_found(f"unknown provider {provider[:64]!r}: use one of {', '.join(PROVIDERS)}")
    if rest == _ENDPOINTS[provider]:
        raise ApiError(405, "invalid_request_error", f"{request.method} not allowed here; use POST")
    raise not_found(f"{provider} endpoint not captured: use /v1/capture/{provider}/{_ENDPOINTS[provider]}")


@server_router.get("/v1/labels/synthesize-corpus")
async def synthesize_corpus(namespace: str, tenant: InboxTenant, store: StoreDep) -> Response:
    namespace = parse_namespace(namespace)

    def build() -> bytes:
        return build_corpus(store.kept_pairs(tenant.name, namespace))[0]

    data = await asyncio.to_thread(build)
    return Response(
        data,
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="{tenant.name}.{namespace}.jsonl"'},
    )


def create_app(settings: Settings, store: CaptureStore, config: CaptureConfig | None = None) -> CaptureApp:
    """The proxy and inbox API over `store`, forwarding to the upstreams named in `settings`."""
    config = config or load_capture_config()
    recorder = (
        Recorder(
            store,
            settings.journal_dir,
            settings.quarantine_dir,
            legacy_spool=settings.spool_dir,
            batch_size=config.batch_size,
            poll_s=config.writer_poll_s,
            retry_interval=config.replay_interval_s,
            # Images go where artifacts and work products go (KOLM_ARTIFACTS_URL, default KOLM_HOME/artifacts).
            images_url=settings.artifacts_url,
            images_root=settings.artifacts_dir,
        )
        if config.record
        else None
    )
    keys = KeyCache(store, config.key_cache_ttl_s)
    router = (
        StudentRouter(store, StudentClient(config.serve_url, config.student_timeout_s),
                      refresh_s=config.routing_refresh_s, max_in_flight=config.shadow_concurrency)
        if config.serve_url
        else None
    )
    forwarder = Forwarder(settings, config, keys, recorder, router)

    async def sweep_periodically() -> None:
        while True:
            try:
                # The whole sweep (store, work files, quarantine), not only the store's rows: between distills
                # the work files would otherwise keep text past its window.
                sweep = await asyncio.to_thread(sweep_retention, settings, store)
                if sweep.expired:
                    logger.info("retention: expired %s", sweep.expired)
            except Exception as exc:
                logger.warning("retention sweep failed: %s", type(exc).__name__)
            await asyncio.sleep(config.retention_sweep_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await forwarder.start()
        if router is not None:
            await router.start()
        if recorder is not None:
            await recorder.start()
        sweeper = asyncio.create_task(sweep_periodically()) if config.retention_sweep_s > 0 else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with suppress(asyncio.CancelledError):
                    await sweeper
            if router is not None:
                await router.close()
            if recorder is not None:
                await recorder.stop()
            await forwarder.close()

    app = CaptureApp(title="kolm capture proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.forwarder = forwarder
    app.state.settings = settings
    app.state.store = store
    app.state.recorder = recorder
    app.state.keys = keys
    app.state.router = router

    for error_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error_type, handler)
    app.include_router(server_router)
    app.include_router(inbox_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    return app
