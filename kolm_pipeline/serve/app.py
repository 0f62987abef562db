"""OpenAI-compatible `/v1/chat/completions` in front of the serving runtime; `model` names the task."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from kolm_pipeline.serve.runtime import ServingRuntime, UnknownTask
from kolm_pipeline.settings import Settings


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def create_serving_app(settings: Settings, runtime: ServingRuntime | None = None) -> FastAPI:
    runtime = runtime or ServingRuntime(settings)
    app = FastAPI(title="kolm serving runtime")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "invalid_request_error", "body is not valid JSON")
        task, messages = body.get("model"), body.get("messages")
        if not isinstance(task, str) or not isinstance(messages, list) or not messages:
            return _error(400, "invalid_request_error", "`model` (the task) and a non-empty `messages` are required")
        try:
            text, adapter = await run_in_threadpool(
                runtime.complete, task, messages, int(body.get("max_tokens") or 128)
            )
        except UnknownTask as exc:
            return _error(404, "not_found_error", str(exc))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {"x-kolm-adapter-cid": adapter.cid}
        if body.get("stream"):
            def events():
                base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": task}
                first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                              "finish_reason": None}]}
                last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(first)}\n\n"
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": task,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
            headers=headers,
        )

    return app
