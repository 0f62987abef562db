"""The capture path's JSON reads and writes exactly what the standard library would."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kolm_pipeline.provenance.jsontext import dumps_compact, has_long_number, loads, loads_replies

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@given(JSON_VALUES)
def test_loads_and_dumps_agree_with_the_standard_library(value: object) -> None:
    """Wide integers stay exact, lone surrogates survive, and the text written parses back the same."""
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert loads(text) == json.loads(text)
        assert loads(text.encode("utf-8", "surrogatepass")) == json.loads(text)
    assert json.loads(dumps_compact(value)) == value
    if not any(isinstance(v, int) and abs(v) >= 2**63 for v in _leaves(value)):
        assert loads_replies(json.dumps(value)) == json.loads(json.dumps(value))


def _leaves(value: object) -> list[object]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def test_what_orjson_refuses_is_read_as_the_standard_library_reads_it() -> None:
    assert math.isnan(loads(b'{"x": NaN}')["x"])
    assert loads('{"big": 123456789012345678901234567890}')["big"] == 123456789012345678901234567890
    assert loads('["\\ud800"]') == ["\ud800"]
    for awkward in (["\ud800", 2**70], [float("nan"), float("inf"), -float("inf"), None]):
        assert dumps_compact(awkward) == json.dumps(awkward, ensure_ascii=False, separators=(",", ":"))
    assert loads_replies('["\\ud800", NaN]')[0] == "\ud800"
    for parse in (loads, loads_replies):
        with pytest.raises(ValueError):
            parse(b'{"unterminated": ')


@given(st.lists(st.one_of(st.binary(max_size=8), st.text(alphabet="0123456789", max_size=24).map(str.encode))))
def test_long_number_scan_is_the_regex(pieces: list[bytes]) -> None:
    """The translate-and-find scan sees 19 digits in a row exactly where `\\d{19}` does (bytes: ASCII digits)."""
    raw = b"".join(pieces)
    assert has_long_number(raw) == (re.search(rb"\d{19}", raw) is not None)
