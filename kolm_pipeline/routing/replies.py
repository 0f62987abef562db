"""The student's answer in the shape the client's SDK expects from its provider: an OpenAI chat completion or an
Anthropic message, whole or as the provider's event stream. The model name is the one the client asked for;
`x-kolm-served-by` says which adapter really answered."""

from __future__ import annotations

import json
import time
from typing import Any

from kolm_pipeline.routing.student_client import StudentReply


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def openai_reply(request_id: str, model: str, reply: StudentReply, stream: bool) -> tuple[bytes, bytes]:
    """(body, content type) of an OpenAI chat completion answering with `reply`."""
    base = {"id": f"chatcmpl-kolm-{request_id}", "created": int(time.time()), "model": model,
            "system_fingerprint": reply.cid}
    usage = None
    if isinstance(reply.prompt_tokens, int) and isinstance(reply.completion_tokens, int):
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}
    if not stream:
        body = {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": "stop"}], "usage": usage}
        return json.dumps(body).encode(), b"application/json"
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [
        _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}),
        _sse({**chunk, "choices": [{"index": 0, "delta": {"content": reply.text}, "finish_reason": None}]}),
        _sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ]
    if usage is not None:
        events.append(_sse({**chunk, "choices": [], "usage": usage}))
    return b"".join(events) + b"data: [DONE]\n\n", b"text/event-stream"


def anthropic_reply(request_id: str, model: str, reply: StudentReply, stream: bool) -> tuple[bytes, bytes]:
    """(body, content type) of an Anthropic message answering with `reply`."""
    usage = {"input_tokens": reply.prompt_tokens or 0, "output_tokens": reply.completion_tokens or 0}
    message = {"id": f"msg_kolm_{request_id}", "type": "message", "role": "assistant", "model": model,
               "stop_reason": "end_turn", "stop_sequence": None}
    if not stream:
        body = {**message, "content": [{"type": "text", "text": reply.text}], "usage": usage}
        return json.dumps(body).encode(), b"application/json"
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 0}}
    events = [
        _sse({"type": "message_start", "message": start}, "message_start"),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
             "content_block_start"),
        _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": reply.text}},
             "content_block_delta"),
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
              "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta"),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return b"".join(events), b"text/event-stream"


REPLIES = {"openai": openai_reply, "anthropic": anthropic_reply}
