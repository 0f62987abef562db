"""Greedy decoding of free-text and JSON answers in a continuous batch: evaluation and `kolm serve` run the same
code, so an evaluated adapter answers as it will be served (token for token in float32; in bfloat16, which
``KOLM_INFERENCE_DTYPE=auto`` picks on hardware with bf16 matmuls, a batch of another shape can flip a near-tie).

* ``DecodeRow``: one answer being decoded, and the text pieces its reader has yet to take.
* ``RowBatch``: the rows one adapter decodes together, with their shared KV cache, mask and positions.
* ``BatchDecoder``: the passes over a batch. ``join`` reads new rows' prompts (their shared prefix once, or from a
  ``PrefixCache``) and puts them beside the running rows; ``decode`` runs one step of every running row; a
  finished row leaves the batch at once, with the cache columns nobody needs any more. A JSON row feeds the tokens
  its schema forces after its chosen one in the same pass (jump-forward: ``JsonDecoder.forced``), so a step reads
  one token for some rows and several for others, each row's tokens right-aligned and masked in front. That only
  pays while a pass costs about the same whatever it reads (few rows): a pass reads at most ``pass_tokens``
  row-tokens in all, and a row whose forced tokens did not all fit reads the rest in the next passes (its next
  token is known, so the model chooses nothing for it meanwhile). Room a row's own tokens leave in a pass goes to a
  draft of how its answer goes on (``drafting.py``: from the request and the adapter's earlier answers), which the
  model checks in that pass (speculative decoding without a draft model): answers are those of plain greedy
  decoding, in fewer passes.
* ``decode_prompts``: every prompt of a list through one batch of at most ``batch_size`` rows (evaluation): a row
  that finishes makes room for the next prompt, so a long answer no longer holds a whole batch of short ones.

A JSON row carries a ``JsonDecoder`` (``structured.py``): its tokens are chosen under the schema's grammar and it is
done once the object closes. In its last ``CLOSING_ROOM`` tokens it closes its object where the grammar allows
(``JsonDecoder.choose``'s ``closing``), so an answer that would have been cut off still parses; it says
``finish_reason: "length"``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from kolm_pipeline.evaluate.drafting import AnswerDrafter
from kolm_pipeline.evaluate.inference import PrefixCache, prompt_pass, step_inputs


@dataclass(eq=False)
class DecodeRow:
    """One free-text or JSON answer: where its decoding stands and the pieces its reader has yet to take.

    Written only by whoever runs the batch's passes, except ``cancelled`` (set by a reader that went away: a flag,
    no lock)."""

    prompt: str
    prompt_ids: list[int]  # what the prompt pass reads; also the usage's prompt_tokens and where drafts look up spans
    max_tokens: int
    decoder: Any = None  # a JsonDecoder holding the answer to its schema, or None
    generated: list[int] = field(default_factory=list)
    logprob: float = 0.0  # the sum of the model's log-probability of each token it chose (not the forced ones)
    chosen: int = 0  # tokens the model chose (the rest of ``generated`` the schema forced)
    emitted: str = ""
    feed: list[int] = field(default_factory=list)  # the tokens the next decoding pass reads for this row
    pieces: deque[str] = field(default_factory=deque)
    done: bool = False
    finish_reason: str = "stop"  # or "length": cut off at max_tokens (JSON: closed early to fit)
    cancelled: bool = False
    error: Exception | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def confidence(self) -> float:
        """The geometric mean of the probabilities of the tokens the model chose (0 for an empty answer)."""
        return math.exp(self.logprob / self.chosen) if self.chosen else 0.0


@dataclass(eq=False)
class RowBatch:
    """The rows one adapter decodes together: their shared KV cache (rows x columns, each row left-padded),
    attention mask and next positions."""

    name: str
    rows: list[DecodeRow] = field(default_factory=list)
    cache: Any = None
    mask: Any = None
    positions: Any = None

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.positions = [], None, None, None


def _pad_left(tensor, width: int, dim: int):
    """``tensor`` with zeros in front along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def growable(batch: RowBatch) -> bool:
    """Whether rows can join ``batch`` and its unused left columns be cut: an empty batch, or one whose cache is
    plain per-layer key/value tensors (``DynamicLayer``, what a full-attention model's ``DynamicCache`` holds).
    Otherwise (sliding windows, quantized or recurrent layers) a batch runs as a wave: rows join once it has
    finished."""
    from transformers.cache_utils import DynamicLayer

    if batch.cache is None:
        return True
    layers = getattr(batch.cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


# Row-tokens a decoding pass may read: about what a pass reads at the cost of one token per row (chosen with
# bench/decode.py --widths; docs/benchmarks.md, session 14). On a GPU a pass costs the same up to far more.
CPU_PASS_TOKENS = 16
GPU_PASS_TOKENS = 256
# The last tokens of a JSON answer's room, in which it closes its object: enough for a key name of a few tokens,
# its value opened and closed, and the brackets of a few levels.
CLOSING_ROOM = 16


class BatchDecoder:
    """The forward passes of a ``RowBatch`` on ``model`` (the adapter already selected by the caller); ``eos`` are
    the tokens that end an answer, ``prefixes`` keeps each adapter's shared prompt prefix between passes."""

    def __init__(self, model, tokenizer, eos: set[int], prefixes: PrefixCache | None = None,
                 pass_tokens: int | None = None, drafting: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = eos
        self.prefixes = prefixes
        self.drafting = drafting
        self.drafters: dict[str, AnswerDrafter] = {}  # by adapter name: its answers so far, for drafts
        if pass_tokens is None:
            cpu = next(model.parameters()).device.type == "cpu"
            pass_tokens = CPU_PASS_TOKENS if cpu else GPU_PASS_TOKENS
        self.pass_tokens = pass_tokens

    def join(self, batch: RowBatch, admitted: list[DecodeRow]) -> None:
        """Read the admitted rows' prompts (one left-padded pass, their shared prefix once), choose each one's
        first token, and add the rows still going to the batch: their cache, mask and positions beside the
        running rows', both padded on the left to the same width."""
        out, mask, positions = prompt_pass(self.model, self.tokenizer, [row.prompt_ids for row in admitted],
                                           next(self.model.parameters()).device, self.prefixes, batch.name)
        self.advance(admitted, out.logits[:, -1])
        keep = [index for index, row in enumerate(admitted) if not row.done]
        if not keep:
            return
        cache = out.past_key_values
        if len(keep) < len(admitted):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
        rows = [admitted[index] for index in keep]
        if batch.cache is None:
            batch.cache, batch.mask, batch.positions, batch.rows = cache, mask, positions, rows
            return
        width = max(batch.mask.shape[1], mask.shape[1])

        def side_by_side(running, joining, dim: int):
            return torch.cat([_pad_left(running, width, dim), _pad_left(joining, width, dim)])

        layers = [(side_by_side(mine.keys, theirs.keys, -2), side_by_side(mine.values, theirs.values, -2))
                  for mine, theirs in zip(batch.cache.layers, cache.layers, strict=True)]
        mask, positions = side_by_side(batch.mask, mask, -1), torch.cat([batch.positions, positions])
        # Only assignments from here on: a failure above leaves the running rows' cache as it was.
        for layer, (keys, values) in zip(batch.cache.layers, layers, strict=True):
            layer.keys, layer.values = keys, values
        batch.mask, batch.positions = mask, positions
        batch.rows = batch.rows + rows

    def drafter(self, name: str) -> AnswerDrafter:
        """The drafter of adapter ``name``'s answers (made on first use)."""
        drafter = self.drafters.get(name)
        if drafter is None:
            drafter = self.drafters[name] = AnswerDrafter(self.tokenizer)
        return drafter

    def _draft(self, batch: RowBatch, row: DecodeRow, limit: int) -> list[int]:
        if not self.drafting or limit <= 0:
            return []
        return self.drafter(batch.name).draft(row.prompt_ids, row.generated, limit)

    def decode(self, batch: RowBatch) -> None:
        """One decoding step of every running row: each reads the token chosen for it last, the tokens its schema
        forced after it (as many as fit in the pass) and, where room is left, a draft of how it goes on
        (``drafting.py``), right-aligned; the model chooses the next tokens of the rows that read all theirs: the
        draft's tokens up to the first it would not have chosen, and its own choice there. A draft's rejected
        tokens are masked out of the cache (their columns stay, unread by anyone)."""
        room = max(1, self.pass_tokens // len(batch.rows))
        feeds, drafts = [], []
        for row in batch.rows:
            feed, row.feed = row.feed[:room], row.feed[room:]
            draft = self._draft(batch, row, room - len(feed)) if not row.feed else []
            feeds.append(feed + draft)
            drafts.append(draft)
        ids, batch.mask, positions = step_inputs(feeds, self.tokenizer.pad_token_id, batch.mask, batch.positions)
        out = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                         past_key_values=batch.cache, use_cache=True,
                         logits_to_keep=1 + max(len(draft) for draft in drafts))
        batch.cache, batch.positions = out.past_key_values, positions[:, -1:] + 1
        choosing = [index for index, row in enumerate(batch.rows) if not row.feed]
        if choosing:
            rejected = self.advance([batch.rows[index] for index in choosing], out.logits[choosing],
                                    [drafts[index] for index in choosing])
            for index, unread in zip(choosing, rejected, strict=True):
                if unread:  # the draft's tokens after the first the model did not choose
                    batch.mask[index, -unread:] = 0
                    batch.positions[index] -= unread
        self.drop_finished(batch)

    @staticmethod
    def closing(row: DecodeRow) -> bool:
        """Whether a JSON row is in the last ``CLOSING_ROOM`` tokens of its room (then it closes its object)."""
        return row.max_tokens - len(row.generated) <= CLOSING_ROOM

    def advance(self, rows: list[DecodeRow], logits, drafts: list[list[int]] | None = None) -> list[int]:
        """Choose each row's next tokens (greedy; under its grammar for a JSON row), queue the text they complete,
        and mark the rows that are done: at an EOS token, at ``max_tokens``, or (JSON) once the object is closed.

        ``logits`` (rows x positions x vocabulary, or rows x vocabulary for one position) end with the positions
        that read each row's draft (``drafts[i]``); row i's choice is taken at the position before its draft, and
        again after each draft token that is what was chosen (with the tokens the schema forces after it). The
        number of each row's draft tokens the model did not take, from the first it would not have chosen on."""
        if logits.dim() == 2:
            logits = logits.unsqueeze(1)
        drafts = drafts or [[] for _ in rows]
        # The model's own probability of each token (before any grammar mask): the answer's confidence.
        logprobs = logits.float().log_softmax(-1)
        rejected = []
        for index, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
            position, unread = logits.shape[1] - len(draft) - 1, draft
            while True:
                scores = logits[index, position]
                token = (row.decoder.choose(scores, closing=self.closing(row)) if row.decoder is not None
                         else int(scores.argmax()))
                pending = self._take(row, token, float(logprobs[index, position, token]))
                read = 0  # the new tokens the pass read already: the draft guessed them
                while read < len(pending) and read < len(unread) and pending[read] == unread[read]:
                    read += 1
                unread = unread[read:]
                if row.done or read < len(pending):
                    row.feed = pending[read:]
                    break
                position += read
            rejected.append(len(unread))
            self._emit(row)
        return rejected

    def _take(self, row: DecodeRow, token: int, logprob: float) -> list[int]:
        """Add ``token``, the model's choice, to ``row`` and the tokens its schema forces after it; mark the row done
        where it ends. The tokens added (none at an EOS token)."""
        if token in self.eos:
            row.done = True
            return []
        row.generated.append(token)
        row.logprob += logprob
        row.chosen += 1
        added = [token]
        if row.decoder is not None:
            forced = row.decoder.forced(self.tokenizer, row.max_tokens - len(row.generated))
            row.generated.extend(forced)
            added.extend(forced)
        if row.decoder is not None and row.decoder.finished:
            row.done = True  # JSON: the object is closed, the end of the turn is all that could follow
            if row.decoder.shortened:
                row.finish_reason = "length"
        elif len(row.generated) >= row.max_tokens:
            row.done, row.finish_reason = True, "length"
        return added

    def _emit(self, row: DecodeRow) -> None:
        """Queue the text ``row``'s new tokens complete (none while a multi-byte character is incomplete)."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True).lstrip()
        if not text.endswith("\ufffd"):
            piece, row.emitted = text[len(row.emitted) :], text
            if piece:
                row.pieces.append(piece)

    def drop_finished(self, batch: RowBatch) -> None:
        """Take the finished rows out of the batch, and the cache columns no running row attends to any more."""
        keep = [index for index, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return
        if self.drafting:
            for row in batch.rows:
                if row.done and not row.cancelled and row.error is None:
                    self.drafter(batch.name).learn(row.generated)
        if not keep:
            batch.clear()
            return
        index = torch.tensor(keep, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.mask, batch.positions = batch.mask[index], batch.positions[index]
        batch.rows = [batch.rows[i] for i in keep]
        if growable(batch):
            unused = int(batch.mask.any(dim=0).int().argmax())  # leading columns that were only others' padding
            if unused:
                for layer in batch.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
                batch.mask = batch.mask[:, unused:]


# A running batch takes in new prompts once this share of its rows has finished: reading prompts is a pass of its
# own, which the running rows wait for.
REFILL_SHARE = 0.25


@torch.inference_mode()
def decode_prompts(decoder: BatchDecoder, prompts: list[str], max_tokens: int, batch_size: int,
                   json_decoders: list[Any] | None = None) -> list[DecodeRow]:
    """Every prompt's answer (greedy, at most ``max_tokens`` new tokens; held to ``json_decoders[i]`` when given),
    decoded in one continuous batch of at most ``batch_size`` rows, in order."""
    encode = decoder.tokenizer
    rows = [DecodeRow(prompt=prompt, prompt_ids=encode(prompt, add_special_tokens=False).input_ids,
                      max_tokens=max_tokens, decoder=json_decoders[index] if json_decoders else None)
            for index, prompt in enumerate(prompts)]
    waiting = deque(rows)
    batch = RowBatch(name="")
    refill = max(1, math.ceil(REFILL_SHARE * batch_size))
    while waiting or batch.rows:
        room = batch_size - len(batch.rows)
        if waiting and growable(batch) and (not batch.rows or room >= min(refill, len(waiting))):
            decoder.join(batch, [waiting.popleft() for _ in range(min(room, len(waiting)))])
        else:
            decoder.decode(batch)
    return rows
