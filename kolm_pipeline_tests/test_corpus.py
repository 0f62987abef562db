"""The corpus: source gate, exact and near-duplicate dedup, content normalisation, deterministic bytes."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from kolm_pipeline.corpus.build import SERVED_TAG, CorpusError, build_corpus, corpus_cid, read_corpus
from kolm_pipeline.corpus.dedup import NearDuplicateIndex, jaccard, shingles
from kolm_pipeline.demo.tickets import SYSTEM_PROMPT, generate_tickets
from kolm_pipeline.store import KeptPair


def _pair(index: int, text: str, output: str, tags: list[str] | None = None, system: str | None = None,
          content: object = None) -> KeptPair:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text if content is None else content})
    return KeptPair(id=index, messages=messages, output=output, model="m", latency_us=1000, prompt_tokens=5,
                    completion_tokens=1, created_at=datetime.now(UTC), tags=tags or [])


def test_near_duplicates_with_the_same_answer_are_dropped_and_counted():
    pairs = [
        _pair(1, "My order A-1043 has not arrived after 3 days.", "logistics", system=SYSTEM_PROMPT),
        _pair(2, "Hi, My order A-1043 has not arrived after 3 days. Thanks.", "logistics", system=SYSTEM_PROMPT),
        _pair(3, "Hi, My order A-1043 has not arrived after 3 days. Thanks.", "rma", system=SYSTEM_PROMPT),
        _pair(4, "I want to return the keyboard I bought last week.", "rma", system=SYSTEM_PROMPT),
        _pair(5, "I want to return the keyboard I bought last week!", "rma", system=SYSTEM_PROMPT),
    ]
    data, stats = build_corpus(pairs)
    rows = read_corpus(data)
    # 2 nearly repeats 1 with the same answer; 3 is exactly 2's request, and being newer its answer wins
    # (then it is no near-duplicate of 1: different answer); 5 nearly repeats 4.
    assert [row["meta"]["capture_id"] for row in rows] == [1, 3, 4]
    assert stats.exact_duplicates_dropped == 1 and stats.near_duplicates_dropped == 1
    assert stats.duplicates_dropped == 2
    assert stats.written + stats.duplicates_dropped + stats.excluded_served + stats.empty_dropped \
        + stats.unsupported_dropped == stats.kept_pairs
    assert all(isinstance(value, int) for value in stats.as_dict().values())
    assert build_corpus(pairs, near_duplicate_threshold=None)[1].near_duplicates_dropped == 0


def test_shared_system_prompt_does_not_make_requests_near_duplicates():
    long_system = "You are a careful support router. " * 20
    pairs = [_pair(i, text, "x", system=long_system) for i, text in
             enumerate(["Where is my parcel?", "Reset my password please", "Cancel my plan"], start=1)]
    assert build_corpus(pairs)[1].near_duplicates_dropped == 0


def test_corpus_bytes_are_deterministic_whatever_the_input_order():
    tickets = generate_tickets(200, seed=3)
    pairs = [_pair(i, t.text, t.queue, system=SYSTEM_PROMPT) for i, t in enumerate(tickets, start=1)]
    data, stats = build_corpus(pairs)
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    assert build_corpus(shuffled) == (data, stats)
    assert corpus_cid(build_corpus(shuffled)[0]) == corpus_cid(data)


def test_demo_tickets_keep_most_pairs():
    """Near-dup dedup must not gut a templated corpus: the demo's tickets keep >= 90 % of unique requests."""
    tickets = generate_tickets(160, seed=11)
    pairs = [_pair(i, t.text, t.queue, system=SYSTEM_PROMPT) for i, t in enumerate(tickets, start=1)]
    _, stats = build_corpus(pairs)
    unique = stats.kept_pairs - stats.exact_duplicates_dropped
    assert stats.written >= 0.9 * unique and stats.written >= 100
    assert stats.written + stats.duplicates_dropped == 160


def test_content_parts_become_text_and_non_text_is_dropped_with_a_count():
    parts = [{"type": "text", "text": "Where is"}, {"type": "text", "text": "my order?"}]
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]
    pairs = [_pair(1, "", "logistics", content=parts), _pair(2, "", "rma", content=image),
             _pair(3, "Reset my password", "iam", tags=[SERVED_TAG]), _pair(4, "Refund", "  ")]
    data, stats = build_corpus(pairs)
    rows = read_corpus(data)
    assert rows[0]["messages"][0]["content"] == "Where is\nmy order?"
    assert (stats.unsupported_dropped, stats.excluded_served, stats.empty_dropped, stats.written) == (1, 1, 1, 1)


def test_malformed_corpus_line_is_refused_with_file_and_line():
    good = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:2: not valid JSON"):
        read_corpus(good + b"{oops\n", source="corpus.jsonl")
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: expected"):
        read_corpus(b'{"messages": [{"role": "user", "content": "a"}]}\n', source="c.jsonl")


def test_minhash_index_agrees_with_exact_jaccard():
    texts = [t.text for t in generate_tickets(120, seed=5)]
    index = NearDuplicateIndex(threshold=0.8)
    kept: list[str] = []
    for text in texts:
        exact = any(jaccard(shingles(text), shingles(other)) >= 0.8 for other in kept)
        assert index.add(text) is not exact
        if not exact:
            kept.append(text)


def test_provenance_weight_rides_along_and_a_bad_one_is_refused():
    """A pair's weight (a person's correction 1.0, an AI peer's answer 0.5) becomes the row's `weight`;
    1.0 is left out, so ordinary corpora keep their bytes."""
    pairs = [replace(_pair(1, "Where is my order?", "logistics"), weight=0.5),
             replace(_pair(2, "Reset my password", "iam"), weight=1.0),
             replace(_pair(3, "Refund please", "fin-ops"), weight=0)]
    data, _ = build_corpus(pairs)
    assert [row.get("weight") for row in read_corpus(data)] == [0.5, None, 0.0]
    assert build_corpus(pairs[1:2])[0] == build_corpus([_pair(2, "Reset my password", "iam")])[0]
    with pytest.raises(CorpusError, match=r"capture 9: 'weight' must be a non-negative number, got -1"):
        build_corpus([replace(_pair(9, "x", "y"), weight=-1)])
    row = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "weight": "%s"}\n'
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: 'weight' must be a non-negative number, got 'heavy'"):
        read_corpus((row % "heavy").encode(), source="c.jsonl")
