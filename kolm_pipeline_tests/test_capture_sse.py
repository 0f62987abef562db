"""Server-sent events as the capture writer reads them back from a recorded stream."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kolm_pipeline.capture.providers import OpenAIStream, SSEParser

LINE_TEXT = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)
EVENTS = st.lists(
    st.tuples(st.none() | st.sampled_from(["message_start", "ping", "x"]), st.lists(LINE_TEXT, min_size=1, max_size=3)),
    max_size=6,
)


def encode(events: list[tuple[str | None, list[str]]], crlf: bool, comments: bool) -> bytes:
    newline = "\r\n" if crlf else "\n"
    blocks = []
    for name, lines in events:
        fields = [": keep-alive"] if comments else []
        if name is not None:
            fields.append(f"event: {name}")
        fields += [f"data: {line}" for line in lines]
        blocks.append(newline.join(fields) + newline + newline)
    return "".join(blocks).encode("utf-8")


@given(EVENTS, st.booleans(), st.booleans(), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_parser_yields_every_event_however_the_bytes_are_split(
    events: list[tuple[str | None, list[str]]], crlf: bool, comments: bool, cuts: list[int]
) -> None:
    """Single-line blocks take a shortcut; blocks with names, comments or several lines do not. Both give
    the events as written, whether the stream comes whole or cut anywhere (even inside a CRLF)."""
    raw = encode(events, crlf, comments)
    points = sorted({min(cut, len(raw)) for cut in cuts} | {0, len(raw)})
    parser = SSEParser()
    parsed = []
    for start, end in zip(points, points[1:], strict=False):
        parsed += parser.feed(raw[start:end])
    expected = [(name or "message", "\n".join(lines)) for name, lines in events]
    assert parsed == expected
    assert SSEParser().feed(raw) == expected


def test_openai_stream_reads_text_usage_and_the_end_marker() -> None:
    state = OpenAIStream()
    state.feed(
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"fin-"}}]}\n\n'
        b'data: {"choices":[{"index":1,"delta":{"content":"other choice"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"ops"}}],"usage":{"prompt_tokens":12,"completion_tokens":2}}'
    )
    assert (state.text, state.complete) == ("fin-", False)  # the last event is not closed yet
    state.feed(b"\n\ndata: [DONE]\n\n")
    assert (state.text, state.complete, state.prompt_tokens, state.completion_tokens) == ("fin-ops", True, 12, 2)
