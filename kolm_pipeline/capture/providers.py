"""What the proxy needs to know about each upstream API: where to forward, which headers, and how to
read the request's messages, the output text and the token usage from plain and SSE-streamed replies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kolm_pipeline.provenance import jsontext
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.settings import Settings

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


class RequestError(UserError, ValueError):
    """The client's request body cannot be proxied or recorded."""


@dataclass(slots=True)
class Completion:
    """A reply's text and token counts. Not frozen: the capture writer reads one per proxied call, and a
    frozen dataclass's `__init__` pays a guarded `object.__setattr__` per field."""

    output_text: str
    prompt_tokens: int | None
    completion_tokens: int | None


def _int_or_none(value: Any) -> int | None:
    """A token count: an int, never a bool (JSON gives no other int subclass)."""
    return value if type(value) is int else None


def _loads(data: str) -> Any:
    try:
        return jsontext.loads_replies(data)
    except ValueError:
        return None


def text_of(content: Any, separator: str) -> str:
    """Text of a message content given as a string or as a list of typed blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return separator.join(
            block["text"]
            for block in content
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        )
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a list of message objects")
    return messages


class SSEParser:
    """Incremental server-sent-events parser: feed raw byte chunks, get complete (event, data) pairs."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        events = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:  # the usual block: one data line
                events.append(("message", block[6:].decode("utf-8", errors="replace")))
                continue
            event, data = "message", []
            for line in block.decode("utf-8", errors="replace").split("\n"):
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
            if data:
                events.append((event, "\n".join(data)))
        return events


class StreamState:
    """What a stream has told so far; `complete` only once the provider's end marker arrived."""

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._parts: list[str] = []
        self.complete = False
        self.failed = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, chunk: bytes) -> None:
        for event, data in self._parser.feed(chunk):
            self.on_event(event, data)

    def on_event(self, event: str, data: str) -> None:
        raise NotImplementedError


class OpenAIStream(StreamState):
    """Chat-completion chunks; the stream ends with `data: [DONE]`. Only the first choice is recorded."""

    def on_event(self, event: str, data: str) -> None:
        if data.strip() == "[DONE]":
            self.complete = True
            return
        chunk = _loads(data)
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            self.failed = True
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                content = (choice.get("delta") or {}).get("content")
                if isinstance(content, str):
                    self._parts.append(content)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
            self.completion_tokens = _int_or_none(usage.get("completion_tokens"))


class AnthropicStream(StreamState):
    """Messages events: message_start, content_block_delta, message_delta, message_stop (or error)."""

    def on_event(self, event: str, data: str) -> None:
        payload = _loads(data)
        if not isinstance(payload, dict):
            return
        kind = payload.get("type", event)
        if kind == "message_start":
            usage = (payload.get("message") or {}).get("usage") or {}
            self.prompt_tokens = _int_or_none(usage.get("input_tokens"))
            self.completion_tokens = _int_or_none(usage.get("output_tokens"))
        elif kind == "content_block_delta":
            delta = payload.get("delta") or {}
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                self._parts.append(delta["text"])
        elif kind == "message_delta":
            usage = payload.get("usage") or {}
            if _int_or_none(usage.get("input_tokens")) is not None:
                self.prompt_tokens = usage["input_tokens"]
            if _int_or_none(usage.get("output_tokens")) is not None:
                self.completion_tokens = usage["output_tokens"]
        elif kind == "message_stop":
            self.complete = True
        elif kind == "error":
            self.failed = True


class Provider:
    """One upstream API; subclasses fill in the provider-specific parts."""

    name: str
    passthrough_headers: tuple[str, ...] = ()

    def upstream_url(self, settings: Settings) -> str:
        raise NotImplementedError

    def upstream_headers(self, client_headers: Any, upstream_key: str) -> dict[str, str]:
        raise NotImplementedError

    def messages(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def completion(self, body: Any) -> Completion:
        raise NotImplementedError

    def new_stream(self) -> StreamState:
        raise NotImplementedError

    def _passthrough(self, client_headers: Any) -> dict[str, str]:
        return {name: client_headers[name] for name in self.passthrough_headers if name in client_headers}


class OpenAIProvider(Provider):
    """OpenAI chat completions (`POST {upstream_openai}/chat/completions`)."""

    name = "openai"
    passthrough_headers = ("accept", "openai-organization", "openai-project", "openai-beta")

    def upstream_url(self, settings: Settings) -> str:
        return settings.upstream_openai.rstrip("/") + "/chat/completions"

    def upstream_headers(self, client_headers: Any, upstream_key: str) -> dict[str, str]:
        return {
            **self._passthrough(client_headers),
            "content-type": "application/json",
            "authorization": f"Bearer {upstream_key}",
        }

    def messages(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return _messages(body)

    def completion(self, body: Any) -> Completion:
        if not isinstance(body, dict):
            return Completion("", None, None)
        choices = body.get("choices")
        first = choices[0] if type(choices) is list and choices else None
        message = first.get("message") if type(first) is dict else None
        content = message.get("content") if type(message) is dict else None
        usage = body.get("usage")
        if type(usage) is not dict:
            return Completion(content if type(content) is str else "", None, None)
        return Completion(
            content if type(content) is str else "",
            _int_or_none(usage.get("prompt_tokens")),
            _int_or_none(usage.get("completion_tokens")),
        )

    def new_stream(self) -> StreamState:
        return OpenAIStream()


class AnthropicProvider(Provider):
    """Anthropic messages (`POST {upstream_anthropic}/v1/messages`); the system prompt is recorded as
    a leading system message so both providers give the same chat format."""

    name = "anthropic"
    passthrough_headers = ("accept", "anthropic-beta")

    def upstream_url(self, settings: Settings) -> str:
        return settings.upstream_anthropic.rstrip("/") + "/v1/messages"

    def upstream_headers(self, client_headers: Any, upstream_key: str) -> dict[str, str]:
        return {
            **self._passthrough(client_headers),
            "content-type": "application/json",
            "anthropic-version": client_headers.get("anthropic-version") or DEFAULT_ANTHROPIC_VERSION,
            "x-api-key": upstream_key,
        }

    def messages(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = _messages(body)
        system = body.get("system")
        if system is None:
            return messages
        if not isinstance(system, str | list):
            raise RequestError("'system' must be a string or a list of text blocks")
        return [{"role": "system", "content": text_of(system, "\n")}, *messages]

    def completion(self, body: Any) -> Completion:
        if not isinstance(body, dict):
            return Completion("", None, None)
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return Completion(
            text_of(body.get("content"), ""),
            _int_or_none(usage.get("input_tokens")),
            _int_or_none(usage.get("output_tokens")),
        )

    def new_stream(self) -> StreamState:
        return AnthropicStream()


OPENAI = OpenAIProvider()
ANTHROPIC = AnthropicProvider()
PROVIDERS: dict[str, Provider] = {OPENAI.name: OPENAI, ANTHROPIC.name: ANTHROPIC}
