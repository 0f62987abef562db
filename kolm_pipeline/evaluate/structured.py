"""Schema-constrained JSON decoding (xgrammar): every answer of a JSON task parses and fits its schema.

The recipe's ``json_schema`` (with the key order and layout of the teacher's answers, ``corpus/json_grammar.py``)
is compiled once per (tokenizer, vocabulary size, stop tokens, schema) and cached. At each step the grammar
allows only the tokens that keep the answer on a path to a schema-valid object; once the object is closed
it allows only the end of the turn, and decoding stops right there (no forward pass is spent on the stop
token: ``JsonDecoder.finished``).

Three rules on top of the grammar, each following the answer with a ``JsonCursor`` (``grounding.py``):

* No raw control character inside a string (xgrammar's JSON strings allow them; JSON parsers refuse them).
* An answer about to run out of room closes its object instead of being cut off (``choose``'s ``closing``): the
  last few tokens of the budget go, wherever the grammar allows it, to tokens that only close strings, arrays and
  objects (``"``, ``]``, ``}``), so every answer parses and fits its schema even when the model would have gone on
  (a key repeated, a span that never ends); the row says ``finish_reason: "length"``.
* A string the schema marks grounded is written as text of the request (``grounding.py``).

``JsonDecoder`` masks one answer's logits step by step; evaluation and `kolm serve` give one to each JSON row of
their batch (``decoding.py``), made by ``json_decoder``.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import torch

from kolm_pipeline.corpus.json_grammar import JsonSchemaProblem, json_grammar
from kolm_pipeline.evaluate.grounding import JsonCursor

__all__ = ["JsonDecoder", "JsonSchemaProblem", "compile_json_schema", "json_decoder", "stop_token_ids", "vocab_size"]

_lock = threading.Lock()
# tokenizer -> {(vocabulary size, stop tokens): _Vocabulary}; dropped with the tokenizer.
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CLOSING_CHARACTERS = frozenset('"]}')
CANDIDATES = 256  # the model's best tokens tried, in order, for one that keeps a grounded string in its source


@dataclass
class _Vocabulary:
    """What decoding needs to know of a tokenizer's tokens, computed once: its grammar compiler (and the schemas
    compiled with it), each token's bytes, and which tokens only close what is open or hold a control character."""

    compiler: object
    compiled: dict
    token_bytes: list[bytes]
    closers: torch.Tensor
    string_closers: torch.Tensor  # the closers that start by ending a string (``"``, ``"]``, ``"}``, …)
    control: torch.Tensor
    _ids: dict[bytes, int] | None = None

    def ids(self) -> dict[bytes, int]:
        """Each token's id by its bytes (the first, where two tokens write the same bytes), built when first asked."""
        if self._ids is None:
            ids: dict[bytes, int] = {}
            for token, data in enumerate(self.token_bytes):
                if data:
                    ids.setdefault(data, token)
            self._ids = ids
        return self._ids


def _closes(data: bytes) -> bool:
    """Whether a token's text only closes what is open: white space and empty ``{}``/``[]`` aside, nothing but
    ``"``, ``]`` and ``}`` (``"``, ``"]``, ``}}``, ``{}``, ``[]}``, …)."""
    text = data.decode("utf-8", "ignore").strip()
    return bool(text) and set(text.replace("{}", "").replace("[]", "")) <= CLOSING_CHARACTERS


