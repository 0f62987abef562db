"""Text helpers shared by dedup, clustering and kind detection.

Most captured conversations repeat the same system prompt (and often few-shot examples); only the rest
says what a request is about. Similarity measured over the whole conversation would call every request
a near-duplicate of every other, so dedup and intent clustering look at the *intent text*: the
messages of a conversation that are not part of the namespace's shared template.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_SPACE = re.compile(r"\s+")

# A message that recurs in at least this share of conversations (and at least TEMPLATE_MIN_COUNT times)
# is template, not intent.
TEMPLATE_SHARE = 0.10
TEMPLATE_MIN_COUNT = 3


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used for exact dedup."""
    return _SPACE.sub(" ", text).strip().lower()


def message_key(message: dict) -> tuple[str, str]:
    return str(message.get("role")), normalise(str(message.get("content", "")))


def template_messages(conversations: Iterable[list[dict]]) -> frozenset[tuple[str, str]]:
    """Messages (role, normalised content) shared by many conversations: system prompts, few-shot turns."""
    counts: Counter[tuple[str, str]] = Counter()
    total = 0
    for messages in conversations:
        total += 1
        counts.update({message_key(m) for m in messages})
    threshold = max(TEMPLATE_MIN_COUNT, TEMPLATE_SHARE * total)
    return frozenset(key for key, count in counts.items() if count >= threshold)


def intent_text(messages: list[dict], template: frozenset[tuple[str, str]]) -> str:
    """The part of a request that says what it is about; the whole request when all of it is template."""
    parts = [str(m.get("content", "")) for m in messages if message_key(m) not in template]
    if not any(part.strip() for part in parts):
        parts = [str(m.get("content", "")) for m in messages]
    return "\n".join(parts)


_TOKEN = re.compile(r"\w+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1; 1.0 when both are empty."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred and not ref:
        return 1.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
