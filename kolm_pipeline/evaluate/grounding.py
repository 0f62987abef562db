"""Grounded strings: a JSON answer's copied spans are held to text that occurs in the request.

A recipe marks a free string of its schema ``x-kolm-grounded`` when the teacher always copies its values out of the
request (``corpus/kinds.py: mark_grounded``: the slot spans of an utterance), ``x-kolm-grounded-in: "last_user"``
when they always come from the last user message (not from a system prompt), and ``x-kolm-whole-words`` when they
always begin and end at word boundaries there (``corpus/spans.py``). A grammar cannot say "a substring of this
request", so ``JsonDecoder`` (``structured.py``) follows the answer with a ``JsonCursor`` (which also tells it when
the answer is inside a string): where the answer is inside (or about to open) a grounded string, the model's best
tokens are tried in order and the first that keeps every grounded string in its source is taken. Compared as JSON
text (each message as a JSON string writes it), byte by byte; a span never runs from one message into the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kolm_pipeline.corpus.json_grammar import GROUNDED_IN_KEY, GROUNDED_KEY, WHOLE_WORDS_KEY
from kolm_pipeline.corpus.spans import continuations, message_texts, occurs

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
# Between the messages of a request's source text: a byte JSON string text never holds (it writes \u0000).
_SEPARATOR = b"\x00"


def _grounded(schema: object) -> bool:
    return isinstance(schema, dict) and schema.get(GROUNDED_KEY) is True


def _child(container: _Open) -> object:
    """The schema of the value ``container`` is about to hold."""
    schema = container.schema if isinstance(container.schema, dict) else {}
    if container.kind == "array":
        return schema.get("items")
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    return properties.get(container.key, schema.get("additionalProperties"))


@dataclass
class _Open:
    kind: str  # "object" or "array"
    schema: object
    key: str | None = None
    awaiting_key: bool = True


@dataclass(frozen=True)
class Sources:
    """A request's text as JSON string text: every message (``request``), and the last user message alone."""

    request: bytes
    last_user: bytes

    @classmethod
    def of(cls, messages: list[dict]) -> Sources:
        texts, last_user = message_texts(messages)
        return cls(_SEPARATOR.join(texts), last_user)


@dataclass
class JsonCursor:
    """Where a JSON answer being written stands (open objects and arrays, the string being written), and whether
    its grounded strings so far all keep to their sources."""

    schema: object
    sources: Sources
    stack: list[_Open] = field(default_factory=list)
    in_string: bool = False
    string_is_key: bool = False
    string_schema: object = None  # the schema of the value string being written (None for a key)
    escaped: bool = False
    written: bytearray = field(default_factory=bytearray)
    started: bool = False

    @classmethod
    def for_request(cls, schema: object, messages: list[dict]) -> JsonCursor:
        """A cursor at the start of an answer to ``messages`` (as the recipe checked grounding)."""
        return cls(schema, Sources.of(messages))

    def copy(self) -> JsonCursor:
        stack = [_Open(open_.kind, open_.schema, open_.key, open_.awaiting_key) for open_ in self.stack]
        return JsonCursor(self.schema, self.sources, stack, self.in_string, self.string_is_key, self.string_schema,
                          self.escaped, bytearray(self.written), self.started)

    def _next_schema(self) -> object:
        return _child(self.stack[-1]) if self.stack else (None if self.started else self.schema)

    def at_grounded(self) -> bool:
        """Inside a grounded string, or where the next value to open is one: where grounding may choose."""
        if self.in_string:
            return _grounded(self.string_schema)
        top = self.stack[-1] if self.stack else None
        return (top is None or top.kind == "array" or not top.awaiting_key) and _grounded(self._next_schema())

    def _rule(self) -> tuple[bytes, bool]:
        """The grounded string's source text, and whether it keeps to whole words of it."""
        schema = self.string_schema if isinstance(self.string_schema, dict) else {}
        source = self.sources.last_user if schema.get(GROUNDED_IN_KEY) == "last_user" else self.sources.request
        return source, schema.get(WHOLE_WORDS_KEY) is True

    def _occurs(self, ended: bool) -> bool:
        """Whether the grounded string written so far (``ended``: and closed) keeps to its source."""
        source, whole_words = self._rule()
        return occurs(bytes(self.written), source, whole_words=whole_words, ended=ended)

    def continuations(self) -> list[bytes]:
        """Inside a grounded string: the source's text after each place the string so far stands at (the bytes it
        may go on with); empty elsewhere. Cut at a message's end."""
        if not (self.in_string and _grounded(self.string_schema)) or self.escaped:
            return []
        source, whole_words = self._rule()
        return [text.split(_SEPARATOR, 1)[0] for text in continuations(bytes(self.written), source, whole_words)]

    def feed(self, data: bytes) -> bool:
        """Advance over ``data``; False as soon as a grounded string no longer keeps to its source."""
        for byte in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif byte == _BACKSLASH:
                    self.escaped = True
                elif byte == _QUOTE:
                    self.in_string = False
                    if self.string_is_key and self.stack:
                        self.stack[-1].key = self.written.decode("utf-8", "replace")
                    elif _grounded(self.string_schema) and not self._occurs(ended=True):
                        return False
                    continue
                self.written.append(byte)
                if _grounded(self.string_schema) and not self.escaped and not self._occurs(ended=False):
                    return False
                continue
            if byte in b"{[":
                self.stack.append(_Open("object" if byte == ord("{") else "array", self._next_schema()))
                self.started = True
            elif byte in b"}]":
                if self.stack:
                    self.stack.pop()
            elif byte == _QUOTE:
                top = self.stack[-1] if self.stack else None
                self.string_is_key = top is not None and top.kind == "object" and top.awaiting_key
                self.string_schema = None if self.string_is_key else self._next_schema()
                self.in_string, self.escaped, self.started = True, False, True
                self.written.clear()
            elif byte == ord(":") and self.stack:
                self.stack[-1].awaiting_key = False
            elif byte == ord(",") and self.stack and self.stack[-1].kind == "object":
                self.stack[-1].awaiting_key = True
        return True
