"""The stand-in teacher: a tiny OpenAI- and Anthropic-compatible server that stands in for the frontier
API in the demo and the tests, so the whole loop runs offline.

It answers from a fixed table keyed by the last user message, streams like the real APIs do, and
reports approximate token usage. Point the proxy at it with `KOLM_UPSTREAM_OPENAI=<url>/v1` and
`KOLM_UPSTREAM_ANTHROPIC=<url>`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

UNKNOWN_ANSWER = "unknown"
STREAM_PIECES = 4


def approx_tokens(text: str) -> int:
    """Rough token count: words × 1.3, rounded."""
    return round(len(text.split()) * 1.3)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block.get("text", "")
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content")).strip()
    return ""


def _pieces(text: str) -> list[str]:
    """Split an answer into a few stream chunks (fewer only when the text is shorter than that)."""
    if not text:
        return []
    size = math.ceil(len(text) / STREAM_PIECES)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _has_key(request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return bool(
        (scheme.lower() == "bearer" and token.strip()) or request.headers.get("x-api-key", "").strip()
    )


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


def create_teacher_app(answers: dict[str, str], latency_s: float = 0.0) -> FastAPI:
    """The stand-in teacher. `latency_s` is waited once per plain answer and between stream chunks."""
    app = FastAPI(title="kolm stand-in teacher")

    async def read_request(request: Request) -> tuple[dict[str, Any], str, int] | None:
        """The body, the answer and the prompt's token count; None when the body is not a JSON object."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("messages", []), list):
            return None
        messages = body.get("messages") or []
        answer = answers.get(_last_user_text(messages), UNKNOWN_ANSWER)
        prompt = " ".join(_text(m.get("content")) for m in messages if isinstance(m, dict))
        prompt = f"{_text(body.get('system'))} {prompt}"
        return body, answer, approx_tokens(prompt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if not _has_key(request):
            error = {"message": "missing API key", "type": "invalid_request_error", "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401)
        parsed = await read_request(request)
        if parsed is None:
            error = {
                "message": "body must be a JSON object with a messages list",
                "type": "invalid_request_error",
            }
            return JSONResponse({"error": error}, status_code=400)
        body, answer, prompt_tokens = parsed
        model = body.get("model", "teacher")
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": approx_tokens(answer),
            "total_tokens": prompt_tokens + approx_tokens(answer),
        }
        if not body.get("stream"):
            await asyncio.sleep(latency_s)
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                }
            )

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for piece in _pieces(answer):
                await asyncio.sleep(latency_s)
                yield chunk({"content": piece})
            yield chunk({}, "stop")
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        if not _has_key(request):
            error = {"type": "authentication_error", "message": "missing API key"}
            return JSONResponse({"type": "error", "error": error}, status_code=401)
        parsed = await read_request(request)
        if parsed is None:
            error = {
                "type": "invalid_request_error",
                "message": "body must be a JSON object with a messages list",
            }
            return JSONResponse({"type": "error", "error": error}, status_code=400)
        body, answer, input_tokens = parsed
        model = body.get("model", "teacher")
        message_id = f"msg_{uuid.uuid4().hex}"
        output_tokens = approx_tokens(answer)
        if not body.get("stream"):
            await asyncio.sleep(latency_s)
            return JSONResponse(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": answer}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
                }
            )

        async def events() -> AsyncIterator[bytes]:
            start = {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            }
            yield _sse({"type": "message_start", "message": start}, "message_start")
            block_start = {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
            yield _sse(block_start, "content_block_start")
            yield _sse({"type": "ping"}, "ping")
            for piece in _pieces(answer):
                await asyncio.sleep(latency_s)
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                }
                yield _sse(delta, "content_block_delta")
            yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            message_delta = {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            }
            yield _sse(message_delta, "message_delta")
            yield _sse({"type": "message_stop"}, "message_stop")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
