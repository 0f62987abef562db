"""The corpus: kept pairs turned into chat-format JSONL with a content identifier.

Source gate: only pairs a person or an explicit rule kept are used, an explicit feedback correction
replaces the answer it corrects (the store already returns it as the output), and answers produced by
kolm's own served adapters are excluded always, so a student never trains on itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Protocol

from kolm_pipeline.registry.cid import cid_for_bytes

SERVED_TAG = "kolm-served"
_SPACE = re.compile(r"\s+")


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
    """Counts behind a corpus, shown as asset metadata."""

    kept_pairs: int
    excluded_served: int
    duplicates_dropped: int
    empty_dropped: int
    written: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used for exact dedup."""
    return _SPACE.sub(" ", text).strip().lower()


def input_key(messages: list[dict]) -> str:
    """A conversation's identity for dedup and split bookkeeping."""
    return "\n".join(f"{m.get('role')}:{normalise(str(m.get('content', '')))}" for m in messages)


def build_corpus(pairs: list[PairLike]) -> tuple[bytes, CorpusStats]:
    """Deterministic JSONL bytes (ordered by capture id; the newest answer wins on duplicate inputs)."""
    served = empty = 0
    by_input: dict[str, PairLike] = {}
    for pair in sorted(pairs, key=lambda p: p.id):
        if SERVED_TAG in pair.tags:
            served += 1
            continue
        if not pair.output.strip():
            empty += 1
            continue
        by_input[input_key(pair.messages)] = pair
    usable = len(pairs) - served - empty
    lines = []
    for pair in sorted(by_input.values(), key=lambda p: p.id):
        row = {
            "messages": [*pair.messages, {"role": "assistant", "content": pair.output}],
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
    stats = CorpusStats(
        kept_pairs=len(pairs),
        excluded_served=served,
        duplicates_dropped=usable - len(by_input),
        empty_dropped=empty,
        written=len(lines),
    )
    return data, stats


def corpus_cid(data: bytes) -> str:
    return cid_for_bytes(data)


def read_corpus(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
