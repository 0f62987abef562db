"""The corpus: kept pairs turned into chat-format JSONL with a content identifier.

Source gate: only pairs a person or an explicit rule kept are used, an explicit feedback correction
replaces the answer it corrects (the store already returns it as the output), and answers produced by
kolm's own served adapters are excluded always, so a student never trains on itself.

Dedup, in this order: exact duplicates of a request (normalised text; the newest answer wins, so a later
correction or a changed teacher takes over), then near-duplicates (MinHash, see dedup.py) that carry the
same answer, keeping the earliest. The bytes depend only on the pairs, so the Dagster asset and the
`GET /v1/labels/synthesize-corpus` route produce the same corpus and CID.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

from kolm_pipeline.corpus.dedup import NEAR_DUPLICATE_JACCARD, NearDuplicateIndex
from kolm_pipeline.corpus.text import intent_text, normalise, template_messages
from kolm_pipeline.registry.cid import cid_for_bytes

SERVED_TAG = "kolm-served"

__all__ = ["SERVED_TAG", "CorpusError", "CorpusStats", "build_corpus", "corpus_cid", "input_key", "normalise",
           "read_corpus"]


class CorpusError(ValueError):
    """A corpus file is malformed; the message names the file and line."""


class PairLike(Protocol):
    id: int
    messages: list[dict]
    output: str
    model: str
    latency_us: int
    prompt_tokens: int | None
    completion_tokens: int | None
    tags: list[str]


@dataclass(frozen=True)
class CorpusStats:
    """Counts behind a corpus, shown as asset metadata (every field an int).

    `duplicates_dropped` is exact plus near duplicates, so written + every *_dropped + excluded_served
    adds up to kept_pairs."""

    kept_pairs: int
    excluded_served: int
    duplicates_dropped: int
    exact_duplicates_dropped: int
    near_duplicates_dropped: int
    empty_dropped: int
    unsupported_dropped: int
    written: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def input_key(messages: list[dict]) -> str:
    """A conversation's identity for dedup and split bookkeeping."""
    return "\n".join(f"{m.get('role')}:{normalise(str(m.get('content', '')))}" for m in messages)


def text_content(content: object) -> str | None:
    """A message's content as plain text: strings as they are, OpenAI/Anthropic content-part lists joined
    when every part is text; None for anything a text student cannot learn from (images, tool calls)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") and isinstance(
                part.get("text"), str
            ):
                texts.append(part["text"])
            else:
                return None
        return "\n".join(texts)
    return None


def _plain_messages(messages: object) -> list[dict] | None:
    """Messages reduced to {role, content} text, or None when the conversation is not text-only."""
    if not isinstance(messages, list) or not messages:
        return None
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = text_content(message.get("content"))
        if content is None:
            return None
        plain.append({"role": message["role"], "content": content})
    return plain


def build_corpus(
    pairs: list[PairLike], near_duplicate_threshold: float | None = NEAR_DUPLICATE_JACCARD
) -> tuple[bytes, CorpusStats]:
    """Deterministic JSONL bytes, ordered by capture id. `near_duplicate_threshold=None` turns the
    near-duplicate pass off (exact dedup always runs)."""
    served = empty = unsupported = 0
    by_input: dict[str, tuple[PairLike, list[dict]]] = {}
    for pair in sorted(pairs, key=lambda p: p.id):
        if SERVED_TAG in pair.tags:
            served += 1
            continue
        if not isinstance(pair.output, str) or not pair.output.strip():
            empty += 1
            continue
        messages = _plain_messages(pair.messages)
        if messages is None:
            unsupported += 1
            continue
        by_input[input_key(messages)] = (pair, messages)
    unique = sorted(by_input.values(), key=lambda item: item[0].id)
    exact = len(pairs) - served - empty - unsupported - len(unique)

    kept = unique
    if near_duplicate_threshold is not None:
        template = template_messages(messages for _, messages in unique)
        index = NearDuplicateIndex(near_duplicate_threshold)
        kept = [
            (pair, messages)
            for pair, messages in unique
            if index.add(intent_text(messages, template), group=normalise(pair.output))
        ]
    lines = []
    for pair, messages in kept:
        row = {
            "messages": [*messages, {"role": "assistant", "content": pair.output}],
            "meta": {
                "capture_id": pair.id,
                "model": pair.model,
                "latency_us": pair.latency_us,
                "prompt_tokens": pair.prompt_tokens or 0,
                "completion_tokens": pair.completion_tokens or 0,
            },
        }
        lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True))
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    near = len(unique) - len(kept)
    stats = CorpusStats(
        kept_pairs=len(pairs),
        excluded_served=served,
        duplicates_dropped=exact + near,
        exact_duplicates_dropped=exact,
        near_duplicates_dropped=near,
        empty_dropped=empty,
        unsupported_dropped=unsupported,
        written=len(lines),
    )
    return data, stats


def corpus_cid(data: bytes) -> str:
    return cid_for_bytes(data)


def read_corpus(data: bytes, source: str = "corpus.jsonl") -> list[dict]:
    """Rows of corpus bytes; a malformed line is refused, naming `source` and the line number."""
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{source}:{number}: not valid JSON ({exc.msg})") from exc
        messages = row.get("messages") if isinstance(row, dict) else None
        if (
            not isinstance(messages, list)
            or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "assistant"
        ):
            raise CorpusError(f"{source}:{number}: expected {{'messages': [..., {{'role': 'assistant', ...}}]}}")
        rows.append(row)
    return rows
