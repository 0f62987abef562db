"""Decontamination: no training pair repeats an input the student is judged on.

Before train.jsonl is written, a row is removed from training when its input overlaps a *protected* input
(the frozen hold-out, the eval split, or any eval candidate, rotated in or not), checked cheapest first; the
first test that holds is the reason counted:

- `exact`: the same words in the same order after normalisation (case, whitespace and punctuation ignored);
- `ngram13`: a shared run of NGRAM (13) normalised word tokens. When either text is shorter than that, its
  whole token sequence occurring in the other counts (the GPT-3 rule for short inputs), but only for texts
  of at least MIN_NGRAM_TOKENS (8) tokens: below that, one common phrase ("where is my order") would match
  half a corpus, and `exact` and `embedding` still cover them;
- `embedding`: all-MiniLM-L6-v2 cosine >= EMBEDDING_COSINE (a paraphrase in other words).

An input with images (vision-language tasks: `<kolm-image sha256:…>` placeholders) is only ever compared with
protected inputs showing one of the same images, and a text-only input only with text-only ones: the same
question about another picture is another case, and a picture is the input a held-out case must not leak.

Texts are intent texts (text.py): a namespace's shared system prompt and few-shot turns are left out, or
every request would share 13-grams with every other. An instruction an application puts inside the user
message itself ("Classify the ticket below into one of our queues ... Ticket: {text}") is left out too: a
13-gram found in at least a quarter of all inputs (TEMPLATE_NGRAM_SHARE) is template, and the words it covers
are dropped before any test, and before embedding, so MiniLM compares what the requests are about. A quarter,
not text.py's tenth, because a shared run inside a message can also be a popular request worded the same way.

The embedding threshold, measured on 289 distinct demo tickets (41,000 pairs; the demo's templates before session
16): the same ticket with another greeting or closing scores median 0.948 (48% of such pairs >= 0.95), the same
template with other order numbers or products median 0.764 (0.2% >= 0.95), different templates at most 0.54. At
0.95 the check adds paraphrases the token tests miss and almost never removes a request that merely looks alike;
0.90 would remove 4% of same-template requests, which are different questions with different facts.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from kolm_pipeline.capture.images import PLACEHOLDER
from kolm_pipeline.corpus.text import normalise

REASONS = ("exact", "ngram13", "embedding")
SOURCES = ("holdout", "eval", "eval_candidate")
NGRAM = 13
MIN_NGRAM_TOKENS = 8
EMBEDDING_COSINE = 0.95
TEMPLATE_NGRAM_SHARE = 0.25
TEMPLATE_NGRAM_MIN_COUNT = 5
_WORD = re.compile(r"\w+")
_CHUNK = 1024


def word_tokens(text: str) -> tuple[str, ...]:
    """Normalised word tokens (case, whitespace and punctuation ignored)."""
    return tuple(match.group().lower() for match in _WORD.finditer(text))


def template_ngrams(texts: list[str]) -> frozenset[str]:
    """13-grams that recur in at least TEMPLATE_NGRAM_SHARE of the texts (and TEMPLATE_NGRAM_MIN_COUNT)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(set(_windows(word_tokens(text), NGRAM)))
    threshold = max(TEMPLATE_NGRAM_MIN_COUNT, TEMPLATE_NGRAM_SHARE * len(texts))
    return frozenset(gram for gram, count in counts.items() if count >= threshold)


def without_template(text: str, template: frozenset[str]) -> str:
    """The text without the words that template 13-grams cover; the text as it is when none (or all) are."""
    if not template:
        return text
    words = list(_WORD.finditer(text))
    tokens = [word.group().lower() for word in words]
    covered = [False] * len(tokens)
    for start, gram in enumerate(_windows(tuple(tokens), NGRAM)):
        if gram in template:
            covered[start : start + NGRAM] = [True] * NGRAM
    if not any(covered) or all(covered):
        return text
    return " ".join(word.group() for word, template_word in zip(words, covered, strict=True) if not template_word)


@dataclass(frozen=True)
class Removal:
    """A training row removed, why, and the protected input it overlaps (indices into the inputs)."""

    row: int
    reason: str
    protected: int
    source: str


class _NgramIndex:
    """Protected token sequences, for `find` to say which one shares an n-gram with a text, where n is
    min(NGRAM, length of either text) and at least MIN_NGRAM_TOKENS."""

    def __init__(self, sequences: Mapping[int, tuple[str, ...]]) -> None:
        self._sequences = sequences
        self._long: dict[str, int] = {}  # every NGRAM-window of a protected text -> its index
        self._short: dict[int, dict[str, int]] = defaultdict(dict)  # a short protected text, by length
        self._windows: dict[int, dict[str, int]] = {}  # every window of one length, made when first needed
        for index, tokens in sequences.items():
            if len(tokens) >= NGRAM:
                for gram in _windows(tokens, NGRAM):
                    self._long.setdefault(gram, index)
            elif len(tokens) >= MIN_NGRAM_TOKENS:
                self._short[len(tokens)].setdefault(" ".join(tokens), index)

    def find(self, tokens: tuple[str, ...]) -> int | None:
        if len(tokens) < MIN_NGRAM_TOKENS:
            return None
        if len(tokens) >= NGRAM:
            for gram in _windows(tokens, NGRAM):
                if gram in self._long:
                    return self._long[gram]
        for length in sorted(self._short):  # a shorter protected text inside this one
            if length <= len(tokens):
                for gram in _windows(tokens, length):
                    if gram in self._short[length]:
                        return self._short[length][gram]
        if len(tokens) < NGRAM:  # this short text inside a protected one at least as long
            return self._windows_of(len(tokens)).get(" ".join(tokens))
        return None

    def _windows_of(self, length: int) -> dict[str, int]:
        if length not in self._windows:
            index: dict[str, int] = {}
            for position, tokens in self._sequences.items():
                for gram in _windows(tokens, length):
                    index.setdefault(gram, position)
            self._windows[length] = index
        return self._windows[length]


