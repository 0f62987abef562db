"""Batched free-text and JSON generation for ``TransformersBackend``: continuous batching per adapter.

* ``GenRow``: one answer being decoded, and the pieces its caller has yet to read.
* ``GenBatch``: the rows one adapter decodes together, with their shared KV cache, mask and positions.
* ``BatchedGeneration``: the batches of every adapter, and the passes that run them: a request joins its
  adapter's running batch at the next pass (its prompt read beside the others'), each decoding step serves
  every running row, and a finished or abandoned row leaves the batch (with the cache columns nobody needs).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kolm_pipeline.serve.backends import BackendError

if TYPE_CHECKING:
    from kolm_pipeline.serve.fair_lock import FairLock


@dataclass(eq=False)
class GenRow:
    """One free-text or JSON answer: where its decoding stands and the pieces its caller has yet to read.

    Written only by the thread that holds the model lock, except ``cancelled`` (set by the caller's
    generator when it is closed, from whatever thread closes it: a flag, no lock)."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    decoder: Any = None  # a JsonDecoder holding the answer to its schema, or None
    generated: list[int] = field(default_factory=list)
    logprob: float = 0.0  # the sum over ``generated`` of each token's log-probability under the model
    emitted: str = ""
    feed: int = 0  # the token the next decoding pass reads for this row
    pieces: deque[str] = field(default_factory=deque)
    done: bool = False
    cancelled: bool = False
    error: Exception | None = None


@dataclass(eq=False)
class GenBatch:
    """The rows one adapter decodes together: their shared KV cache (rows x columns, each row left-padded),
    attention mask and next positions, and the requests waiting to join at the next pass."""

    name: str
    rows: list[GenRow] = field(default_factory=list)
    pending: list[GenRow] = field(default_factory=list)
    cache: Any = None
    mask: Any = None
    positions: Any = None


def _pad_left(tensor, width: int, dim: int):
    """``tensor`` with zeros in front along ``dim`` up to ``width``."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _growable(cache) -> bool:
    """Whether rows can join ``cache`` and its unused left columns be cut: plain per-layer key/value tensors
    (``DynamicLayer``, what a full-attention model's ``DynamicCache`` holds). Otherwise (sliding windows,
    quantized or recurrent layers) a batch runs as a wave: requests join once it has finished."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


