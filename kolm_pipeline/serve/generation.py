"""Batched free-text and JSON generation for ``TransformersBackend``: continuous batching per adapter.

The passes themselves (rows joining, a decoding step, finished rows leaving) are evaluation's
(``evaluate/decoding.py``), so an adapter is served exactly as it was evaluated. Here are the threads around them:
a request joins its adapter's running batch at the next pass (its prompt read beside the others'), each decoding
step serves every running row, and a finished or abandoned row leaves the batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kolm_pipeline.evaluate.decoding import BatchDecoder, DecodeRow, RowBatch, growable
from kolm_pipeline.serve.backends import BackendError

if TYPE_CHECKING:
    from kolm_pipeline.evaluate.inference import PrefixCache
    from kolm_pipeline.serve.fair_lock import FairLock


@dataclass(eq=False)
class GenBatch(RowBatch):
    """One adapter's ``RowBatch`` and the requests waiting to join it at the next pass."""

    pending: list[DecodeRow] = field(default_factory=list)


class BatchedGeneration:
    """The free-text and JSON answers of a ``TransformersBackend``, batched per adapter, up to ``max_rows()`` rows.

    A request waits for the model (``lock``) like any other; whichever caller of the adapter gets it runs one pass
    for all its rows (the prompts of requests waiting to join, or one decoding step of the running rows) and hands
    every row its new pieces, so a caller still reading its pieces does not hold the others up, and one that stops
    reading (its generator closed) leaves the batch at the next pass. ``select(name)`` makes adapter ``name`` the
    one the next pass uses (called holding ``lock``); ``eos`` are the tokens that end an answer.
    """

    def __init__(self, model, tokenizer, eos: set[int], lock: FairLock, select: Callable[[str], None],
                 max_rows: Callable[[], int], prefixes: PrefixCache | None = None,
                 on_model_thread: Callable[[Callable[[], None]], None] = lambda work: work()) -> None:
        self._passes = BatchDecoder(model, tokenizer, eos, prefixes)
        self._lock = lock
        self._select = select
        self._max_rows = max_rows
        self._on_model_thread = on_model_thread  # runs a pass on the backend's one model thread
        self._batches: dict[str, GenBatch] = {}  # by adapter name; rows and cache changed holding _lock
        self._batches_lock = threading.Lock()  # guards _batches and each batch's pending list

    def stream(self, name: str, prompt: str, prompt_ids: list[int], max_tokens: int, decoder: Any = None,
               usage: dict | None = None) -> Iterator[str]:
        """The answer to ``prompt`` (its tokens ``prompt_ids``) with adapter ``name``, piece by piece, decoded in that
        adapter's batch; ``decoder`` (a JsonDecoder) holds it to a schema. When ``usage`` is given, fill in
        ``prompt_tokens``, ``completion_tokens``, ``confidence`` (the geometric mean of the answer's token
        probabilities) and ``finish_reason`` (``stop``, or ``length`` when ``max_tokens`` cut it off) once the
        answer is complete."""
        row = DecodeRow(prompt=prompt, prompt_ids=prompt_ids, max_tokens=max_tokens, decoder=decoder)
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
                         confidence=row.confidence, finish_reason=row.finish_reason)

    def _step(self, batch: GenBatch) -> None:
        """One forward pass for ``batch``, holding ``lock``: the prompts of the requests waiting to join (up to
        ``max_rows()`` rows in all), or else one decoding step of its running rows. An exception fails the
        rows of that pass (every running row when decoding), each with a BackendError."""
        for row in batch.rows:
            if row.cancelled:
                row.done = True
        running, admitted = list(batch.rows), []

        def work() -> None:
            nonlocal running, admitted
            with torch.inference_mode():
                self._passes.drop_finished(batch)
                running = list(batch.rows)
                with self._batches_lock:
                    for row in batch.pending:
                        if row.cancelled:
                            row.done = True
                    batch.pending = [row for row in batch.pending if not row.done]
                    if growable(batch):
                        admitted = batch.pending[: max(0, max(1, self._max_rows()) - len(batch.rows))]
                    del batch.pending[: len(admitted)]
                if self._passes.model is None:
                    raise BackendError("the backend is closed")
                self._select(batch.name)
                if admitted:
                    self._passes.join(batch, admitted)
                elif running:
                    self._passes.decode(batch)

        try:
            self._on_model_thread(work)
        except Exception as exc:  # noqa: BLE001 - every row of the pass gets the error
            if not admitted:  # the running rows' cache is in an unknown state: they all end here
                batch.clear()
            self._fail(admitted or running, exc)
        finally:
            with self._batches_lock:
                if not batch.rows and not batch.pending and self._batches.get(batch.name) is batch:
                    del self._batches[batch.name]

    @staticmethod
    def _fail(rows: list[DecodeRow], exc: Exception) -> None:
        """End the rows not finished yet with ``exc`` (as a BackendError): their callers raise it."""
        error = exc if isinstance(exc, BackendError) else BackendError(f"generation failed: {type(exc).__name__}: "
                                                                       f"{exc}")
        for row in rows:
            if not row.done:
                row.error, row.done = error, True

    def unload(self, name: str) -> None:
        """Fail the rows of adapter ``name`` (it was unloaded) and forget its answers; called holding ``lock``."""
        self._passes.drafters.pop(name, None)
        with self._batches_lock:
            batch = self._batches.pop(name, None)
        if batch is not None:  # only callers without a lease (or gone) can still be decoding with it
            self._fail([*batch.rows, *batch.pending], BackendError(f"adapter {name} was unloaded"))

    def close(self) -> None:
        """Fail every row, now and from now on (the backend is closed); called holding ``lock``."""
        self._passes.model = None
        with self._batches_lock:
            batches, self._batches = list(self._batches.values()), {}
        for batch in batches:
            self._fail([*batch.rows, *batch.pending], BackendError("the backend is closed"))