def _windows(tokens: tuple[str, ...], length: int) -> list[str]:
    return [" ".join(tokens[start : start + length]) for start in range(len(tokens) - length + 1)]


class Decontaminator:
    """Inputs (intent texts and their unit MiniLM vectors, one row each) and the removals made so far.

    `clean` is called once per protected set (the hold-out and the eval candidates before the eval split is
    drawn, then the eval split); every removal is counted once, by its first reason. `embed` embeds the
    texts that lose in-message template words (their given vectors describe the template)."""

    def __init__(self, texts: list[str], vectors: np.ndarray, embed: Callable[[list[str]], np.ndarray],
                 cosine: float = EMBEDDING_COSINE) -> None:
        if len(texts) != len(vectors):
            raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
        if not 0 < cosine <= 1:
            raise ValueError(f"embedding cosine threshold must be in (0, 1], got {cosine}")
        self.cosine = cosine
        self.removals: list[Removal] = []
        template = template_ngrams(texts)
        self.texts = [without_template(text, template) for text in texts]
        self.template_stripped = [i for i, text in enumerate(self.texts) if text != texts[i]]
        self.vectors = vectors
        if self.template_stripped:
            self.vectors = np.array(vectors, copy=True)
            self.vectors[self.template_stripped] = embed([self.texts[i] for i in self.template_stripped])
        self._tokens = [word_tokens(text) for text in self.texts]
        self._keys = [" ".join(tokens) if tokens else normalise(text) for tokens, text in
                      zip(self._tokens, self.texts, strict=True)]
        self._images = [frozenset(PLACEHOLDER.findall(text)) for text in texts]

    def clean(self, rows: list[int], protected: Mapping[int, str]) -> list[int]:
        """`rows` without those overlapping a protected input (index -> source), order kept; inputs with images
        against protected ones sharing an image only (module docstring)."""
        if not any(self._images[index] for index in [*rows, *protected]):
            return self._clean(rows, protected)
        kept = set(self._clean([row for row in rows if not self._images[row]],
                               {index: source for index, source in protected.items() if not self._images[index]}))
        for row in rows:
            if self._images[row]:
                shared = {index: source for index, source in protected.items()
                          if self._images[index] & self._images[row]}
                kept.update(self._clean([row], shared))
        return [row for row in rows if row in kept]

    def _clean(self, rows: list[int], protected: Mapping[int, str]) -> list[int]:
        if not rows or not protected:
            return list(rows)
        exact: dict[str, int] = {}
        for index in protected:
            exact.setdefault(self._keys[index], index)
        ngrams = _NgramIndex({index: self._tokens[index] for index in protected})
        found: dict[int, tuple[str, int]] = {}
        for row in rows:
            if self._keys[row] in exact:
                found[row] = ("exact", exact[self._keys[row]])
            elif (match := ngrams.find(self._tokens[row])) is not None:
                found[row] = ("ngram13", match)
        rest = [row for row in rows if row not in found]
        for row, match in self._embedding_matches(rest, list(protected)).items():
            found[row] = ("embedding", match)
        for row in rows:
            if row in found:
                reason, match = found[row]
                self.removals.append(Removal(row=row, reason=reason, protected=match, source=protected[match]))
        return [row for row in rows if row not in found]

    def _embedding_matches(self, rows: list[int], protected: list[int]) -> dict[int, int]:
        """The most similar protected input of each row at or above the threshold."""
        if not rows or not protected:
            return {}
        reference = self.vectors[protected]
        matches = {}
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            similarity = self.vectors[chunk] @ reference.T
            best = similarity.argmax(axis=1)
            scores = similarity[np.arange(len(chunk)), best]
            for row, column, score in zip(chunk, best.tolist(), scores.tolist(), strict=True):
                if score >= self.cosine:
                    matches[row] = protected[column]
        return matches

    def counts(self) -> dict[str, int]:
        """Removals per reason (`decontaminated_<reason>`) and in all (`decontaminated`)."""
        by_reason = Counter(removal.reason for removal in self.removals)
        return {**{f"decontaminated_{reason}": by_reason[reason] for reason in REASONS},
                "decontaminated": len(self.removals)}

    def by_source(self) -> dict[str, int]:
        by_source = Counter(removal.source for removal in self.removals)
        return {source: by_source[source] for source in SOURCES}
