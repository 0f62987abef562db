"""The capture proxy's client of `kolm serve`: asks a namespace's deployed adapter (the student) for its answer
to a proxied request, over the serving runtime's OpenAI-compatible API, with the caller's own kolm key.

Any failure (runtime down, a timeout, no adapter deployed, a conversation it cannot render) is `None`: the
teacher answers instead and no client request fails because of the student."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from kolm_pipeline.capture.providers import text_of

log = logging.getLogger(__name__)

MAX_STUDENT_TOKENS = 4096  # `kolm serve` refuses more (serve/app.py MAX_TOKENS_LIMIT)
DEFAULT_STUDENT_TOKENS = 256


@dataclass(frozen=True)
class StudentReply:
    """The adapter's answer: text, how sure it was (0–1), which adapter, what kind of answer, token counts."""

    text: str
    confidence: float
    cid: str
    kind: str
    latency_us: int
    prompt_tokens: int | None
    completion_tokens: int | None


def student_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]] | None:
    """The conversation as plain-text chat messages, or None when it holds what the student cannot read
    (images, tool calls: anything but text)."""
    plain = []
    for message in messages:
        content = message.get("content")
        if not isinstance(message.get("role"), str):
            return None
        if isinstance(content, list) and any(not isinstance(b, dict) or b.get("type") != "text" for b in content):
            return None
        if not isinstance(content, str | list):
            return None
        plain.append({"role": message["role"], "content": text_of(content, "")})
    return plain or None


# Request fields the student cannot honour (tools, several choices, log-probabilities, another output format):
# such a request is the teacher's alone, and is not compared.
_TEACHER_ONLY = ("tools", "functions", "tool_choice", "function_call", "response_format", "logprobs", "top_logprobs")


def student_can_answer(body: dict[str, Any]) -> bool:
    return not any(body.get(name) for name in _TEACHER_ONLY) and body.get("n") in (None, 1)


def max_tokens_of(body: dict[str, Any]) -> int:
    """The client's answer budget (OpenAI `max_completion_tokens`/`max_tokens`, Anthropic `max_tokens`)."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return DEFAULT_STUDENT_TOKENS
    return min(value, MAX_STUDENT_TOKENS)


class StudentClient:
    """One aiohttp session to the serving runtime at `url`; `timeout` seconds per answer at most."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # As many connections as the proxy's upstream pool: waiting for one would eat into the student's timeout.
        self._session = aiohttp.ClientSession(
            # Idle connections closed before uvicorn's 5 s keep-alive closes them under a request.
            connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout), cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, task: str, messages: list[dict[str, str]], max_tokens: int,
                  kolm_key: str) -> StudentReply | None:
        if self._session is None:
            return None
        began = time.perf_counter_ns()
        try:
            async with self._session.post(
                f"{self.url}/v1/chat/completions",
                json={"model": task, "messages": messages, "max_tokens": max_tokens},
                headers={"authorization": f"Bearer {kolm_key}"},
            ) as response:
                if response.status != 200:
                    log.info("student of %s answered %s: the teacher answers", task, response.status)
                    return None
                body = await response.json()
                headers = response.headers
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("student of %s unavailable (%s): the teacher answers", task, type(exc).__name__)
            return None
        try:
            text = body["choices"][0]["message"]["content"]
            confidence = float(headers.get("x-kolm-confidence", "nan"))
            cid = headers["x-kolm-adapter-cid"]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        if not isinstance(text, str) or not 0.0 <= confidence <= 1.0:  # (nan fails both comparisons)
            return None
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return StudentReply(
            text=text, confidence=confidence, cid=cid, kind=headers.get("x-kolm-answer-kind", "text"),
            latency_us=(time.perf_counter_ns() - began) // 1000,
            prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
        )
