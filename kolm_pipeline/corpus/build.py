"""The corpus: kept pairs turned into chat-format JSONL with a content identifier.

Source gate: only pairs a person or an explicit rule kept are used, an explicit feedback correction
replaces the answer it corrects (the store already returns it as the output), and answers produced by
kolm's own served adapters are excluded always, so a student never trains on itself.

Dedup, in this order: exact duplicates of a request (normalised text; the newest answer wins, so a later
correction or a changed teacher takes over), then near-duplicates (MinHash, see dedup.py) that carry the
same answer, keeping the earliest. The bytes depend only on the pairs, so the Dagster asset and the
`GET /v1/labels/synthesize-corpus` route produce the same corpus and CID.

Pairs tagged `eval-candidate` are written too, marked `meta.eval_candidate` (rotation.py): they are deduped
among themselves only, so a training pair asking the same thing never pushes a candidate out; the recipe
keeps them out of training and removes the training pairs that overlap them (decontaminate.py).

A pair's provenance weight (the store's `KeptPair.weight`: a person's correction counts more than an AI
peer's answer) rides along as the row's top-level `"weight"`, written only when it is not 1.0, so a corpus
of ordinary captures keeps its bytes; the trainer reads `row.get("weight", 1.0)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Protocol

from kolm_pipeline.capture.images import PLACEHOLDER, placeholder, stored_digest
from kolm_pipeline.corpus.dedup import NEAR_DUPLICATE_JACCARD, NearDuplicateIndex
from kolm_pipeline.corpus.pairs import scan_pairs, weight_problem
from kolm_pipeline.corpus.rotation import EVAL_CANDIDATE_META, EVAL_CANDIDATE_TAG
from kolm_pipeline.corpus.text import intent_text, normalise, template_messages
from kolm_pipeline.provenance.cid import cid_for_bytes
from kolm_pipeline.provenance.errors import UserError

SERVED_TAG = "kolm-served"

__all__ = ["EVAL_CANDIDATE_TAG", "SERVED_TAG", "CorpusError", "CorpusStats", "build_corpus", "corpus_cid",
           "input_key", "normalise", "pair_weight", "read_corpus", "weight_problem"]


class CorpusError(UserError, ValueError):
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
    adds up to kept_pairs. `eval_candidates` of the written rows are eval candidates, never trained on."""

    kept_pairs: int
    excluded_served: int
    duplicates_dropped: int
    exact_duplicates_dropped: int
    near_duplicates_dropped: int
    empty_dropped: int
    unsupported_dropped: int
    written: int
    eval_candidates: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def input_key(messages: list[dict]) -> str:
    """A conversation's identity for dedup and split bookkeeping."""
    return "\n".join(f"{m.get('role')}:{normalise(str(m.get('content', '')))}" for m in messages)


def pair_weight(pair: PairLike) -> float:
    """The pair's provenance weight (1.0 for a store that does not weigh pairs)."""
    weight = getattr(pair, "weight", 1.0)
    problem = weight_problem(weight)
    if problem:
        raise CorpusError(f"capture {pair.id}: {problem}")
    return float(weight)


def text_content(content: object, images: bool = False) -> str | None:
    """A message's content as plain text: strings as they are, OpenAI/Anthropic content-part lists joined
    when every part is text; None for anything a text student cannot learn from (images, tool calls). With
    `images` (a vision-language base), a stored image is its placeholder (`<kolm-image sha256:…>`)."""
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
            elif images and (digest := stored_digest(part)) is not None:
                texts.append(placeholder(digest))
            else:
                return None
        return "\n".join(texts)
    return None


def _plain_messages(messages: object, images: bool = False) -> list[dict] | None:
    """Messages reduced to {role, content} text, or None when the conversation is not text-only."""
    if not isinstance(messages, list) or not messages:
        return None
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None
        content = text_content(message.get("content"), images)
        if content is None:
            return None
        plain.append({"role": message["role"], "content": content})
    return plain


def build_corpus(
    pairs: list[PairLike], near_duplicate_threshold: float | None = NEAR_DUPLICATE_JACCARD, images: bool = False
) -> tuple[bytes, CorpusStats]:
    """Deterministic JSONL bytes, ordered by capture id. `near_duplicate_threshold=None` turns the
    near-duplicate pass off (exact dedup always runs). `images`: keep conversations with stored images (for a
    vision-language base), each image as its placeholder; without, they count as unsupported."""
    served = empty = unsupported = 0
    by_input: dict[tuple[bool, str], tuple[PairLike, list[dict]]] = {}
    for pair in sorted(pairs, key=lambda p: p.id):
        if SERVED_TAG in pair.tags:
            served += 1
            continue
        if not isinstance(pair.output, str) or not pair.output.strip():
            empty += 1
            continue
        messages = _plain_messages(pair.messages, images)
        if messages is None:
            unsupported += 1
            continue
        by_input[(EVAL_CANDIDATE_TAG in pair.tags, input_key(messages))] = (pair, messages)
    unique = sorted(by_input.values(), key=lambda item: item[0].id)
    exact = len(pairs) - served - empty - unsupported - len(unique)

    kept = unique
    if near_duplicate_threshold is not None:
        template = template_messages(messages for _, messages in unique)
        index = NearDuplicateIndex(near_duplicate_threshold)
        kept = [
            (pair, messages)
            for pair, messages in unique
            if index.add(intent_text(messages, template), group=_dedup_group(pair, messages))
        ]
    lines = []
    candidates = 0
    for pair, messages in kept:
        row: dict = {
            "messages": [*messages, {"role": "assistant", "content": pair.output}],
            "meta": {
                "capture_id": pair.id,
                "model": pair.model,
                "latency_us": pair.latency_us,
                "prompt_tokens": pair.prompt_tokens or 0,
                "completion_tokens": pair.completion_tokens or 0,
            },
        }
        if EVAL_CANDIDATE_TAG in pair.tags:
            row["meta"][EVAL_CANDIDATE_META] = True
            candidates += 1
        weight = pair_weight(pair)
        if weight != 1.0:
            row["weight"] = weight
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
        eval_candidates=candidates,
    )
    return data, stats


def _dedup_group(pair: PairLike, messages: list[dict]) -> str:
    """Near-duplicates are dropped only within one answer (and one set of images: the same question about
    another image is another case), and candidates only against candidates."""
    answer = normalise(pair.output)
    digests = PLACEHOLDER.findall(" ".join(str(m.get("content")) for m in messages))
    answer = f"{answer}\n{','.join(digests)}" if digests else answer
    return f"{EVAL_CANDIDATE_TAG}\n{answer}" if EVAL_CANDIDATE_TAG in pair.tags else answer


def corpus_cid(data: bytes) -> str:
    return cid_for_bytes(data)


def read_corpus(data: bytes, source: str = "corpus.jsonl") -> list[dict]:
    """Rows of corpus bytes; a malformed line is refused, naming `source` and the line number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows, problems = scan_pairs(text, source)
    if problems:
        raise CorpusError(problems[0])
    return rows