class BatchedGeneration:
    """The free-text and JSON answers of a ``TransformersBackend``, batched per adapter, up to ``max_rows()`` rows.

    A request waits for the model (``lock``) like any other; whichever caller of the adapter gets it runs one pass
    for all its rows (the prompts of requests waiting to join, or one decoding step of the running rows) and hands
    every row its new pieces, so a caller still reading its pieces does not hold the others up, and one that stops
    reading (its generator closed) leaves the batch at the next pass. ``select(name)`` makes adapter ``name`` the
    one the next pass uses (called holding ``lock``); ``eos`` are the tokens that end an answer.
    """

    def __init__(self, model, tokenizer, eos: set[int], lock: FairLock, select: Callable[[str], None],
                 max_rows: Callable[[], int]) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos = eos
        self._lock = lock
        self._select = select
        self._max_rows = max_rows
        self._batches: dict[str, GenBatch] = {}  # by adapter name; rows and cache changed holding _lock
        self._batches_lock = threading.Lock()  # guards _batches and each batch's pending list

    def stream(self, name: str, prompt: str, prompt_tokens: int, max_tokens: int, decoder: Any = None,
               usage: dict | None = None) -> Iterator[str]:
        """The answer to ``prompt`` (``prompt_tokens`` long) with adapter ``name``, piece by piece, decoded in that
        adapter's batch; ``decoder`` (a JsonDecoder) holds it to a schema. When ``usage`` is given, fill in
        ``prompt_tokens``, ``completion_tokens`` and ``confidence`` (the geometric mean of the answer's token
        probabilities) once the answer is complete."""
        row = GenRow(prompt=prompt, prompt_tokens=prompt_tokens, max_tokens=max_tokens, decoder=decoder)
        with self._batches_lock:
            batch = self._batches.get(name)
            if batch is None:
                batch = self._batches[name] = GenBatch(name)
            batch.pending.append(row)
        try:
            while True:
                finished = row.done  # read first: every piece of a finished row is queued before it is done
                while row.pieces:
                    yield row.pieces.popleft()
                if finished:
                    break
                with self._lock.hold(unless=lambda: bool(row.pieces) or row.done) as held:
                    if held and not row.pieces and not row.done:
                        self._step(batch)
        finally:
            row.cancelled = True  # the caller is gone (or done): the row leaves the batch at the next pass
        if row.error is not None:
            raise BackendError(str(row.error))
        if usage is not None:
            usage.update(prompt_tokens=row.prompt_tokens, completion_tokens=len(row.generated),
                         confidence=math.exp(row.logprob / len(row.generated)) if row.generated else 0.0)

    def _step(self, batch: GenBatch) -> None:
        """One forward pass for ``batch``, holding ``lock``: the prompts of the requests waiting to join (up to
        ``max_rows()`` rows in all), or else one decoding step of its running rows. An exception fails the
        rows of that pass (every running row when decoding), each with a BackendError."""
        import torch

        for row in batch.rows:
            if row.cancelled:
                row.done = True
        running, admitted = list(batch.rows), []
        try:
            with torch.inference_mode():
                self._drop_finished(batch)
                running = list(batch.rows)
                with self._batches_lock:
                    for row in batch.pending:
                        if row.cancelled:
                            row.done = True
                    batch.pending = [row for row in batch.pending if not row.done]
                    if batch.cache is None or _growable(batch.cache):
                        admitted = batch.pending[: max(0, max(1, self._max_rows()) - len(batch.rows))]
                    del batch.pending[: len(admitted)]
                if self._model is None:
                    raise BackendError("the backend is closed")
                self._select(batch.name)
                if admitted:
                    self._join(batch, admitted)
                elif running:
                    self._decode(batch)
        except Exception as exc:  # noqa: BLE001 - every row of the pass gets the error
            if not admitted:  # the running rows' cache is in an unknown state: they all end here
                batch.rows, batch.cache, batch.mask, batch.positions = [], None, None, None
            self._fail(admitted or running, exc)
        finally:
            with self._batches_lock:
                if not batch.rows and not batch.pending and self._batches.get(batch.name) is batch:
                    del self._batches[batch.name]

    @staticmethod
    def _fail(rows: list[GenRow], exc: Exception) -> None:
        """End the rows not finished yet with ``exc`` (as a BackendError): their callers raise it."""
        error = exc if isinstance(exc, BackendError) else BackendError(f"generation failed: {type(exc).__name__}: "
                                                                       f"{exc}")
        for row in rows:
            if not row.done:
                row.error, row.done = error, True

    def _join(self, batch: GenBatch, admitted: list[GenRow]) -> None:
        """Read the admitted rows' prompts (one left-padded pass, their shared prefix once), choose each one's
        first token, and add the rows still going to the batch: their cache, mask and positions beside the
        running rows', both padded on the left to the same width."""
        import torch

        from kolm_pipeline.evaluate.inference import _prompt_pass

        out, mask, positions = _prompt_pass(self._model, self._tokenizer, [row.prompt for row in admitted],
                                            next(self._model.parameters()).device)
        self._advance(admitted, out.logits[:, -1])
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

    def _decode(self, batch: GenBatch) -> None:
        """One decoding step of every running row: each reads the token chosen for it last."""
        import torch

        device = batch.mask.device
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        out = self._model(input_ids=torch.tensor([[row.feed] for row in batch.rows], device=device),
                          attention_mask=batch.mask, position_ids=batch.positions, past_key_values=batch.cache,
                          use_cache=True)
        batch.cache, batch.positions = out.past_key_values, batch.positions + 1
        self._advance(batch.rows, out.logits[:, -1])
        self._drop_finished(batch)

    def _advance(self, rows: list[GenRow], logits) -> None:
        """Choose each row's next token from its logits (greedy; under its grammar for a JSON row), queue the
        text it completes, and mark the rows that are done: at an EOS token, at ``max_tokens``, or (JSON) once
        the object is closed."""
        import torch

        greedy = logits.argmax(dim=-1).tolist() if any(row.decoder is None for row in rows) else None
        chosen = [row.decoder.choose(logits[index]) if row.decoder is not None else greedy[index]
                  for index, row in enumerate(rows)]
        # The model's own probability of each chosen token (before any grammar mask): the answer's confidence.
        logprobs = logits.float().log_softmax(-1).gather(
            1, logits.new_tensor(chosen, dtype=torch.long).unsqueeze(1)).squeeze(1).tolist()
        for row, token, logprob in zip(rows, chosen, logprobs, strict=True):
            if token in self._eos:
                row.done = True
                continue
            row.generated.append(token)
            row.logprob += logprob
            row.feed = token
            text = self._tokenizer.decode(row.generated, skip_special_tokens=True).lstrip()
            if not text.endswith("\ufffd"):  # else a multi-byte character is still incomplete
                piece, row.emitted = text[len(row.emitted) :], text
                if piece:
                    row.pieces.append(piece)
            if len(row.generated) >= row.max_tokens or (row.decoder is not None and row.decoder.finished):
                row.done = True  # JSON: the object is closed, the end of the turn is all that could follow

    def _drop_finished(self, batch: GenBatch) -> None:
        """Take the finished rows out of the batch, and the cache columns no running row attends to any more."""
        import torch

        keep = [index for index, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            batch.rows, batch.cache, batch.mask, batch.positions = [], None, None, None
            return
        index = torch.tensor(keep, device=batch.mask.device)
        batch.cache.batch_select_indices(index)
        batch.mask, batch.positions = batch.mask[index], batch.positions[index]
        batch.rows = [batch.rows[i] for i in keep]
        if _growable(batch.cache):
            unused = int(batch.mask.any(dim=0).int().argmax())  # leading columns that were only others' padding
            if unused:
                for layer in batch.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
                batch.mask = batch.mask[:, unused:]

    def unload(self, name: str) -> None:
        """Fail the rows of adapter ``name`` (it was unloaded); called holding ``lock``."""
        with self._batches_lock:
            batch = self._batches.pop(name, None)
        if batch is not None:  # only callers without a lease (or gone) can still be decoding with it
            self._fail([*batch.rows, *batch.pending], BackendError(f"adapter {name} was unloaded"))

    def close(self) -> None:
        """Fail every row, now and from now on (the backend is closed); called holding ``lock``."""
        self._model = None
        with self._batches_lock:
            batches, self._batches = list(self._batches.values()), {}
        for batch in batches:
            self._fail([*batch.rows, *batch.pending], BackendError("the backend is closed"))
