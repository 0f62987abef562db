"""Schema-constrained JSON decoding (xgrammar): every answer of a JSON task parses and fits its schema.

The recipe's ``json_schema`` (with the key order and layout of the teacher's answers, ``corpus/json_grammar.py``)
is compiled once per (tokenizer, vocabulary size, stop tokens, schema) and cached. At each step the grammar
allows only the tokens that keep the answer on a path to a schema-valid object; once the object is closed
it allows only the end of the turn, and decoding stops right there (no forward pass is spent on the stop
token: ``JsonDecoder.finished``).

An answer about to run out of room closes its object instead of being cut off (``JsonDecoder.choose``'s
``closing``): the last few tokens of the budget go, wherever the grammar allows it, to tokens that only close
strings, arrays and objects (``"``, ``]``, ``}``), so every answer parses and fits its schema even when the model
would have gone on (a key repeated, a span that never ends); the row says ``finish_reason: "length"``.

``JsonDecoder`` masks one answer's logits step by step; evaluation and `kolm serve` give one to each JSON row of
their batch (``decoding.py``).
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass

import torch

from kolm_pipeline.corpus.json_grammar import JsonSchemaProblem, json_grammar

__all__ = ["JsonDecoder", "JsonSchemaProblem", "closing_tokens", "compile_json_schema", "stop_token_ids",
           "vocab_size"]

_lock = threading.Lock()
# tokenizer -> {(vocabulary size, stop tokens): _Compiler}; dropped with the tokenizer.
_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# tokenizer -> {vocabulary size: bool tensor of the tokens that only close strings, arrays and objects}
_closers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CLOSING_CHARACTERS = frozenset('"]}')


@dataclass
class _Compiler:
    compiler: object
    compiled: dict


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


def compile_json_schema(tokenizer, schema: dict, *, vocab: int, stops: list[int]):
    """The schema compiled for this tokenizer (an xgrammar ``CompiledGrammar``), cached; JsonSchemaProblem when
    the schema cannot be compiled."""
    import xgrammar

    key = json.dumps(schema, sort_keys=True)
    with _lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        entry = per_tokenizer.get((vocab, tuple(stops)))
        if entry is None:
            info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=list(stops))
            entry = per_tokenizer[(vocab, tuple(stops))] = _Compiler(xgrammar.GrammarCompiler(info), {})
        compiled = entry.compiled.get(key)
        if compiled is None:
            grammar = json_grammar(schema)  # JsonSchemaProblem names what is wrong
            try:
                compiled = entry.compiler.compile_grammar(grammar)
            except (RuntimeError, ValueError) as exc:
                raise JsonSchemaProblem(f"json_schema: cannot be compiled for this tokenizer: {exc}") from None
            entry.compiled[key] = compiled
    return compiled


def closing_tokens(tokenizer, vocab: int) -> torch.Tensor:
    """Which of ``vocab`` tokens only close what is open: their text, white space and empty ``{}``/``[]`` aside, is
    made of ``"``, ``]`` and ``}`` (``"``, ``"]``, ``}}``, ``{}``, ``[]}``, …); cached per tokenizer."""
    with _lock:
        per_tokenizer = _closers.setdefault(tokenizer, {})
        closers = per_tokenizer.get(vocab)
        if closers is None:
            closers = torch.zeros(vocab, dtype=torch.bool)
            texts = tokenizer.batch_decode([[token] for token in range(min(vocab, len(tokenizer)))])
            for token, text in enumerate(texts):
                text = text.strip()
                closers[token] = bool(text) and set(text.replace("{}", "").replace("[]", "")) <= CLOSING_CHARACTERS
            per_tokenizer[vocab] = closers
    return closers


class JsonDecoder:
    """Greedy choice of one answer's next token under the schema, step by step (its grammar matcher and the token
    bitmask it fills), and the tokens the schema forces after it (``forced``)."""

    def __init__(self, compiled, vocab: int, stops: list[int], closers: torch.Tensor) -> None:
        import xgrammar

        self._xgr = xgrammar
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab)
        self._vocab = vocab
        self._closers = closers  # closing_tokens(): what ``choose(closing=True)`` prefers
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
        if self._matcher.is_terminated():
            self.finished = True
        elif self._matcher.is_completed():  # the object is closed: only a stop token may follow
            self._fill()
            self.finished = bool(torch.equal(self._bitmask[0], self._stops_only))
        return True

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
            if closing:
                width = min(scores.shape[-1], self._closers.shape[0])
                closers = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                closers[:width] = self._closers[:width].to(scores.device)
                closing_scores = scores.masked_fill(~closers, float("-inf"))
                if bool(torch.isfinite(closing_scores).any()):
                    token = int(closing_scores[0].argmax())
                    self.shortened = self.shortened or token != int(scores[0].argmax())
                    scores = closing_scores
        token = int(scores[0].argmax())
        if not self._accept(token):
            raise RuntimeError(f"the JSON grammar rejected token {token} chosen under its own mask")
        return token

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
