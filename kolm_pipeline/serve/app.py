"""OpenAI-compatible ``/v1/chat/completions`` (streaming and not) in front of the serving runtime.

``model`` names the task; the answer comes from the task's active adapter, whose artifact CID is
returned in the ``x-kolm-adapter-cid`` header and as ``system_fingerprint``. ``usage`` counts the prompt and
answer tokens as the backend's tokenizer does (streamed: in a last chunk, when ``stream_options.include_usage``
asks for it, as OpenAI streams it). A task the caller cannot call answers 404 listing the tasks its tenant can.

``POST /v1/feedback`` takes a verdict on a served answer (by its completion ``id``) and ``GET /v1/monitor``
shows each task's live score against its evaluated score (see ``serve/monitor.py``). A non-streamed answer says
how sure the adapter was of it in ``x-kolm-confidence`` (what the capture proxy's student routing reads).

Every route but ``/healthz`` needs a tenant's kolm key, sent as the client's API key (the OpenAI SDK's
``api_key``), checked against the capture store's hashed keys as the capture proxy does. A key sees and calls
only the tasks whose artifact its tenant signed; feedback counts only from the key a completion was served to,
once per completion. Anything else answers 404, as an unknown task or id does, so a caller cannot probe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from kolm_pipeline.capture.forward import ApiError, KeyCache
from kolm_pipeline.capture.images import ImageError, check_images
from kolm_pipeline.serve.backends import BackendError
from kolm_pipeline.serve.monitor import Cut
from kolm_pipeline.serve.runtime import ServingRuntime, UnknownTask
from kolm_pipeline.store import CaptureStore

log = logging.getLogger("kolm.serve")
MAX_TOKENS_LIMIT = 4096
# max_tokens of a request that names none, for an adapter whose manifest carries no max_new_tokens (made before
# session 14): the task's own room otherwise.
DEFAULT_MAX_TOKENS = 128
# On a non-streamed answer: how sure the adapter was of it, 0–1 (a label: the constrained decoder's path
# probability; generated text: the geometric mean of its token probabilities). Student routing reads it.
CONFIDENCE_HEADER = "x-kolm-confidence"
# What kind of answer the adapter gives (`label`, `json` or `text`): how routing compares it with the teacher's.
ANSWER_KIND_HEADER = "x-kolm-answer-kind"
MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this answers 413 before it is read whole
_DONE = object()


class BadRequest(Exception):
    """The request body is not a chat completion request this server can answer."""


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


@dataclass(frozen=True)
class ChatRequest:
    task: str
    messages: list[dict]
    max_tokens: int | None  # None: the request named none (the task's default applies)
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage, as OpenAI streams it


def _image_parts(index: int, content: Any) -> bool:
    """Whether `content` is a list of text and image parts (BadRequest for any other list, and for an image given
    by URL: the server never fetches an address a caller chose)."""
    if not isinstance(content, list) or not content:
        return False
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image_url") or (kind == "text" and not isinstance(part.get("text"), str)):
            raise BadRequest(f"messages[{index}].content[{position}] must be a text or image_url part")
        holder = part.get("image_url") if kind == "image_url" else None
        url = holder.get("url") if isinstance(holder, dict) else holder
        if kind == "image_url" and not (isinstance(url, str) and url.startswith("data:")):
            raise BadRequest(f"messages[{index}].content[{position}]: send the image's bytes as a base64 data: URL "
                             "(this server never fetches an image URL)")
    return True


def _parse(body: Any, images: bool = False) -> ChatRequest:
    """The chat completion request in a body, or BadRequest saying what is wrong. With `images` (a
    vision-language base), a message's content may be a list of text and `image_url` parts."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    task, messages = body.get("model"), body.get("messages")
    if not isinstance(task, str) or not task:
        raise BadRequest("`model` must name the task")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with string `role` and `content`")
        if isinstance(message.get("content"), str):
            continue
        if not _image_parts(index, message.get("content")):
            raise BadRequest(f"messages[{index}] must be an object with string `role` and `content`")
        if not images:
            raise BadRequest(f"messages[{index}]: this server's base model reads text only; send `content` as a "
                             "string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
        raise BadRequest(f"`max_tokens` must be an integer from 1 to {MAX_TOKENS_LIMIT}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("`stream_options` must be an object whose `include_usage` is true or false")
    include_usage = stream and options.get("include_usage", False)  # a plain completion always has usage
    clean = [{"role": message["role"], "content": message["content"]} for message in messages]
    try:
        check_images(clean)  # an inline image must be one: a 400 naming the part, before any model work
    except ImageError as exc:
        raise BadRequest(str(exc)) from None
    return ChatRequest(task, clean, max_tokens, stream, include_usage)


def _usage(counted: dict) -> dict | None:
    """OpenAI's ``usage`` from what the backend counted; None when it could not count."""
    if not all(isinstance(counted.get(key), int) for key in ("prompt_tokens", "completion_tokens")):
        return None
    prompt, completion = counted["prompt_tokens"], counted["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _nameless(reason: str, task: str) -> str:
    """``reason`` with the task's name and its tenant's replaced, for an unauthenticated reader."""
    tenant = task.split(".", 1)[0]
    return re.sub(rf"(?<![\w-]){re.escape(tenant)}(?![\w-])", "<tenant>", reason.replace(task, "<task>"))


def _parse_feedback(body: Any) -> tuple[str, bool]:
    """(completion id, judged good) from ``{"id", "rating": 1 | -1}`` or ``{"id", "correct": bool}``."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    response_id = body.get("id")
    if not isinstance(response_id, str) or not response_id:
        raise BadRequest("`id` must be the `id` of a chat completion this server returned")
    rating, correct = body.get("rating"), body.get("correct")
    if (rating is None) == (correct is None):
        raise BadRequest("give exactly one of `rating` (1 or -1) and `correct` (true or false)")
    if rating is not None:
        if isinstance(rating, bool) or rating not in (1, -1):
            raise BadRequest("`rating` must be 1 (good) or -1 (bad)")
        return response_id, rating == 1
    if not isinstance(correct, bool):
        raise BadRequest("`correct` must be true or false")
    return response_id, correct


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant of the kolm key, and a digest of the key itself (`owner` of what it is served)."""

    tenant: str
    owner: str


async def _caller(keys: KeyCache, request: Request) -> Caller:
    """The caller's tenant and key digest; `ApiError` 401 without a known kolm key."""
    tenant, owner = await keys.authenticate(request.headers)
    return Caller(tenant.name, owner)


async def _json_body(request: Request, limit: int) -> Any:
    """The request's JSON body, read at most `limit` bytes far: 413 past it, 400 for what is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_request_error", "the body is not valid JSON") from None


def _cut(own_room: bool, counted: dict) -> Cut | None:
    """How the answer was cut short, for the live monitor: ``"room"`` (out of the task's own room), ``"client"``
    (to the ``max_tokens`` the request named), or None (it ended by itself)."""
    if counted.get("finish_reason") != "length":
        return None
    return "room" if own_room else "client"


def create_serving_app(runtime: ServingRuntime, store: CaptureStore | None = None,
                       key_cache_ttl_s: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP face of ``runtime``; the runtime starts (base model, adapters, watcher) with the app. Kolm keys
    are checked against ``store`` (by default the capture store the runtime's settings name)."""
    keys = KeyCache(store or CaptureStore(runtime.settings.store_url), key_cache_ttl_s)

    def visible(caller: Caller, task: str) -> bool:
        return runtime.tenant_of(task) == caller.tenant

    def not_found(caller: Caller, message: str) -> JSONResponse:
        """A task that is not the caller's to call: the message lists the tasks its tenant can call, never
        another tenant's (so a task of another tenant reads exactly as one that does not exist)."""
        own = sorted(task for task, info in runtime.status()["tasks"].items() if info["tenant"] == caller.tenant)
        listed = f"your tasks: {', '.join(own)}" if own else "no task is deployed for your tenant yet"
        return JSONResponse({"error": {"type": "not_found_error", "code": "model_not_found", "param": "model",
                                       "message": f"{message}; {listed}", "available_tasks": own}},
                            status_code=404)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(runtime.start)
        yield
        await run_in_threadpool(runtime.stop)

    app = FastAPI(title="kolm serving runtime", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.type, exc.message)

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness for orchestrators: how many tasks are served, draining or refused, why each refused artifact
        was refused (its CID and the reason: what an operator needs when a replica lags behind the registry), and
        where the base model runs (``runs_on``: "cpu float32", "cuda bfloat16", "vllm") and with how many torch
        threads its decoding passes run (``threads``; null for vLLM and the vision backend). No tenant or task names:
        this route needs no key."""
        status = runtime.status()
        return {"ok": True, "runs_on": runtime.backend.placement, "threads": getattr(runtime.backend, "threads", None)
                or None,
                **{part: len(status[part]) for part in ("tasks", "draining", "refused")},
                "refusals": [{"cid": refusal["cid"], "reason": _nameless(refusal["reason"], task)}
                             for task, refusal in status["refused"].items()]}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        caller = await _caller(keys, request)
        tasks = runtime.status()["tasks"]
        return {"object": "list", "data": [
            {"id": task, "object": "model", "owned_by": "kolm", "kolm_adapter_cid": info["cid"]}
            for task, info in tasks.items() if info["tenant"] == caller.tenant
        ]}

    @app.get("/v1/monitor")
    async def monitor(request: Request) -> JSONResponse:
        caller = await _caller(keys, request)
        if runtime.monitor is None:
            return JSONResponse({"enabled": False, "tasks": {}})
        return JSONResponse({"enabled": True, **runtime.monitor.status(lambda task: visible(caller, task))})

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        caller = await _caller(keys, request)
        try:
            response_id, good = _parse_feedback(await _json_body(request, max_body_bytes))
        except BadRequest as exc:
            return _error(422, "invalid_request_error", str(exc))
        if runtime.monitor is None:
            return _error(503, "unavailable_error", "live monitoring is off on this server, so feedback is not kept")
        try:
            recorded = runtime.monitor.feedback(response_id, good, owner=caller.owner)
        except KeyError:
            return _error(404, "not_found_error", f"no served response {response_id!r} is remembered (unknown, or "
                                                  "older than the monitor keeps responses)")
        return JSONResponse({"id": response_id, "task": recorded["task"], "adapter_cid": recorded["cid"],
                             "recorded": "good" if good else "bad", "monitor": recorded["session"]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        caller = await _caller(keys, request)
        try:
            chat = _parse(await _json_body(request, max_body_bytes), getattr(runtime.backend, "accepts_images", False))
        except BadRequest as exc:
            return _error(400, "invalid_request_error", str(exc))
        task, messages, max_tokens, stream = chat.task, chat.messages, chat.max_tokens, chat.stream
        try:
            if runtime.tenant_of(task) not in (None, caller.tenant):  # another tenant's: as if it did not exist
                raise UnknownTask(f"no adapter is deployed for task {task!r}")
            deployed = runtime.peek(task)
        except UnknownTask as exc:
            return not_found(caller, str(exc))
        labels = deployed.labels
        own_room = max_tokens is None
        if own_room:  # the room the task's evaluation gave an answer
            max_tokens = min(MAX_TOKENS_LIMIT, deployed.max_new_tokens or DEFAULT_MAX_TOKENS)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def described(lease) -> tuple[dict, dict]:
            kind = "label" if lease.labels else "json" if lease.json_schema is not None else "text"
            headers = {"x-kolm-adapter-cid": lease.cid, "x-kolm-adapter": lease.name, ANSWER_KIND_HEADER: kind}
            return headers, {"id": completion_id, "created": created, "model": task, "system_fingerprint": lease.cid}

        def chunk(base: dict, delta: dict, finish: str | None) -> str:
            body = {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if chat.include_usage:
                body["usage"] = None  # as OpenAI streams it: null on every chunk but the last
            return f"data: {json.dumps(body)}\n\n"

        def usage_chunk(base: dict, counted: dict) -> list[str]:
            """The last chunk when the client asked for usage: no choices, the usage of the whole answer."""
            if not chat.include_usage:
                return []
            body = {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(counted)}
            return [f"data: {json.dumps(body)}\n\n"]

        def completion(base: dict, text: str, headers: dict, counted: dict) -> JSONResponse:
            return JSONResponse(
                {**base, "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": counted.get("finish_reason", "stop")}],
                 "usage": _usage(counted)},
                headers=headers,
            )

        async def counted_label(label: str) -> dict:
            count = getattr(runtime.backend, "count_tokens", None)
            if count is None:
                return {}
            try:
                return await run_in_threadpool(count, messages, label)
            except Exception:  # noqa: BLE001 - usage is a courtesy; never fail an answer already made
                log.exception("counting the tokens of a %s answer failed", task)
                return {}

        def acquire():
            """A lease on the task's adapter, only if the caller's tenant signed it (a swap may have happened)."""
            lease = runtime.acquire(task)
            if lease.adapter.tenant != caller.tenant:
                lease.release()
                raise UnknownTask(f"no adapter is deployed for task {task!r}")
            return lease

        check_prompt = getattr(runtime.backend, "check_prompt", None)
        if check_prompt is not None:
            try:
                await run_in_threadpool(check_prompt, messages, 1 if labels else max_tokens)
            except BackendError as exc:
                return _error(400, "invalid_request_error", str(exc))

        classify = getattr(runtime.backend, "classify", None)
        if labels and classify is not None:
            # Closed vocabulary: batched with the task's other waiting requests, bound to an adapter when run.
            try:
                answered = await run_in_threadpool(classify, task, messages, acquire)
            except UnknownTask as exc:
                return not_found(caller, str(exc))
            except BackendError as exc:
                return _error(502, "server_error", str(exc))
            if answered is not None:
                label, lease, confidence = answered
                headers, base = described(lease)
                if confidence is not None:
                    headers[CONFIDENCE_HEADER] = f"{confidence:.6f}"
                runtime.observe(task, lease.cid, completion_id, messages, label, caller.owner)
                counted = await counted_label(label) if (chat.include_usage or not stream) else {}
                if not stream:
                    return completion(base, label, headers, counted)
                events = [chunk(base, {"role": "assistant", "content": ""}, None),
                          chunk(base, {"content": label}, None), chunk(base, {}, "stop"),
                          *usage_chunk(base, counted), "data: [DONE]\n\n"]
                return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)
            # the task's new adapter has no label set: answer by generation below

        try:
            lease = acquire()
        except UnknownTask as exc:
            return not_found(caller, str(exc))
        headers, base = described(lease)
        counted: dict = {}

        if not stream:
            try:
                text = await run_in_threadpool(
                    lambda: "".join(runtime.backend.stream(lease.name, messages, lease.labels, max_tokens, counted,
                                                           json_schema=lease.json_schema))
                )
            except BackendError as exc:
                return _error(502, "server_error", str(exc))
            except Exception as exc:  # noqa: BLE001 - answer with the reason instead of a bare 500
                log.exception("completion for %s failed", task)
                return _error(500, "server_error", f"{type(exc).__name__}: {exc}")
            finally:
                lease.release()
            runtime.observe(task, lease.cid, completion_id, messages, text.strip(), caller.owner,
                            cut=_cut(own_room, counted))
            if isinstance(counted.get("confidence"), float):
                headers[CONFIDENCE_HEADER] = f"{counted['confidence']:.6f}"
            return completion(base, text.strip(), headers, counted)

        pieces = runtime.backend.stream(lease.name, messages, lease.labels, max_tokens, counted,
                                        json_schema=lease.json_schema)

        async def events() -> AsyncIterator[str]:
            # (the lease is also released if the client leaves before this generator ever starts: see below)
            streamed: list[str] = []
            try:
                yield chunk(base, {"role": "assistant", "content": ""}, None)
                while (piece := await run_in_threadpool(next, pieces, _DONE)) is not _DONE:
                    streamed.append(piece)
                    yield chunk(base, {"content": piece}, None)
                yield chunk(base, {}, counted.get("finish_reason", "stop"))
                for last in usage_chunk(base, counted):
                    yield last
                runtime.observe(task, lease.cid, completion_id, messages, "".join(streamed).strip(),
                                caller.owner, cut=_cut(own_room, counted))
            except Exception as exc:  # noqa: BLE001 - the status line is gone; report in the stream
                log.exception("streamed completion for %s failed", task)
                yield f"data: {json.dumps({'error': {'type': 'server_error', 'message': str(exc)}})}\n\n"
            finally:
                with contextlib.suppress(ValueError):  # still running in a worker thread after a disconnect
                    pieces.close()
                lease.release()
            yield "data: [DONE]\n\n"

        body = events()
        weakref.finalize(body, lease.release)
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    return app
