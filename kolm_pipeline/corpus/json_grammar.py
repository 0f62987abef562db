"""A JSON task's schema as a decoding grammar: the key order and layout of the teacher's answers, kept.

Constrained decoding (``evaluate/structured.py``, xgrammar) writes an object's fixed properties in the order
the schema lists them and lays the JSON out one way. Both must be what the adapter was trained on, so the
recipe's ``json_schema`` carries two annotations (JSON Schema validators ignore unknown keywords):

* ``x-kolm-order`` on an object with fixed properties: the order the answers write its keys. It is explicit
  because ``spec.json`` and the artifact manifest are written with sorted keys, which loses the order of
  ``properties`` itself. An object whose answers write keys in contradicting orders, or with many optional
  keys, is inferred as a map instead (``additionalProperties``), whose keys may come in any order.
* ``x-kolm-grounded: true`` on a free string whose values the teacher always copies out of the request (the
  slot spans of an utterance): constrained decoding then writes only text that occurs in the request
  (``evaluate/grounding.py``); with ``x-kolm-grounded-in: "last_user"`` only text of the last user message (the
  values always came from there, never from a system prompt), and with ``x-kolm-whole-words: true`` only whole
  words of it (a span that begins and ends at word boundaries, as every value did).
* ``x-kolm-layout`` at the top: ``{"indent": null | n, "separators": [item, key]}`` as ``json.dumps`` takes
  them, from what most answers use exactly; ``separators: null`` (no common layout) allows any whitespace,
  at most ``max_whitespace`` characters in a row.

This module needs no tokenizer: ``json_grammar`` checks that a schema compiles, when a recipe loads and before
an artifact is served; ``evaluate/structured.py`` compiles it for a tokenizer and masks the decoding.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

ORDER_KEY = "x-kolm-order"
LAYOUT_KEY = "x-kolm-layout"
GROUNDED_KEY = "x-kolm-grounded"
GROUNDED_IN_KEY = "x-kolm-grounded-in"
WHOLE_WORDS_KEY = "x-kolm-whole-words"
# Candidate layouts, as json.dumps(value, indent=..., separators=...) writes them.
LAYOUTS: list[tuple[int | None, tuple[str, str]]] = [
    (None, (", ", ": ")),  # json.dumps default
    (None, (",", ":")),  # compact (JSON.stringify)
    (2, (",", ": ")),
    (4, (",", ": ")),
]
LAYOUT_SHARE = 0.5  # a layout is kept when at least this share of the answers is written exactly that way
# Without a layout annotation (a recipe made before layouts were recorded, or hand-written): any whitespace,
# at most this many characters in a row, so decoding cannot wander off into whitespace.
DEFAULT_MAX_WHITESPACE = 8

# Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas.
_ONE_SCHEMA = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[09:16:08] /project/cpp/x.cc:4950: " of xgrammar


class JsonSchemaProblem(ValueError):
    """The schema cannot constrain decoding; the message starts with ``json_schema`` and says why."""


def _layout_of(value: object, text: str) -> tuple[int | None, tuple[str, str]] | None:
    for indent, separators in LAYOUTS:
        for ascii_only in (False, True):
            if json.dumps(value, indent=indent, separators=separators, ensure_ascii=ascii_only) == text:
                return indent, separators
    return None


def _whitespace_runs(text: str) -> int:
    """The longest run of whitespace outside strings."""
    longest = run = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char in " \t\r\n":
            run += 1
            longest = max(longest, run)
            continue
        run = 0
        in_string = char == '"'
    return longest


def json_layout(texts: list[str]) -> dict:
    """How the answers lay out their JSON: the candidate layout that at least LAYOUT_SHARE of them use exactly
    (most used first), else any whitespace up to the longest run seen."""
    counts: Counter = Counter()
    parsed = 0
    longest = 0
    for text in texts:
        stripped = text.strip()
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            continue
        parsed += 1
        longest = max(longest, _whitespace_runs(stripped))
        layout = _layout_of(value, stripped)
        if layout is not None:
            counts[layout] += 1
    if parsed and counts:
        (indent, separators), used = counts.most_common(1)[0]
        if used >= LAYOUT_SHARE * parsed:
            return {"indent": indent, "separators": list(separators)}
    return {"indent": None, "separators": None, "max_whitespace": max(1, longest)}


def _problem(message: str) -> JsonSchemaProblem:
    return JsonSchemaProblem(f"json_schema: {message}")


def _decoding(schema: Any, path: str) -> Any:
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for key, value in schema.items():
        if key in (ORDER_KEY, LAYOUT_KEY, GROUNDED_KEY, GROUNDED_IN_KEY, WHOLE_WORDS_KEY):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: _decoding(sub, f"{path}/{key}/{name}") for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [_decoding(sub, f"{path}/{key}/{index}") for index, sub in enumerate(value)]
        elif key in _ONE_SCHEMA:
            value = ([_decoding(sub, f"{path}/{key}/{index}") for index, sub in enumerate(value)]
                     if isinstance(value, list) else _decoding(value, f"{path}/{key}"))
        out[key] = value
    where = path or "(top level)"
    # The grounding marks change what decoding may write: a value the decoder would not read is refused, not ignored.
    if schema.get(GROUNDED_KEY, True) is not True:
        raise _problem(f"{where}: {GROUNDED_KEY} must be true or absent")
    if schema.get(GROUNDED_IN_KEY, "last_user") != "last_user":
        raise _problem(f'{where}: {GROUNDED_IN_KEY} must be "last_user" or absent (absent: any message)')
    if schema.get(WHOLE_WORDS_KEY, True) is not True:
        raise _problem(f"{where}: {WHOLE_WORDS_KEY} must be true or absent")
    order = schema.get(ORDER_KEY)
    if order is not None:
        if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
            raise _problem(f"{where}: {ORDER_KEY} must be a list of property names")
        properties = out.get("properties")
        if isinstance(properties, dict):
            listed = [name for name in order if name in properties]
            out["properties"] = {**{name: properties[name] for name in listed},
                                 **{name: sub for name, sub in properties.items() if name not in listed}}
    return out


def decoding_schema(schema: dict) -> dict:
    """The schema as the decoder compiles it: each object's properties in ``x-kolm-order``, annotations left out."""
    return _decoding(schema, "")


