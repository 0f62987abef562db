"""Serving backends: what actually runs the base model plus LoRA adapters.

* ``TransformersBackend`` keeps the base model in this process with every loaded adapter beside it
  (``LoraSlots``: PEFT-format adapters, switched per forward pass). Free-text and JSON answers of one adapter
  are decoded together, one forward pass per lock hold for the whole batch (continuous batching: a request
  joins the running batch at the next pass, a finished one leaves it), so concurrent requests interleave and a
  request keeps the adapter it started with even after new requests have moved to a newer one; label requests
  waiting together are scored as a batch.
* ``VLLMBackend`` drives a vLLM server through its runtime LoRA endpoints (``/v1/load_lora_adapter``,
  ``/v1/unload_lora_adapter``) and forwards completions to it with ``model`` set to the adapter name.

The runtime (``serve/runtime.py``) decides when to load, flip and unload; a backend only does it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kolm_pipeline.serve.lease import Lease
    from kolm_pipeline.serve.lora_slots import LoraSlots

log = logging.getLogger("kolm.serve")

# Label requests scored together at most: small on CPU, where larger batches lowered throughput and lengthened
# the swap (bench/swap.py --max-batch N, docs/benchmarks.md); a GPU has room for many more.
CPU_MAX_BATCH = 2
GPU_MAX_BATCH = 16
# Free-text and JSON answers decoded together at most (one adapter). A decoding step reads every weight once
# whatever the batch, so a few more rows cost little on either device; a request beyond the cap joins when a row
# finishes. Not yet tuned by measurement: `bench/serve.py --max-gen-batch N` compares caps.
CPU_MAX_GEN_BATCH = 8
GPU_MAX_GEN_BATCH = 32

WARM_MESSAGES = [{"role": "user", "content": "ping"}]
WARM_TEXT = "ping: warm-up"


class BackendError(Exception):
    """The backend could not load, run or unload an adapter; the message says which and why."""


class PromptTooLong(BackendError):
    """The prompt and the answer asked for do not fit the base model's context; the message names the limit."""


class Backend(Protocol):
    """Loads adapters under a name and answers conversations with a named adapter."""

    base_digest: str | None

    def start(self) -> None:
        """Get ready to load adapters (load the base model, check the server answers)."""
        ...

    def load(self, name: str, adapter_dir: Path, labels: list[str] | None, ready: Callable[[], None],
             json_schema: dict | None = None) -> None:
        """Load the PEFT adapter in ``adapter_dir`` as ``name``, warm it with one short inference, then call
        ``ready`` (which routes new requests to it) before any queued request can run on the old one. A
        ``json_schema`` the adapter's answers are held to is checked (compiled) here: BackendError if it cannot
        constrain decoding."""
        ...

    def unload(self, name: str) -> None: ...

    def stream(self, name: str, messages: list[dict], labels: list[str] | None, max_tokens: int,
               usage: dict | None = None, json_schema: dict | None = None) -> Iterator[str]:
        """Answer with adapter ``name``, piece by piece; with ``labels``, exactly one of them; with ``json_schema``,
        a JSON object valid against it (ending as soon as it closes). When ``usage`` is given, fill in
        ``prompt_tokens`` and ``completion_tokens`` once the answer is complete."""
        ...

    def close(self) -> None: ...


class FairLock:
    """A FIFO lock with a front lane.

    ``threading.Lock`` lets a busy thread take the lock again and again while others starve; under steady
    load that would hold back the warm-up of a new adapter (and so the swap) indefinitely. Here waiters
    are served in arrival order, the front lane first, and a waiter can give up once ``unless()`` holds
    (its work was done by the holder, see label batching).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._front: deque[object] = deque()
        self._back: deque[object] = deque()

    @contextlib.contextmanager
    def hold(self, front: bool = False, unless: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Yield True holding the lock, or False (not holding it) if ``unless()`` became true first."""
        ticket, lane = object(), (self._front if front else self._back)
        with self._cond:
            lane.append(ticket)
            while True:
                if unless is not None and unless():
                    lane.remove(ticket)
                    self._cond.notify_all()
                    acquired = False
                    break
                head = self._front[0] if self._front else self._back[0]
                if not self._held and head is ticket:
                    lane.popleft()
                    self._held = acquired = True
                    break
                self._cond.wait()
        try:
            yield acquired
        finally:
            if acquired:
                with self._cond:
                    self._held = False
                    self._cond.notify_all()


