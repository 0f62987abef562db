"""Grounded strings and unique keys: what a JSON answer may write beyond what its grammar allows.

A recipe marks a free string of its schema ``x-kolm-grounded`` when the teacher always copies its values out of the
request (``corpus/kinds.py: mark_grounded``: the slot spans of an utterance), ``x-kolm-grounded-in: "last_user"``
when they always come from the last user message (not from a system prompt), and ``x-kolm-whole-words`` when they
always begin and end at word boundaries there. A grammar cannot say "a substring of this request", so
``JsonDecoder`` (``structured.py``) follows the answer with a ``JsonCursor``: where the cursor may refuse a token
(``may_refuse``), the model's best tokens are tried in order and the first the cursor keeps is taken. Compared as
JSON text (each message as a JSON string writes it), byte by byte; a span never crosses from one message to the next.

The cursor also keeps an object's keys unique (RFC 8259: names SHOULD be unique; a parser keeps the last of two):
a model that repeats a key (``"city": "Buckner", …, "city": "Buck"``) overwrote its own first answer, and once it
repeats, it tends to loop until it runs out of room. Where an object's names are a closed set (the schema's
``propertyNames`` enum, or ``properties`` with ``additionalProperties: false``), a key being written must also be
the start of a name not used yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kolm_pipeline.corpus.json_grammar import GROUNDED_IN_KEY, GROUNDED_KEY, WHOLE_WORDS_KEY
from kolm_pipeline.corpus.spans import json_text, occurs

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


def _names(schema: object) -> frozenset[str] | None:
    """The closed set of names an object of ``schema`` may have, or None where any name may come."""
    if not isinstance(schema, dict):
        return None
    names = schema.get("propertyNames")
    if isinstance(names, dict) and isinstance(names.get("enum"), list):
        return frozenset(str(name) for name in names["enum"])
    if schema.get("additionalProperties") is False and isinstance(schema.get("properties"), dict):
        return frozenset(schema["properties"])
    return None


@dataclass
class _Open:
    kind: str  # "object" or "array"
    schema: object
    key: str | None = None
    awaiting_key: bool = True
    keys: set[str] = field(default_factory=set)  # an object's keys written so far


@dataclass
class _Sources:
    """A request's text as JSON string text: every message, and the last user message alone."""

    request: bytes
    last_user: bytes

    @classmethod
    def of(cls, messages: list[dict]) -> _Sources:
        users = [m for m in messages if m.get("role") == "user"]
        return cls(_SEPARATOR.join(json_text(m.get("content", "")) for m in messages),
                   json_text(users[-1].get("content", "")) if users else b"")


@dataclass
class JsonCursor:
    """Where a JSON answer being written stands (open objects and arrays, the string being written), and whether
    it still keeps its grounded strings in ``sources`` and its keys unique."""

    schema: object
    sources: _Sources
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
        return cls(schema, _Sources.of(messages))

    def copy(self) -> JsonCursor:
        stack = [_Open(open_.kind, open_.schema, open_.key, open_.awaiting_key, set(open_.keys))
                 for open_ in self.stack]
        return JsonCursor(self.schema, self.sources, stack, self.in_string, self.string_is_key, self.string_schema,
                          self.escaped, bytearray(self.written), self.started)

    def _next_schema(self) -> object:
        return _child(self.stack[-1]) if self.stack else (None if self.started else self.schema)

    def _awaiting_key(self) -> bool:
        top = self.stack[-1] if self.stack else None
        return top is not None and top.kind == "object" and top.awaiting_key

    def may_refuse(self) -> bool:
        """Whether the next token could be one the cursor refuses: inside or before a grounded string, or a key of an
        object that has keys already or a closed set of names."""
        if self.in_string:
            return self.string_is_key or _grounded(self.string_schema)
        if self._awaiting_key():
            top = self.stack[-1]
            return bool(top.keys) or _names(top.schema) is not None
        top = self.stack[-1] if self.stack else None
        return (top is None or top.kind == "array" or not top.awaiting_key) and _grounded(self._next_schema())

    def _occurs(self, ended: bool) -> bool:
        """Whether the grounded string written so far (``ended``: and closed) keeps to its source."""
        schema = self.string_schema if isinstance(self.string_schema, dict) else {}
        source = self.sources.last_user if schema.get(GROUNDED_IN_KEY) == "last_user" else self.sources.request
        return occurs(bytes(self.written), source, whole_words=schema.get(WHOLE_WORDS_KEY) is True, ended=ended)

    def _key_allowed(self, closed: bool) -> bool:
        """Whether the key written so far (``closed``: and ended) is not one its object has, and can still become
        a name of its object's closed set."""
        top = self.stack[-1]
        key = self.written.decode("utf-8", "replace")
        if closed:
            return key not in top.keys
        names = _names(top.schema)
        return names is None or any(name.startswith(key) and name not in top.keys for name in names)

    def feed(self, data: bytes) -> bool:
        """Advance over ``data``; False as soon as a grounded string leaves its source or a key repeats."""
        for byte in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif byte == _BACKSLASH:
                    self.escaped = True
                elif byte == _QUOTE:
                    self.in_string = False
                    if self.string_is_key and self.stack:
                        if not self._key_allowed(closed=True):
                            return False
                        self.stack[-1].key = self.written.decode("utf-8", "replace")
                        self.stack[-1].keys.add(self.stack[-1].key)
                    elif _grounded(self.string_schema) and not self._occurs(ended=True):
                        return False
                    continue
                self.written.append(byte)
                if self.escaped:
                    continue
                if self.string_is_key and self.stack and not self._key_allowed(closed=False):
                    return False
                if _grounded(self.string_schema) and not self._occurs(ended=False):
                    return False
                continue
            if byte in b"{[":
                self.stack.append(_Open("object" if byte == ord("{") else "array", self._next_schema()))
                self.started = True
            elif byte in b"}]":
                if self.stack:
                    self.stack.pop()
            elif byte == _QUOTE:
                self.string_is_key = self._awaiting_key()
                self.string_schema = None if self.string_is_key else self._next_schema()
                self.in_string, self.escaped, self.started = True, False, True
                self.written.clear()
            elif byte == ord(":") and self.stack:
                self.stack[-1].awaiting_key = False
            elif byte == ord(",") and self.stack and self.stack[-1].kind == "object":
                self.stack[-1].awaiting_key = True
        return True