def _vocabulary(tokenizer, vocab: int, stops: list[int]) -> _Vocabulary:
    import xgrammar

    per_tokenizer = _vocabularies.setdefault(tokenizer, {})
    entry = per_tokenizer.get((vocab, tuple(stops)))
    if entry is None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=list(stops))
        token_bytes = [bytes(data) for data in info.decoded_vocab]
        special = set(info.special_token_ids) | set(stops)
        closers = torch.tensor([token not in special and _closes(data) for token, data in enumerate(token_bytes)])
        string_closers = closers & torch.tensor([data.startswith(b'"') for data in token_bytes])
        control = torch.tensor([token not in special and any(byte < 0x20 for byte in data)
                                for token, data in enumerate(token_bytes)])
        entry = per_tokenizer[(vocab, tuple(stops))] = _Vocabulary(xgrammar.GrammarCompiler(info), {}, token_bytes,
                                                                    closers, string_closers, control)
    return entry


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end the answer: the tokenizer's EOS and the model's generation-config EOS ids."""
    eos = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(token for token in eos if token is not None)


def vocab_size(model) -> int:
    """Width of the model's logits (may exceed the tokenizer's vocabulary: padded embeddings)."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return int(embeddings.weight.shape[0])
    return int(model.config.vocab_size)


def _compiled(tokenizer, schema: dict, vocab: int, stops: list[int]) -> tuple[object, _Vocabulary]:
    key = json.dumps(schema, sort_keys=True)
    with _lock:
        entry = _vocabulary(tokenizer, vocab, stops)
        compiled = entry.compiled.get(key)
        if compiled is None:
            grammar = json_grammar(schema)  # JsonSchemaProblem names what is wrong
            try:
                compiled = entry.compiler.compile_grammar(grammar)
            except (RuntimeError, ValueError) as exc:
                raise JsonSchemaProblem(f"json_schema: cannot be compiled for this tokenizer: {exc}") from None
            entry.compiled[key] = compiled
    return compiled, entry


def compile_json_schema(tokenizer, schema: dict, *, vocab: int, stops: list[int]):
    """The schema compiled for this tokenizer (an xgrammar ``CompiledGrammar``), cached; JsonSchemaProblem when
    the schema cannot be compiled."""
    return _compiled(tokenizer, schema, vocab, stops)[0]


def json_decoder(tokenizer, schema: dict, vocab: int, stops: list[int], messages: list[dict]) -> JsonDecoder:
    """A fresh decoder holding one answer to ``messages`` to ``schema`` (compiled once per schema), its grounded
    strings held to the request's text. JsonSchemaProblem when the schema cannot be compiled."""
    compiled, vocabulary = _compiled(tokenizer, schema, vocab, stops)
    return JsonDecoder(compiled, vocabulary, stops, JsonCursor.for_request(schema, messages))


