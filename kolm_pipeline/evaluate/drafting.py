"""Drafts for speculative greedy decoding: the tokens an answer will likely go on with, guessed without the model.

A decoding pass on a CPU costs about the same whether a row reads one token or a few (``decoding.py``,
``CPU_PASS_TOKENS``), so a row may read, beside its own next token, a few guessed ones: the pass's logits at each
guessed position say what the model would have chosen there, and the row keeps the guesses up to the first one
the model would not have chosen (plus the model's own choice at that point). Every answer is token for token the
one plain greedy decoding gives; only the number of passes changes. Two sources of guesses, both free:

* **The request** (prompt lookup, as vLLM's n-gram speculator): an answer that copies a span of the request (a
  slot value, an extracted name) goes on as the request does after the tokens it just wrote. A word written
  first inside a JSON string has no leading space where the request has one (``"the`` against `` the``), so
  tokens are matched by their text less a leading space.
* **The adapter's earlier answers** (as SuffixDecoding, Oliaro et al. 2024, does from earlier outputs): what most
  often followed the last few tokens in the answers this adapter gave lately (``"], "slots": {"`` after an
  intent), as long as one continuation is most of what followed.

``AnswerDrafter`` keeps one adapter's last ``MAX_ANSWERS`` answers as token-sequence counts, in memory only: a
process restart, or unloading the adapter, forgets them.
"""

from __future__ import annotations

from collections import Counter, deque

# Context lengths the drafter matches, longest first.
MAX_NGRAM = 3
# Answers an adapter's drafter remembers (the oldest is forgotten first): enough to learn an answer's fixed
# parts; bounded so a long-running server holds a fixed amount of answers in memory.
MAX_ANSWERS = 256
# A continuation of earlier answers is guessed only when at least this share of them went on that way.
MIN_SHARE = 0.5
_START = -1  # what precedes an answer's first token in the n-gram contexts


class AnswerDrafter:
    """Guesses of how one adapter's answer goes on, from its request and its last ``max_answers`` answers."""

    def __init__(self, tokenizer, max_answers: int = MAX_ANSWERS) -> None:
        self._tokenizer = tokenizer
        self._special = set(tokenizer.all_special_ids)
        self._max_answers = max_answers
        self._answers: deque[list[int]] = deque()
        self._next: dict[tuple[int, ...], Counter[int]] = {}
        self._words: dict[int, str | None] = {}  # token id -> its text less a leading space (None: no letter/digit)

    def __len__(self) -> int:
        """The answers remembered."""
        return len(self._answers)

    def learn(self, answer: list[int]) -> None:
        """Remember a finished answer's tokens (forgetting the oldest beyond ``max_answers``)."""
        if not answer:
            return
        self._answers.append(list(answer))
        self._count(self._answers[-1], +1)
        if len(self._answers) > self._max_answers:
            self._count(self._answers.popleft(), -1)

    def _count(self, answer: list[int], change: int) -> None:
        tokens = [_START] * MAX_NGRAM + answer
        for end in range(MAX_NGRAM, len(tokens)):
            for size in range(1, MAX_NGRAM + 1):
                context = tuple(tokens[end - size : end])
                counts = self._next.setdefault(context, Counter())
                counts[tokens[end]] += change
                if counts[tokens[end]] <= 0:
                    del counts[tokens[end]]
                    if not counts:
                        del self._next[context]

    def draft(self, prompt: list[int], answer: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens ``answer`` (so far) may go on with: as earlier answers went on after its last
        tokens, else as the request's tokens ``prompt`` go on where the answer's last tokens are a span of it;
        none if neither knows. (Earlier answers first: a prompt's system part holds words an answer writes, like
        an intent's name, and goes on otherwise; on SNIPS this order takes fewer passes.)"""
        if limit <= 0:
            return []
        return self._from_answers(answer, limit) or self._from_request(prompt, answer, limit)

    def _word(self, token: int) -> str | None:
        if token not in self._words:
            text = self._tokenizer.convert_ids_to_tokens(token) or ""
            text = self._tokenizer.convert_tokens_to_string([text]).lstrip() if text else ""
            self._words[token] = text if any(ch.isalnum() for ch in text) else None
        return self._words[token]

    def _from_request(self, prompt: list[int], answer: list[int], limit: int) -> list[int]:
        """What follows the latest place in ``prompt`` where the answer's last tokens (at most MAX_NGRAM, the last
        one a word) occur, up to the next special token."""
        if not answer or self._word(answer[-1]) is None:
            return []
        for size in range(min(MAX_NGRAM, len(answer)), 0, -1):
            tail = [self._word(token) for token in answer[-size:]]
            if None in tail:
                continue
            for end in range(len(prompt), size - 1, -1):  # the latest occurrence: the request ends the prompt
                if [self._word(token) for token in prompt[end - size : end]] == tail:
                    guess = []
                    for token in prompt[end : end + limit]:
                        if token in self._special:
                            break
                        guess.append(token)
                    return guess
        return []

    def _from_answers(self, answer: list[int], limit: int) -> list[int]:
        """The continuation most earlier answers took after the answer's last tokens, token by token."""
        context = [_START] * MAX_NGRAM + list(answer[-MAX_NGRAM:])
        guess: list[int] = []
        while len(guess) < limit:
            counts = next((self._next[key] for size in range(MAX_NGRAM, 0, -1)
                           if (key := tuple(context[-size:])) in self._next), None)
            if not counts:
                break
            token, seen = counts.most_common(1)[0]
            if seen < MIN_SHARE * counts.total():
                break
            guess.append(token)
            context.append(token)
        return guess
