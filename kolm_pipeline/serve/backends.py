"""Serving backends: what actually runs the base model plus LoRA adapters.

* ``TransformersBackend`` keeps the base model in this process with every loaded adapter beside it
  (``LoraSlots``: PEFT-format adapters, switched per forward pass). Free-text and JSON answers of one adapter
  are decoded together, one forward pass per lock hold for the whole batch (continuous batching: a request
  joins the running batch at the next pass, a finished one leaves it), so concurrent requests interleave and a
  request keeps the adapter it started with even after new requests have moved to a newer one; label requests
  waiting together are scored as a batch. The batching of generation is ``serve/generation.py``; the lock
  around forward passes, ``serve/fair_lock.py``.
* ``VLLMBackend`` drives a vLLM server through its runtime LoRA endpoints (``/v1/load_lora_adapter``,
  ``/v1/unload_lora_adapter``) and forwards completions to it with ``model`` set to the adapter name.

The runtime (``serve/runtime.py``) decides when to load, flip and unload; a backend only does it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kolm_pipeline.serve.fair_lock import FairLock

if TYPE_CHECKING:
    from kolm_pipeline.evaluate.lora_slots import LoraSlots
    from kolm_pipeline.serve.generation import BatchedGeneration
    from kolm_pipeline.serve.lease import Lease

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
    # Where the base model runs once started, for operators: "cpu float32", "cuda bfloat16", "vllm"; "" before.
    placement: str

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


def serving_threads() -> int:
    """The torch threads of `kolm serve`'s generation passes on a CPU: one less than the cores it may use (at least
    one), so that HTTP and the request threads keep a core. With every core in the model thread's team, each of a
    decoding pass's many small parallel regions waited on a worker the server's other threads had taken the core
    from; label batches, which read whole prompts, gain from every core (docs/benchmarks.md, session 22)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def model_placement(model) -> str:
    """Where a loaded model's weights are and in which dtype: "cpu float32", "cuda bfloat16" (``Backend.placement``;
    a CPU without bfloat16 matmuls serves in float32, slower: docs/benchmarks.md, session 21)."""
    weight = next(model.parameters())
    return f"{weight.device.type} {str(weight.dtype).removeprefix('torch.')}"


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

    Generation (``stream`` without labels) is batched per adapter, up to ``max_gen_batch`` rows, by a
    ``BatchedGeneration`` (``serve/generation.py``), whose passes run holding ``_lock``.
    """

    def __init__(self, base_model: str, models_dir: Path, max_batch: int | None = None,
                 max_gen_batch: int | None = None, dtype: str = "auto", threads: int | None = None) -> None:
        self._spec = (base_model, Path(models_dir))
        self._threads = threads  # torch threads of every computation; None: see ``threads``
        # Torch threads of the generation passes (free text, JSON), known once started: ``threads``, or on a CPU one
        # less than the cores (serving_threads); label batches, loading and warm-ups run with ``_all_threads``.
        self.threads = 0
        self._all_threads = 0
        self._threads_now = 0  # what the model thread runs with now
        self._dtype = dtype  # KOLM_INFERENCE_DTYPE: the base's weights, as evaluation runs them
        self.max_batch = max_batch or 0  # 0: chosen for the device at start
        self.max_gen_batch = max_gen_batch or 0  # likewise
        self._lock = FairLock()
        self._pending: list[_LabelRequest] = []
        self._pending_lock = threading.Lock()
        self._generation: BatchedGeneration | None = None  # made at start, with the model
        self._prefixes = None  # a PrefixCache, made at start: each adapter's shared prompt prefix, used holding _lock
        # Every torch computation of the backend runs on this one thread: loading the base, merging adapters, warm-ups,
        # label batches and generation passes, whichever request's thread holds _lock. torch's CPU kernels run on an
        # OpenMP team per calling thread, and once a second thread of the process has its own team, OpenMP's idle
        # workers stop spinning between parallel regions (more of its threads than cores) and every pass slows
        # down (docs/benchmarks.md, session 22); session 14 saw request threads' teams spin against each other.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kolm-model")
        self._model = None
        self._slots: LoraSlots | None = None
        self._tokenizer = None
        self._eos: set[int] = set()
        self.base_digest: str | None = None
        self.placement = ""

    def start(self) -> None:
        if self._model is None:
            self._on_model_thread(self._start)

    def _start(self) -> None:
        import torch

        from kolm_pipeline.evaluate.inference import PrefixCache
        from kolm_pipeline.evaluate.lora_slots import LoraSlots
        from kolm_pipeline.evaluate.structured import stop_token_ids
        from kolm_pipeline.serve.generation import BatchedGeneration
        from kolm_pipeline.train.base_model import load_causal_lm, load_tokenizer, resolve_base_model

        base = resolve_base_model(*self._spec)
        self._tokenizer = load_tokenizer(base)
        self._model = load_causal_lm(base, self._dtype)
        self._model.eval()
        cpu = self._device().type == "cpu"
        if not self.max_batch:
            self.max_batch = CPU_MAX_BATCH if cpu else GPU_MAX_BATCH
        if not self.max_gen_batch:
            self.max_gen_batch = CPU_MAX_GEN_BATCH if cpu else GPU_MAX_GEN_BATCH
        self._slots = LoraSlots(self._model, compute=self._on_model_thread)
        self._prefixes = PrefixCache()
        self.base_digest = base.digest
        self.placement = model_placement(self._model)
        self._threads_now = torch.get_num_threads()  # torch's choice, on this thread (the model thread)
        self._all_threads = self._threads or self._threads_now
        self.threads = self._threads or (serving_threads() if cpu else self._all_threads)
        self._eos = set(stop_token_ids(self._model, self._tokenizer))
        self._generation = BatchedGeneration(self._model, self._tokenizer, self._eos, self._lock, self._select,
                                             max_rows=lambda: self.max_gen_batch, prefixes=self._prefixes,
                                             on_model_thread=lambda work: self._on_model_thread(work, self.threads))

    def loaded(self) -> list[str]:
        """Names of the adapters in the model now."""
        return self._slots.names() if self._slots is not None else []

    def load(self, name: str, adapter_dir: Path, labels: list[str] | None, ready: Callable[[], None],
             json_schema: dict | None = None) -> None:
        from kolm_pipeline.evaluate.lora_slots import AdapterFormatError

        began = time.perf_counter()
        if json_schema is not None:
            self._json_decoder(json_schema, [])  # compiled (and cached) now: a bad schema refuses the artifact
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

        def warm_pass() -> None:
            with torch.inference_mode():
                self._model(input_ids=torch.tensor([ids], device=self._device()), logits_to_keep=1)

        with self._lock.hold(front=True):
            self._select(name)
            self._on_model_thread(warm_pass)
            ready()

    def unload(self, name: str) -> None:
        with self._lock.hold():
            self._slots.unload(name)
            self._prefixes.forget(name)
            self._generation.unload(name)

    def _device(self):
        return next(self._model.parameters()).device

    def _on_model_thread(self, work: Callable[[], Any], threads: int = 0) -> Any:
        """Run ``work`` (torch computations; forward passes are called holding ``_lock``) on the model thread with
        ``threads`` torch threads (0: ``_all_threads``; before start: torch's) and return its result."""

        def run() -> Any:
            wanted = threads or self._all_threads
            if wanted and wanted != self._threads_now:
                import torch

                torch.set_num_threads(wanted)  # the model thread's own count (and the count threads start with)
                self._threads_now = wanted
            return work()

        return self._model_thread.submit(run).result()

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

    def _score(self, name: str, labels: list[str], batch: list[_LabelRequest]) -> list[tuple[str, float | None]]:
        """The label each request of ``batch`` gets from adapter ``name``, and the decoder's confidence in it; called
        holding ``_lock``. The passes run on the model thread, with every torch thread (a label batch reads whole
        prompts)."""
        from kolm_pipeline.evaluate.inference import predict_labels

        self._select(name)
        try:
            outputs = self._on_model_thread(lambda: predict_labels(
                self._model, self._tokenizer, [r.messages for r in batch], labels, batch_size=len(batch),
                prefixes=self._prefixes, adapter=name))
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template that cannot render the messages
            raise BackendError(f"scoring the label set failed: {exc}") from exc
        return [(output.output, output.confidence) for output in outputs]

    def _label(self, name: str, messages: list[dict], labels: list[str]) -> str:
        """Constrained choice among ``labels`` with adapter ``name`` (batched with identical requests)."""

        def run(batch: list[_LabelRequest]) -> None:
            for request, (output, _confidence) in zip(batch, self._score(name, labels, batch), strict=True):
                request.result = output

        return self._combined(("adapter", name, tuple(labels)), messages, run).result or ""

    def classify(self, task: str, messages: list[dict], acquire: Callable[[], Lease]
                 ) -> tuple[str, Lease, float | None] | None:
        """Closed-vocabulary answer for ``task``, batched with the task's other waiting requests.

        The adapter is bound when the batch runs, not when the request arrived: a request still waiting
        when a swap lands is answered by the new adapter (one that has started is never moved). Returns
        (label, the lease it ran under (already released), the decoder's confidence in it), or None if the
        task's adapter has no label set.
        """

        def run(batch: list[_LabelRequest]) -> None:
            lease = acquire()
            try:
                labels = lease.labels
                outputs = self._score(lease.name, labels, batch) if labels else [None] * len(batch)
                for request, output in zip(batch, outputs, strict=True):
                    request.result = None if output is None else (output[0], lease, output[1])
            finally:
                lease.release()

        return self._combined(("task", task), messages, run).result

    def check_prompt(self, messages: list[dict], max_tokens: int) -> None:
        """Refuse, before any work, a conversation whose prompt plus ``max_tokens`` exceeds the base model's
        context: it could only fail, after holding the model for as long as the prompt takes to read."""
        from kolm_pipeline.train.labels import render_prompt

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
        from kolm_pipeline.train.labels import render_prompt

        prompt = render_prompt(self._tokenizer, messages)
        return {"prompt_tokens": len(self._tokenizer(prompt, add_special_tokens=False).input_ids),
                "completion_tokens": len(self._tokenizer(text, add_special_tokens=False).input_ids)}

    def _json_decoder(self, schema: dict, messages: list[dict]):
        """A fresh decoder holding one answer to ``messages`` to ``schema`` (compiled once per schema); BackendError
        if the schema cannot be compiled."""
        from kolm_pipeline.evaluate.structured import JsonSchemaProblem, json_decoder, vocab_size

        try:
            return json_decoder(self._tokenizer, schema, vocab_size(self._model), sorted(self._eos), messages)
        except JsonSchemaProblem as exc:
            raise BackendError(str(exc)) from None

    def stream(self, name: str, messages: list[dict], labels: list[str] | None, max_tokens: int,
               usage: dict | None = None, json_schema: dict | None = None) -> Iterator[str]:
        from kolm_pipeline.train.labels import render_prompt

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
        decoder = self._json_decoder(json_schema, messages) if json_schema is not None else None
        ids = self._tokenizer(prompt, add_special_tokens=False).input_ids
        if max_tokens < 1:
            if usage is not None:
                usage.update(prompt_tokens=len(ids), completion_tokens=0)
            return
        yield from self._generation.stream(name, prompt, ids, max_tokens, decoder, usage)

    def close(self) -> None:
        with self._lock.hold():
            self._model = None
            if self._generation is not None:
                self._generation.close()


class VLLMBackend:
    """A vLLM server started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.

    ``adapter_root`` is where vLLM sees the runtime's adapter cache (``KOLM_HOME/serve-cache``) when it
    mounts the shared volume at another path; without it the local path is sent as is.

    With ``accepts_images`` (a vLLM serving a vision-language model: ``kolm serve --vllm-images``) image parts go
    to vLLM as they came; `kolm serve` lets through only base64 data URLs, so vLLM never fetches an address a
    caller chose.
    """

    def __init__(self, url: str, cache_dir: Path, adapter_root: str | None = None, timeout: float = 60.0,
                 accepts_images: bool = False) -> None:
        self.accepts_images = accepts_images
        self.placement = "vllm"  # the base model runs in the vLLM server, on its hardware
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
        if usage is not None:  # vLLM counts: its last chunk carries the usage; the tokens' logprobs the confidence
            body["stream_options"] = {"include_usage": True}
            body["logprobs"] = True
        logprob, tokens = 0.0, 0
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
                    if usage is not None and choices[0].get("finish_reason") in ("stop", "length"):
                        usage["finish_reason"] = choices[0]["finish_reason"]
                    for scored in (choices[0].get("logprobs") or {}).get("content") or []:
                        if isinstance(scored.get("logprob"), int | float):
                            logprob, tokens = logprob + scored["logprob"], tokens + 1
                    piece = (choices[0].get("delta") or {}).get("content")
                    if piece:
                        yield piece
        except httpx.HTTPError as exc:
            raise BackendError(f"vLLM at {self.url} failed mid-answer: {exc}") from exc
        if usage is not None and tokens:
            usage["confidence"] = math.exp(logprob / tokens)  # as the local backend: the tokens' geometric mean

    def close(self) -> None:
        self._client.close()