@dataclass(eq=False)
class _GenRow:
    """One free-text or JSON answer: where its decoding stands and the pieces its caller has yet to read.

    Written only by the thread that holds the model (``_lock``), except ``cancelled`` (set by the caller's
    generator when it is closed, from whatever thread closes it: a flag, no lock)."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    decoder: Any = None  # a JsonDecoder holding the answer to its schema, or None
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    feed: int = 0  # the token the next decoding pass reads for this row
    pieces: deque[str] = field(default_factory=deque)
    done: bool = False
    cancelled: bool = False
    error: Exception | None = None


@dataclass(eq=False)
class _GenBatch:
    """The rows one adapter decodes together: their shared KV cache (rows x columns, each row left-padded),
    attention mask and next positions, and the requests waiting to join at the next pass."""

    name: str
    rows: list[_GenRow] = field(default_factory=list)
    pending: list[_GenRow] = field(default_factory=list)
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


@dataclass
class _LabelRequest:
    key: tuple
    messages: list[dict]
    done: bool = False
    result: Any = None
    error: Exception | None = None


class TransformersBackend:
    """Base model + LoRA adapters in this process (CPU or one GPU), kept in ``LoraSlots``.

    Locking: forward passes hold ``_lock`` (a FairLock), one decoding pass or one label batch at a time.
    Loading an adapter does *not* take it: it only fills new slots next to the ones a running forward pass
    reads (see ``LoraSlots``). Selecting the adapter for a pass happens holding ``_lock``. So requests keep
    flowing while an adapter loads; only the warm-up pass (front lane) and unloads wait their turn.

    Generation (``stream`` without labels) is batched per adapter, up to ``max_gen_batch`` rows: a request
    waits for the model like any other; whichever caller of the adapter gets it runs one pass for all its rows
    (the prompts of requests waiting to join, or one decoding step of the running rows) and hands every row its
    new pieces, so a caller still reading its pieces does not hold the others up, and one that stops reading
    (its generator closed) leaves the batch at the next pass.
    """

    def __init__(self, base_model: str, models_dir: Path, max_batch: int | None = None,
                 max_gen_batch: int | None = None) -> None:
        self._spec = (base_model, Path(models_dir))
        self.max_batch = max_batch or 0  # 0: chosen for the device at start
        self.max_gen_batch = max_gen_batch or 0  # likewise
        self._lock = FairLock()
        self._pending: list[_LabelRequest] = []
        self._pending_lock = threading.Lock()
        self._batches: dict[str, _GenBatch] = {}  # by adapter name; rows and cache changed holding _lock
        self._batches_lock = threading.Lock()  # guards _batches and each batch's pending list
        self._model = None
        self._slots: LoraSlots | None = None
        self._tokenizer = None
        self._eos: set[int] = set()
        self.base_digest: str | None = None

    def start(self) -> None:
        if self._model is not None:
            return
        from kolm_pipeline.serve.lora_slots import LoraSlots
        from kolm_pipeline.train.base_model import load_causal_lm, load_tokenizer, resolve_base_model

        base = resolve_base_model(*self._spec)
        self._tokenizer = load_tokenizer(base)
        self._model = load_causal_lm(base)
        self._model.eval()
        cpu = self._device().type == "cpu"
        if not self.max_batch:
            self.max_batch = CPU_MAX_BATCH if cpu else GPU_MAX_BATCH
        if not self.max_gen_batch:
            self.max_gen_batch = CPU_MAX_GEN_BATCH if cpu else GPU_MAX_GEN_BATCH
        self._slots = LoraSlots(self._model)
        self.base_digest = base.digest
        eos = {self._tokenizer.eos_token_id}
        configured = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        eos |= set(configured) if isinstance(configured, list) else {configured}
        self._eos = {token for token in eos if token is not None}

    def loaded(self) -> list[str]:
        """Names of the adapters in the model now."""
        return self._slots.names() if self._slots is not None else []

    def load(self, name: str, adapter_dir: Path, labels: list[str] | None, ready: Callable[[], None],
             json_schema: dict | None = None) -> None:
        from kolm_pipeline.serve.lora_slots import AdapterFormatError

        began = time.perf_counter()
        if json_schema is not None:
            self._json_decoder(json_schema)  # compiled (and cached) now: a bad schema refuses the artifact
        try:
            self._slots.load(name, adapter_dir)
        except AdapterFormatError as exc:
            raise BackendError(f"cannot load adapter {adapter_dir} into the base model: {exc}") from exc
        loaded = time.perf_counter()
        self._warm(name, ready)
        log.info("%s: load %.3f s, warm-up %.3f s (waiting for the model included)", name,
                 loaded - began, time.perf_counter() - loaded)

    def _warm(self, name: str, ready: Callable[[], None]) -> None:
        """One short pass through every layer of the new adapter, ahead of queued requests, before any
        request uses it (a few tokens: it only has to touch each LoRA layer once, not answer). ``ready`` runs
        before the model is let go, so the next queued batch already binds to the new adapter."""
        import torch

        ids = self._tokenizer(WARM_TEXT, add_special_tokens=False).input_ids
        with self._lock.hold(front=True), torch.inference_mode():
            self._select(name)
            self._model(input_ids=torch.tensor([ids], device=self._device()), logits_to_keep=1)
            ready()

    def unload(self, name: str) -> None:
        with self._lock.hold():
            self._slots.unload(name)
            with self._batches_lock:
                batch = self._batches.pop(name, None)
            if batch is not None:  # only callers without a lease (or gone) can still be decoding with it
                self._fail([*batch.rows, *batch.pending], BackendError(f"adapter {name} was unloaded"))

    def _device(self):
        return next(self._model.parameters()).device

    def _select(self, name: str) -> None:
        """Make ``name`` the adapter the next forward pass uses; called holding ``_lock``."""
        try:
            self._slots.select(name)
        except KeyError:
            raise BackendError(f"adapter {name} is not loaded") from None

    def _combined(self, key: tuple, messages: list[dict], run: Callable[[list[_LabelRequest]], None]) -> _LabelRequest:
        """Flat combining: queue this request; whoever gets the model lock first runs every queued request
        with the same key as one batch (``run`` fills in the results), the others just collect theirs."""
        mine = _LabelRequest(key=key, messages=messages)
        with self._pending_lock:
            self._pending.append(mine)
        with self._lock.hold(unless=lambda: mine.done) as held:
            if held:
                with self._pending_lock:
                    batch = [mine] + [r for r in self._pending if r.key == key and r is not mine]
                    batch = batch[: self.max_batch]
                    for request in batch:
                        self._pending.remove(request)
                try:
                    run(batch)
                except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
                    for request in batch:
                        request.error = exc
                finally:
                    for request in batch:
                        request.done = True
        if mine.error is not None:
            if isinstance(mine.error, BackendError):
                raise BackendError(str(mine.error))
            raise type(mine.error)(*mine.error.args)
        return mine

    def _score(self, name: str, labels: list[str], batch: list[_LabelRequest]) -> list[str]:
        from kolm_pipeline.evaluate.inference import predict_labels

        self._select(name)
        try:
            outputs = predict_labels(self._model, self._tokenizer, [r.messages for r in batch], labels,
                                     batch_size=len(batch))
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template that cannot render the messages
            raise BackendError(f"scoring the label set failed: {exc}") from exc
        return [output.output for output in outputs]

    def _label(self, name: str, messages: list[dict], labels: list[str]) -> str:
        """Constrained choice among ``labels`` with adapter ``name`` (batched with identical requests)."""

        def run(batch: list[_LabelRequest]) -> None:
            for request, output in zip(batch, self._score(name, labels, batch), strict=True):
                request.result = output

        return self._combined(("adapter", name, tuple(labels)), messages, run).result or ""

    def classify(self, task: str, messages: list[dict], acquire: Callable[[], Lease]) -> tuple[str, Lease] | None:
        """Closed-vocabulary answer for ``task``, batched with the task's other waiting requests.

        The adapter is bound when the batch runs, not when the request arrived: a request still waiting
        when a swap lands is answered by the new adapter (one that has started is never moved). Returns
        (label, the lease it ran under, already released), or None if the task's adapter has no label set.
        """

        def run(batch: list[_LabelRequest]) -> None:
            lease = acquire()
            try:
                labels = lease.labels
                outputs = self._score(lease.name, labels, batch) if labels else [None] * len(batch)
                for request, output in zip(batch, outputs, strict=True):
                    request.result = None if output is None else (output, lease)
            finally:
                lease.release()

        return self._combined(("task", task), messages, run).result

    def check_prompt(self, messages: list[dict], max_tokens: int) -> None:
        """Refuse, before any work, a conversation whose prompt plus ``max_tokens`` exceeds the base model's
        context: it could only fail, after holding the model for as long as the prompt takes to read."""
        from kolm_pipeline.evaluate.inference import render_prompt

        limit = getattr(self._model.config, "max_position_embeddings", None) if self._model is not None else None
        if not limit:
            return
        try:
            prompt = render_prompt(self._tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - the chat template rejects malformed conversations
            raise BackendError(f"the chat template cannot render these messages: {exc}") from exc
        tokens = len(self._tokenizer(prompt, add_special_tokens=False).input_ids)
        if tokens + max_tokens > limit:
            raise PromptTooLong(f"the prompt is {tokens} tokens and max_tokens {max_tokens}: together over the "
                                f"model's context of {limit} tokens; shorten the conversation or lower max_tokens")

    def count_tokens(self, messages: list[dict], text: str) -> dict[str, int]:
        """Tokens of the prompt (the chat template applied to ``messages``) and of the answer ``text``, as the
        base model's tokenizer counts them: the ``usage`` of a completion."""
        from kolm_pipeline.evaluate.inference import render_prompt

        prompt = render_prompt(self._tokenizer, messages)
        return {"prompt_tokens": len(self._tokenizer(prompt, add_special_tokens=False).input_ids),
                "completion_tokens": len(self._tokenizer(text, add_special_tokens=False).input_ids)}

    def _json_decoder(self, schema: dict):
        """A fresh decoder holding one answer to ``schema`` (compiled once per schema); BackendError if the schema
        cannot be compiled."""
        from kolm_pipeline.evaluate.structured import (
            JsonDecoder,
            JsonSchemaProblem,
            compile_json_schema,
            vocab_size,
        )

        stops = sorted(self._eos)
        vocab = vocab_size(self._model)
        try:
            compiled = compile_json_schema(self._tokenizer, schema, vocab=vocab, stops=stops)
        except JsonSchemaProblem as exc:
            raise BackendError(str(exc)) from None
        return JsonDecoder(compiled, vocab, stops)

    def stream(self, name: str, messages: list[dict], labels: list[str] | None, max_tokens: int,
               usage: dict | None = None, json_schema: dict | None = None) -> Iterator[str]:
        from kolm_pipeline.evaluate.inference import render_prompt

        if labels:
            label = self._label(name, messages, labels)
            if usage is not None:
                usage.update(self.count_tokens(messages, label))
            yield label
            return
        try:
            prompt = render_prompt(self._tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - the chat template rejects malformed conversations
            raise BackendError(f"the chat template cannot render these messages: {exc}") from exc
        decoder = self._json_decoder(json_schema) if json_schema is not None else None
        tokens = len(self._tokenizer(prompt, add_special_tokens=False).input_ids)
        if max_tokens < 1:
            if usage is not None:
                usage.update(prompt_tokens=tokens, completion_tokens=0)
            return
        row = _GenRow(prompt=prompt, prompt_tokens=tokens, max_tokens=max_tokens, decoder=decoder)
        with self._batches_lock:
            batch = self._batches.get(name)
            if batch is None:
                batch = self._batches[name] = _GenBatch(name)
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
            usage.update(prompt_tokens=row.prompt_tokens, completion_tokens=len(row.generated))

    def _step(self, batch: _GenBatch) -> None:
        """One forward pass for ``batch``, holding ``_lock``: the prompts of the requests waiting to join (up to
        ``max_gen_batch`` rows in all), or else one decoding step of its running rows. An exception fails the
        rows of that pass (every running row when decoding), each with a BackendError."""
        import torch

        for row in batch.rows:
            if row.cancelled:
                row.done = True
        self._drop_finished(batch)
        with self._batches_lock:
            for row in batch.pending:
                if row.cancelled:
                    row.done = True
            batch.pending = [row for row in batch.pending if not row.done]
            joinable = batch.cache is None or _growable(batch.cache)
            admitted = batch.pending[: max(0, self.max_gen_batch - len(batch.rows))] if joinable else []
            del batch.pending[: len(admitted)]
        running = list(batch.rows)
        try:
            with torch.inference_mode():
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
    def _fail(rows: list[_GenRow], exc: Exception) -> None:
        """End the rows not finished yet with ``exc`` (as a BackendError): their callers raise it."""
        error = exc if isinstance(exc, BackendError) else BackendError(f"generation failed: {type(exc).__name__}: "
                                                                       f"{exc}")
        for row in rows:
            if not row.done:
                row.error, row.done = error, True

    def _join(self, batch: _GenBatch, admitted: list[_GenRow]) -> None:
        """Read the admitted rows' prompts (one left-padded pass, their shared prefix once), choose each one's
        first token, and add the rows still going to the batch: their cache, mask and positions beside the
        running rows', both padded on the left to the same width."""
        import torch

        from kolm_pipeline.evaluate.inference import _prompt_pass

        out, mask, positions = _prompt_pass(self._model, self._tokenizer, [row.prompt for row in admitted],
                                            self._device())
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

    def _decode(self, batch: _GenBatch) -> None:
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

    def _advance(self, rows: list[_GenRow], logits) -> None:
        """Choose each row's next token from its logits (greedy; under its grammar for a JSON row), queue the
        text it completes, and mark the rows that are done: at an EOS token, at ``max_tokens``, or (JSON) once
        the object is closed."""
        greedy = logits.argmax(dim=-1).tolist() if any(row.decoder is None for row in rows) else None
        for index, row in enumerate(rows):
            token = row.decoder.choose(logits[index]) if row.decoder is not None else greedy[index]
            if token in self._eos:
                row.done = True
                continue
            row.generated.append(token)
            row.feed = token
            text = self._tokenizer.decode(row.generated, skip_special_tokens=True).lstrip()
            if not text.endswith("\ufffd"):  # else a multi-byte character is still incomplete
                piece, row.emitted = text[len(row.emitted) :], text
                if piece:
                    row.pieces.append(piece)
            if len(row.generated) >= row.max_tokens or (row.decoder is not None and row.decoder.finished):
                row.done = True  # JSON: the object is closed, the end of the turn is all that could follow

    def _drop_finished(self, batch: _GenBatch) -> None:
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

    def close(self) -> None:
        with self._lock.hold():
            self._model = None
            with self._batches_lock:
                batches, self._batches = list(self._batches.values()), {}
            for batch in batches:
                self._fail([*batch.rows, *batch.pending], BackendError("the backend is closed"))


class VLLMBackend:
    """A vLLM server started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.

    ``adapter_root`` is where vLLM sees the runtime's adapter cache (``KOLM_HOME/serve-cache``) when it
    mounts the shared volume at another path; without it the local path is sent as is.
    """

    def __init__(self, url: str, cache_dir: Path, adapter_root: str | None = None, timeout: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.adapter_root = adapter_root
        self.base_digest: str | None = None
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def _remote_path(self, adapter_dir: Path) -> str:
        if self.adapter_root is None:
            return str(adapter_dir)
        return f"{self.adapter_root.rstrip('/')}/{Path(adapter_dir).relative_to(self.cache_dir).as_posix()}"

    def _post(self, path: str, body: dict) -> None:
        import httpx

        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"vLLM at {self.url} did not answer {path}: {exc}") from exc
        if response.status_code >= 400:
            raise BackendError(f"vLLM {path} answered {response.status_code}: {response.text[:500]}")

    def start(self) -> None:
        import httpx

        try:
            self._client.get("/v1/models").raise_for_status()
        except httpx.HTTPError as exc:
            raise BackendError(f"vLLM at {self.url} is not answering /v1/models: {exc}") from exc

    def load(self, name: str, adapter_dir: Path, labels: list[str] | None, ready: Callable[[], None],
             json_schema: dict | None = None) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": self._remote_path(adapter_dir)})
        for _ in self.stream(name, WARM_MESSAGES, labels, max_tokens=1, json_schema=json_schema):
            pass
        ready()

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def stream(self, name: str, messages: list[dict], labels: list[str] | None, max_tokens: int,
               usage: dict | None = None, json_schema: dict | None = None) -> Iterator[str]:
        import httpx

        body: dict = {"model": name, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                      "stream": True}
        if usage is not None:  # vLLM counts: its last chunk carries the usage
            body["stream_options"] = {"include_usage": True}
        if labels:
            body["structured_outputs"] = {"choice": labels}
        elif json_schema is not None:
            # vLLM compiles the schema itself: send it with the properties in the answers' key order and without
            # kolm's annotations (the layout is vLLM's own).
            from kolm_pipeline.corpus.json_grammar import JsonSchemaProblem, decoding_schema

            try:
                body["structured_outputs"] = {"json": decoding_schema(json_schema)}
            except JsonSchemaProblem as exc:
                raise BackendError(str(exc)) from None
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise BackendError(f"vLLM answered {response.status_code}: {response.text[:500]}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    counted = chunk.get("usage")
                    if usage is not None and isinstance(counted, dict):
                        usage.update({key: int(counted[key]) for key in ("prompt_tokens", "completion_tokens")
                                      if isinstance(counted.get(key), int)})
                    choices = chunk.get("choices") or [{}]
                    piece = (choices[0].get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise BackendError(f"vLLM at {self.url} failed mid-answer: {exc}") from exc

    def close(self) -> None:
        self._client.close()