class JsonDecoder:
    """Greedy choice of one answer's next token under the schema, step by step (its grammar matcher and the token
    bitmask it fills, and the cursor following the answer), and the tokens the schema forces after it
    (``forced``)."""

    def __init__(self, compiled, vocabulary: _Vocabulary, stops: list[int], cursor: JsonCursor) -> None:
        import xgrammar

        self._xgr = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._vocab = len(vocabulary.token_bytes)
        self._bitmask = xgrammar.allocate_token_bitmask(1, self._vocab)
        self._vocabulary = vocabulary
        self._cursor = cursor
        self._filled = False
        self.finished = False  # the object is closed: nothing but a stop token may follow
        self.shortened = False  # ``closing`` chose a token the model would not have: the answer was cut short
        stops_only = torch.zeros_like(self._bitmask[0])
        for token in stops:
            stops_only[token // 32] |= 1 << (token % 32)
        self._stops_only = stops_only

    def _fill(self) -> None:
        if not self._filled:
            self._matcher.fill_next_token_bitmask(self._bitmask)
            self._filled = True

    def _accept(self, token: int) -> bool:
        """Advance by ``token`` if the grammar allows it here (else nothing changes)."""
        if not self._matcher.accept_token(token):
            return False
        self._filled = False
        self._cursor.feed(self._vocabulary.token_bytes[token])
        if self._matcher.is_terminated():
            self.finished = True
        elif self._matcher.is_completed():  # the object is closed: only a stop token may follow
            self._fill()
            self.finished = bool(torch.equal(self._bitmask[0], self._stops_only))
        return True

    def _only(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``scores`` with every token outside ``allowed`` (a bool tensor over the vocabulary) at -inf."""
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        width = min(scores.shape[-1], allowed.shape[0])
        keep[:width] = allowed[:width].to(scores.device)
        return scores.masked_fill(~keep, float("-inf"))

    def choose(self, logits: torch.Tensor, closing: bool = False) -> int:
        """The best allowed token for 1-D ``logits``, already fed to the grammar; with ``closing`` (the answer is
        about to run out of room), the best allowed token that only closes what is open, where there is one."""
        scores = logits.float().reshape(1, -1).clone()
        if not self.finished:
            self._fill()
            target = scores if scores.device.type in ("cpu", "cuda") else scores.cpu()
            bitmask = self._bitmask if target.device.type == "cpu" else self._bitmask.to(target.device)
            self._xgr.apply_token_bitmask_inplace(target, bitmask, vocab_size=min(self._vocab, target.shape[-1]))
            scores = target
            if self._cursor.in_string:
                scores = self._only(scores, ~self._vocabulary.control)
            if closing:
                closing_scores = self._only(scores, self._closers())
                if bool(torch.isfinite(closing_scores).any()):
                    token = int(closing_scores[0].argmax())
                    self.shortened = self.shortened or token != int(scores[0].argmax())
                    scores = closing_scores
            elif self._cursor.at_grounded():
                grounded = self._grounded_choice(scores[0])
                if grounded is not None:
                    scores = torch.full_like(scores, float("-inf"))
                    scores[0, grounded] = 0.0
        token = int(scores[0].argmax())
        if not self._accept(token):
            raise RuntimeError(f"the JSON grammar rejected token {token} chosen under its own mask")
        return token

    def _closers(self) -> torch.Tensor:
        """The tokens that close what is open here: inside a string only those that end it (``]`` or ``{}`` there
        would be more of the string)."""
        return self._vocabulary.string_closers if self._cursor.in_string else self._vocabulary.closers

    def _grounded_choice(self, scores: torch.Tensor) -> int | None:
        """The best allowed token that keeps every grounded string in its source (``grounding.py``): among the
        model's best CANDIDATES, else among the tokens that close what is open (``"`` ends a string that keeps to its
        source so far, unless it must end at a word boundary), else among the tokens that go on as the source does
        (a whole word not ended yet); None if none does."""

        def keeps(values: torch.Tensor, indices: torch.Tensor) -> int | None:
            for value, token in zip(values.tolist(), indices.tolist(), strict=True):
                if value == float("-inf"):
                    return None
                if self._cursor.copy().feed(self._vocabulary.token_bytes[token]):
                    return token
            return None

        found = keeps(*scores.topk(min(CANDIDATES, scores.shape[-1])))
        if found is None:  # rare: sort the closers only then
            found = keeps(*self._only(scores.unsqueeze(0), self._closers())[0].sort(descending=True))
        if found is None:  # a whole word not ended yet: the tokens that go on as the source does
            ids = self._vocabulary.ids()
            going_on = sorted({ids[text[:length]] for text in self._cursor.continuations()
                               for length in range(1, len(text) + 1) if text[:length] in ids})
            if going_on:
                candidates = torch.tensor(going_on)
                values, order = scores[candidates].sort(descending=True)
                found = keeps(values, candidates[order])
        return found

    def forced(self, tokenizer, limit: int) -> list[int]:
        """Up to ``limit`` tokens the schema forces next, already fed to the grammar: its jump-forward string (the
        longest text every valid continuation starts with: ``", "slots": {"`` after an intent list closes) as
        the tokenizer splits it, less its last token, which may merge with what follows (``"`` + ``]`` is one
        token ``"]``), so the model picks that one itself and the answer is tokenized as the teacher's answers
        were in training. The model reads them all in one pass instead of one pass each (jump-forward
        decoding, as SGLang does)."""
        if self.finished or limit <= 0:
            return []
        text = self._matcher.find_jump_forward_string()
        if not text:
            return []
        taken: list[int] = []
        for token in tokenizer(text, add_special_tokens=False).input_ids[:-1][:limit]:
            if not self._accept(token):
                break
            taken.append(token)
            if self.finished:
                break
        return taken
