"""Where a copied span stands in its request: the one rule the recipe infers grounding by and decoding holds it to.

Both compare JSON string text (a message as ``json.dumps`` writes it between its quotes, UTF-8), because that is
what a JSON answer writes, escapes included. A word boundary is where a letter or digit meets anything else; the
bytes of a multi-byte UTF-8 character count as letters, and an escaped line break or tab (``\\n``) ends a word.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

_BACKSLASH = ord("\\")


def json_text(text: object) -> bytes:
    """``text`` as a JSON string writes it, without the quotes."""
    return json.dumps(str(text), ensure_ascii=False)[1:-1].encode("utf-8")


def message_texts(messages: list[dict]) -> tuple[list[bytes], bytes]:
    """Each message's text as JSON string text, and the last user message's (empty without one): where a span may be
    copied from."""
    users = [m for m in messages if m.get("role") == "user"]
    last_user = json_text(users[-1].get("content", "")) if users else b""
    return [json_text(m.get("content", "")) for m in messages], last_user


def _is_word(byte: int) -> bool:
    return byte >= 0x80 or chr(byte).isalnum()


def _word_start(source: bytes, index: int) -> bool:
    if index == 0 or not _is_word(source[index - 1]):
        return True
    return index >= 2 and source[index - 2] == _BACKSLASH and source[index - 1] in b"ntr"


def _word_end(source: bytes, index: int) -> bool:
    return index == len(source) or not _is_word(source[index])


def _starts(span: bytes, source: bytes, whole_words: bool) -> Iterator[int]:
    """Where ``span`` begins in ``source`` (at a word boundary only, with ``whole_words``)."""
    start = source.find(span)
    while start >= 0:
        if not whole_words or _word_start(source, start):
            yield start
        start = source.find(span, start + 1)


def continuations(span: bytes, source: bytes, whole_words: bool = False, limit: int = 48) -> list[bytes]:
    """What follows ``span`` in ``source`` (up to ``limit`` bytes) at each of its occurrences: how a span written so
    far can go on."""
    return [source[start + len(span): start + len(span) + limit] for start in _starts(span, source, whole_words)]


def occurs(span: bytes, source: bytes, whole_words: bool = False, ended: bool = True) -> bool:
    """Whether ``span`` occurs in ``source``; with ``whole_words``, beginning at a word boundary and (``ended``: the
    span is complete) ending at one, as a span being written so far need not yet."""
    if not whole_words:
        return span in source
    return any(not ended or _word_end(source, start + len(span)) for start in _starts(span, source, True))
