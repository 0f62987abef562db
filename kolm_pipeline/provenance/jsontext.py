"""JSON on the capture path: orjson where it gives exactly what the standard library gives, the standard
library everywhere else. The capture writer parses every proxied request and reply and serializes every
conversation, and orjson does each much faster (docs/benchmarks.md, "Capture proxy").

orjson reads integers wider than 64 bits as floats, and refuses NaN, Infinity and lone surrogates, which the
standard library accepts. `loads` hands text holding a long run of digits, and anything orjson refuses, to
the standard library, so both parse every input to the same value. `loads_replies` skips the digit scan,
a noticeable share of parsing a stream chunk, where only strings and token counts are read.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"0" * 9)
_LONG_NUMBER = b"0" * 19


def has_long_number(raw: bytes) -> bool:
    """Whether `raw` holds 19 ASCII digits in a row (`re.search(rb"\\d{19}", raw)`): every digit made a zero,
    then one substring search, which is cheaper than the regex on a chat request."""
    return _LONG_NUMBER in raw.translate(_DIGITS_AS_ZERO)


# Text no store can hold: a NUL (PostgreSQL text refuses it) or a lone UTF-16 surrogate (not encodable as UTF-8).
# In a JSON body they can only come from `\u` escapes, so the bytes are searched first and the parsed value
# only when an escape of the kind is there.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(raw: bytes, value: Any) -> str | None:
    """What in `value` (parsed from the JSON `raw`) no store can hold: "a NUL character", "a lone surrogate" or
    None."""
    if _UNSTORABLE_ESCAPE.search(raw) is None:
        return None
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _UNSTORABLE.search(item)
            if found:
                return "a NUL character" if found.group() == "\x00" else "a lone surrogate"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def storable(text: str) -> str:
    """`text` with every NUL and lone surrogate replaced by U+FFFD, so any store can hold it."""
    return _UNSTORABLE.sub("\ufffd", text) if _UNSTORABLE.search(text) else text


def loads(data: bytes | str) -> Any:
    """`json.loads`, faster. Raises `ValueError` on invalid JSON, like `json.loads`."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if not has_long_number(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def loads_replies(data: bytes | str) -> Any:
    """`loads` for provider replies and stream events, of which only text and token counts are kept: the
    same values, except that an integer wider than 64 bits (a count no reply holds) comes back a float."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps_compact(value: Any) -> str:
    """`json.dumps(value, ensure_ascii=False, separators=(",", ":"))`, faster: the text parses back to the
    same value (floats may be spelled differently: `1e16` rather than `1e+16`)."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:  # wide integers, lone surrogates, non-string keys
        text = None
    # orjson writes NaN and Infinity as null where json writes NaN: text with a null takes the slow path.
    if text is None or b"null" in text:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.decode("utf-8")
