"""Grounded strings: a JSON answer's copied spans are held to text that occurs in the request.

A recipe marks a free string of its schema ``x-kolm-grounded`` when the teacher always copies its values out of the
request (``corpus/kinds.py: mark_grounded``: the slot spans of an utterance). A grammar cannot say "a substring of
this request", so ``JsonDecoder`` (``structured.py``) follows the answer with a ``JsonCursor`` (which also tells it
when the answer is inside a string): where the answer is inside (or about to open) a grounded string, the model's
best ``CANDIDATES`` tokens are tried in order, then the tokens that close what is open (``"`` ends the string), and
the first whose text keeps every grounded string a substring of the request is taken. Compared as JSON text (the
request as a JSON string writes it), byte by byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kolm_pipeline.corpus.json_grammar import GROUNDED_KEY
from kolm_pipeline.corpus.kinds import messages_text

CANDIDATES = 256  # the model's best tokens tried, in order, for one that keeps a grounded string in the request
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


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


@dataclass
class JsonCursor:
    """Where a JSON answer being written stands (open objects and arrays, the string being written), and whether
    its grounded strings so far all occur in ``source`` (the request as JSON string text, UTF-8)."""

    schema: object
    source: bytes
    stack: list[_Open] = field(default_factory=list)
    in_string: bool = False
    string_is_key: bool = False
    string_grounded: bool = False
    escaped: bool = False
    written: bytearray = field(default_factory=bytearray)
    started: bool = False

    @classmethod
    def for_request(cls, schema: object, messages: list[dict]) -> JsonCursor:
        """A cursor at the start of an answer to ``messages`` (their text, as the recipe checked grounding)."""
        return cls(schema, json.dumps(messages_text(messages), ensure_ascii=False)[1:-1].encode("utf-8"))

    def copy(self) -> JsonCursor:
        stack = [_Open(open_.kind, open_.schema, open_.key, open_.awaiting_key) for open_ in self.stack]
        return JsonCursor(self.schema, self.source, stack, self.in_string, self.string_is_key, self.string_grounded,
                          self.escaped, bytearray(self.written), self.started)

    def _next_schema(self) -> object:
        return _child(self.stack[-1]) if self.stack else (None if self.started else self.schema)

    def at_grounded(self) -> bool:
        """Inside a grounded string, or where the next value to open is one: where grounding may choose."""
        if self.in_string:
            return self.string_grounded
        top = self.stack[-1] if self.stack else None
        return (top is None or top.kind == "array" or not top.awaiting_key) and _grounded(self._next_schema())

    def feed(self, data: bytes) -> bool:
        """Advance over ``data``; False as soon as a grounded string's text is no longer in ``source``."""
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
                    continue
                self.written.append(byte)
                if self.string_grounded and not self.escaped and bytes(self.written) not in self.source:
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
                self.string_grounded = not self.string_is_key and _grounded(self._next_schema())
                self.in_string, self.escaped, self.started = True, False, True
                self.written.clear()
            elif byte == ord(":") and self.stack:
                self.stack[-1].awaiting_key = False
            elif byte == ord(",") and self.stack and self.stack[-1].kind == "object":
                self.stack[-1].awaiting_key = True
        return True
