"""Drafts for speculative greedy decoding (``evaluate/drafting.py``): guesses from the adapter's earlier answers and
from the request, bounded in memory; and in the decoding passes (``evaluate/decoding.py``): a draft the model
agrees with saves passes, and no draft changes an answer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kolm_pipeline.evaluate.drafting import MIN_SHARE, AnswerDrafter


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(str(tiny_base))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_earlier_answers_draft_what_most_of_them_went_on_with(tokenizer):
    drafter = AnswerDrafter(tokenizer)
    shape = ids(tokenizer, '{"intents": ["PlayMusic"], "slots": {}}')
    for _ in range(3):
        drafter.learn(shape)
    start = shape[:2]
    assert drafter.draft([], start, 4) == shape[2:6]
    assert drafter.draft([], start, 100) == shape[2:]  # no further than the answers went
    assert drafter.draft([], start, 0) == []

    # Two continuations as often as each other: neither is most of what followed, so no guess.
    other = ids(tokenizer, '{"intents": ["GetWeather", "BookRestaurant"], "slots": {"city": "Paris"}}')
    for _ in range(3):
        drafter.learn(other)
    diverging = next(i for i, (a, b) in enumerate(zip(shape, other, strict=False)) if a != b)
    assert MIN_SHARE == 0.5 and drafter.draft([], shape[:diverging], 4) == shape[diverging : diverging + 4]
    drafter.learn(other)  # now 4 of 7 went the other way
    assert drafter.draft([], shape[:diverging], 1) == [other[diverging]]


def test_a_span_of_the_request_is_drafted_as_the_request_goes_on(tokenizer):
    """A value the answer copies from the request goes on as the request does; its first word, written inside a
    JSON string without the request's leading space, still matches."""
    drafter = AnswerDrafter(tokenizer)
    prompt = ids(tokenizer, "<|im_start|>user\na table in paris for two tonight<|im_end|>\n<|im_start|>assistant\n")
    answer = ids(tokenizer, '{"city": "paris')  # ... "par" "is": the word without its leading space
    request = ids(tokenizer, " paris for two tonight")  # " par" "is" " for" ...
    assert request[0] != answer[-2] and request[1] == answer[-1], "the test needs the word split differently"
    assert drafter.draft(prompt, answer, 2) == request[2:4]
    # The draft stops at the prompt's special tokens (the chat template's end of turn).
    assert tokenizer.eos_token_id not in drafter.draft(prompt, answer, 50)
    assert drafter.draft(prompt, answer, 50) == request[2:]
    # Punctuation is no anchor: `": "` occurs in no request, and a lone `"` would match anywhere.
    assert drafter.draft(prompt, ids(tokenizer, '{"artist": "'), 4) == []


def test_the_drafter_remembers_a_bounded_number_of_answers(tokenizer):
    drafter = AnswerDrafter(tokenizer, max_answers=2)
    first = ids(tokenizer, "alpha beta gamma")
    drafter.learn(first)
    assert drafter.draft([], first[:1], 2) == first[1:3]
    drafter.learn(ids(tokenizer, "delta epsilon"))
    drafter.learn(ids(tokenizer, "zeta eta"))
    assert drafter.draft([], first[:1], 2) == [], "the oldest answer is forgotten"
    assert len(drafter) == 2


def test_drafts_save_passes_and_change_no_answer(tiny_base, monkeypatch):
    """Evaluation's batch decoding with and without drafts: the same answers token for token; with drafts,
    once the adapter's earlier answers are known (the prompts decoded a second time), fewer passes, and some
    draft tokens rejected and masked out without harm."""
    from kolm_pipeline.evaluate import decoding
    from kolm_pipeline.evaluate.decoding import BatchDecoder, decode_prompts
    from kolm_pipeline.train.labels import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}])
               for text in ["cancel order 12 please", "where is my parcel", "refund the kettle", "track 88"]]
    passes = {"plain": 0, "drafting": 0}
    rejected = []
    original_decode, original_advance = BatchDecoder.decode, BatchDecoder.advance

    def decode(self, batch):
        passes["drafting" if self.drafting else "plain"] += 1
        return original_decode(self, batch)

    def advance(self, rows, logits, drafts=None):
        unread = original_advance(self, rows, logits, drafts)
        rejected.extend(unread)
        return unread

    monkeypatch.setattr(BatchDecoder, "decode", decode)
    monkeypatch.setattr(BatchDecoder, "advance", advance)
    plain = BatchDecoder(model, tokenizer, {tokenizer.eos_token_id}, drafting=False)
    drafting = BatchDecoder(model, tokenizer, {tokenizer.eos_token_id})
    expected = [row.generated for row in decode_prompts(plain, prompts, 24, 2)]
    first = [row.generated for row in decode_prompts(drafting, prompts, 24, 2)]
    passes.update(plain=0, drafting=0)
    again = [row.generated for row in decode_prompts(drafting, prompts, 24, 2)]
    decode_prompts(plain, prompts, 24, 2)
    assert first == expected and again == expected
    assert passes["drafting"] < passes["plain"] / 2, passes
    assert decoding.CPU_PASS_TOKENS // 2 > 1  # two rows leave each room for a draft

    # Drafts from other answers mislead the model (the four share no words): rejected, and still no answer changes.
    rejected.clear()
    misled = BatchDecoder(model, tokenizer, {tokenizer.eos_token_id})
    for answer in reversed(expected):
        misled.drafter("").learn(answer[1:] + answer[:1])
    assert [row.generated for row in decode_prompts(misled, prompts, 24, 2)] == expected
    assert any(rejected), "no draft token was rejected: the masking path went untested"