def grammar_options(schema: dict) -> dict:
    """xgrammar's layout options (``any_whitespace``, ``indent``, ``separators``, ``max_whitespace_cnt``) from
    the schema's ``x-kolm-layout``."""
    layout = schema.get(LAYOUT_KEY)
    if layout is None:
        return {"any_whitespace": True, "max_whitespace_cnt": DEFAULT_MAX_WHITESPACE}
    if not isinstance(layout, dict):
        raise _problem(f"{LAYOUT_KEY} must be an object")
    indent, separators = layout.get("indent"), layout.get("separators")
    if indent is not None and (isinstance(indent, bool) or not isinstance(indent, int) or not 0 <= indent <= 16):
        raise _problem(f"{LAYOUT_KEY}/indent must be null or an integer from 0 to 16")
    if separators is None:
        most = layout.get("max_whitespace", DEFAULT_MAX_WHITESPACE)
        if isinstance(most, bool) or not isinstance(most, int) or most < 1:
            raise _problem(f"{LAYOUT_KEY}/max_whitespace must be a positive integer")
        return {"any_whitespace": True, "max_whitespace_cnt": most}
    if (not isinstance(separators, list) or len(separators) != 2 or not all(isinstance(s, str) for s in separators)
            or not all(s.strip() == mark for s, mark in zip(separators, ",:", strict=True))):
        raise _problem(f'{LAYOUT_KEY}/separators must be null or [item, key] separators such as [", ", ": "]')
    return {"any_whitespace": False, "indent": indent, "separators": tuple(separators)}


def json_grammar(schema: Any):
    """The xgrammar ``Grammar`` for ``schema`` (no tokenizer needed), or JsonSchemaProblem saying why not."""
    import jsonschema
    import xgrammar

    if not isinstance(schema, dict):
        raise _problem("must be a JSON object (a JSON Schema)")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise _problem(f"{where}: not a valid JSON Schema ({exc.message})") from None
    options = grammar_options(schema)
    decoded = decoding_schema(schema)  # its own problems (a bad annotation) name themselves, unwrapped
    try:
        return xgrammar.Grammar.from_json_schema(json.dumps(decoded), strict_mode=True, **options)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = _NATIVE_PREFIX.sub("", str(exc).strip()).strip() or type(exc).__name__
        raise _problem(f"cannot be compiled into a decoding grammar: {reason}") from None
