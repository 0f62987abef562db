"""Batched generation in `kolm serve`'s local backend: concurrent free-text and JSON requests to one adapter are
decoded together (one forward pass per step for the whole batch) and each gets exactly the answer it gets alone,
streamed to its own caller; a caller that stops reading, or one still reading slowly, does not change or hold up
the others; a failure in a batch (its adapter unloaded, a pass that raises) reaches every row as a BackendError."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jsonschema
import pytest

from kolm_pipeline.registry import swap_pointer
from kolm_pipeline.registry.swap import publish_artifact
from kolm_pipeline.serve.app import create_serving_app
from kolm_pipeline.serve.backends import BackendError, TransformersBackend
from kolm_pipeline.serve.runtime import ServingRuntime
from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_registry_support import free_port, real_adapter, signed_artifact, wait_until
from kolm_pipeline_tests.test_structured_decoding import CONVERSATIONS, schema_of, teacher_answers

# Prompts of different lengths, so the batch's rows are padded differently.
CONTENTS = ["Where is my parcel?", "My invoice for March lists a charge twice, please refund one of them.",
            "hi", "The app crashes whenever I open the settings page on my phone; what should I do?"]
MAX_TOKENS = 20
JSON_MAX = 96
ROUTE_LABELS = ["billing", "shipping", "account"]


def conversation(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@dataclass
class Served:
    runtime: ServingRuntime
    url: str
    key: str
    schema: dict
    adapter_dir: object

    @property
    def backend(self) -> TransformersBackend:
        return self.runtime.backend  # type: ignore[return-value]

    @functools.cached_property
    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory) -> Iterator[Served]:
    """A free-text task, a JSON task and a label task (the same adapter weights) behind a real HTTP server, tiny
    model in float32."""
    import uvicorn

    from kolm_pipeline.train.base_model import resolve_base_model

    root = tmp_path_factory.mktemp("serve-batching")
    settings = load_settings(root / "home")
    digest = resolve_base_model(str(tiny_base), settings.models_dir).digest
    adapter = real_adapter(tiny_base, root / "adapter", seed=7)
    schema = schema_of(teacher_answers())
    for task, task_schema, labels in (("acme.chat", None, None), ("acme.intake", schema, None),
                                      ("acme.route", None, ROUTE_LABELS)):
        built = signed_artifact(root / f"{task}.kolm", adapter_dir=adapter, keys_dir=settings.keys_dir, task=task,
                                salt=task, base_digest=digest, json_schema=task_schema, labels=labels)
        swap_pointer(settings.adapters_dir, task, publish_artifact(settings.artifacts_dir, task, built))
    key = CaptureStore(settings.store_url).create_tenant("acme")
    # float32: every answer must be exactly the one it gets alone, which bfloat16's rounding (KOLM_INFERENCE_DTYPE's
    # default on a CPU with bf16 matmuls) may flip at a near-tie in a batch of another shape.
    backend = TransformersBackend(str(tiny_base), settings.models_dir, dtype="float32")
    runtime = ServingRuntime(settings, backend, poll_interval=0.05)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_serving_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=60, what="the serving app to start")
    wait_until(lambda: {"acme.chat", "acme.intake", "acme.route"} <= set(runtime.status()["tasks"]), timeout=60,
               what="the tasks to load")
    yield Served(runtime, f"http://127.0.0.1:{port}", key, schema, adapter)
    server.should_exit = True
    thread.join(timeout=30)


@contextlib.contextmanager
def counted_passes(backend: TransformersBackend) -> Iterator[list[int]]:
    """Every forward pass of the model while the block runs (one entry per pass: its batch size)."""
    passes: list[int] = []
    handle = backend._model.register_forward_hook(lambda _m, _args, kwargs, _out: passes.append(
        int(kwargs["input_ids"].shape[0])), with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


def together(backend: TransformersBackend, calls: list[Callable[[], object]]) -> list[object]:
    """Run ``calls`` in threads that all reach the model at once: the model is held until every one of them is
    queued for it, so the first forward pass can take them all."""
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    with backend._lock.hold():
        for thread in threads:
            thread.start()
        wait_until(lambda: len(backend._lock._back) >= len(calls), what="every request to wait for the model")
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def ask(served: Served, task: str, content: str | list[dict], stream: bool = False,
        max_tokens: int = MAX_TOKENS) -> tuple[str, int]:
    """(answer, completion tokens) through the official SDK, streamed or not."""
    messages = conversation(content) if isinstance(content, str) else content
    if stream:
        chunks = list(served.client.chat.completions.create(model=task, messages=messages, max_tokens=max_tokens,
                                                            stream=True, stream_options={"include_usage": True}))
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        return text.strip(), chunks[-1].usage.completion_tokens
    completion = served.client.chat.completions.create(model=task, messages=messages, max_tokens=max_tokens)
    return completion.choices[0].message.content, completion.usage.completion_tokens


def test_concurrent_free_text_requests_are_batched_and_answered_as_alone(served):
    alone = [ask(served, "acme.chat", content) for content in CONTENTS]
    assert len({text for text, _ in alone}) == len(CONTENTS)  # distinct answers: rows cannot be swapped unseen
    with counted_passes(served.backend) as passes:
        batched = together(served.backend, [functools.partial(ask, served, "acme.chat", content, stream=index % 2 == 0)
                                            for index, content in enumerate(CONTENTS)])
    assert batched == alone  # same text and the same token counts, streamed or not
    tokens = sum(count for _, count in alone)
    # One batch: the prompts' pass (their shared prefix once) and one step per token of the longest answer.
    assert len(passes) < tokens
    assert max(passes) == len(CONTENTS)


def test_every_torch_computation_runs_on_one_model_thread(served):
    """Concurrent requests take turns holding the model, but every pass (free text, JSON, label batches, an adapter's
    warm-up) and every merge of an adapter into the base's weights runs on the backend's one model thread: torch
    runs an OpenMP team per calling thread, and once a second thread has one, idle workers stop spinning between
    parallel regions and each pass slows down (docs/benchmarks.md, sessions 14 and 22)."""
    backend = served.backend
    threads: set[int] = set()
    handle = backend._model.register_forward_hook(lambda *_: threads.add(threading.get_ident()))
    merge = backend._slots._compute
    backend._slots._compute = lambda work: merge(lambda: (threads.add(threading.get_ident()), work())[1])
    try:
        calls = [functools.partial(ask, served, task, content, stream=index % 2 == 0)
                 for task in ("acme.chat", "acme.route") for index, content in enumerate(CONTENTS)]
        calls.append(functools.partial(ask, served, "acme.intake", CONVERSATIONS[0], max_tokens=JSON_MAX))
        answers = together(backend, calls)
        assert {text for text, _ in answers[len(CONTENTS):-1]} <= set(ROUTE_LABELS)
        backend.load("extra", served.adapter_dir, None, ready=lambda: None)  # merged on a CPU, then warmed up
    finally:
        handle.remove()
        backend._slots._compute = merge
        backend.unload("extra")
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert threads == {next(iter(backend._model_thread._threads)).ident}


def test_decoding_passes_leave_a_core_and_label_batches_use_every_core(served):
    """On a CPU, generation passes (free text, JSON) run with one torch thread less than the cores, so that HTTP and
    the request threads keep one; label batches, which read whole prompts, run with torch's own count (measured over
    HTTP in docs/benchmarks.md, session 22)."""
    import torch

    backend = served.backend
    counts: list[int] = []
    handle = backend._model.register_forward_hook(lambda *_: counts.append(torch.get_num_threads()))
    try:
        ask(served, "acme.chat", CONTENTS[1])
        ask(served, "acme.intake", CONVERSATIONS[0], max_tokens=JSON_MAX)
        decoding, counts[:] = set(counts), []
        ask(served, "acme.route", CONTENTS[1])
        labels = set(counts)
    finally:
        handle.remove()
    cores = len(os.sched_getaffinity(0))
    assert decoding == {backend.threads} and labels == {backend._all_threads}
    if not torch.cuda.is_available():
        assert backend.threads == max(1, cores - 1) and backend._all_threads == torch.get_num_threads()


def test_json_requests_in_one_batch_are_each_schema_valid_and_as_alone(served):
    conversations = CONVERSATIONS[:4]
    alone = [ask(served, "acme.intake", messages, max_tokens=JSON_MAX) for messages in conversations]
    with counted_passes(served.backend) as passes:
        batched = together(served.backend, [
            functools.partial(ask, served, "acme.intake", messages, stream=index % 2 == 1, max_tokens=JSON_MAX)
            for index, messages in enumerate(conversations)])
    for text, count in batched:
        jsonschema.validate(json.loads(text), served.schema)
        assert count < JSON_MAX  # ended when its object closed
    assert batched == alone
    assert len(passes) < sum(count for _, count in alone) and max(passes) == len(conversations)


def test_rows_with_and_without_a_schema_share_a_batch(served):
    """The same adapter asked for JSON by two callers and for free text by two others: one batch, each row held
    to its own grammar (or none)."""
    backend = served.backend
    asks = [(CONVERSATIONS[0], served.schema), (conversation(CONTENTS[0]), None), (CONVERSATIONS[1], served.schema),
            (conversation(CONTENTS[1]), None)]
    with served.runtime.lease("acme.intake") as lease:
        def answer(messages: list[dict], schema: dict | None) -> str:
            return "".join(backend.stream(lease.name, messages, None, JSON_MAX if schema else MAX_TOKENS,
                                          json_schema=schema))

        alone = [answer(*pair) for pair in asks]
        with counted_passes(backend) as passes:
            batched = together(backend, [functools.partial(answer, *pair) for pair in asks])
    assert batched == alone
    for (_, schema), text in zip(asks, batched, strict=True):
        if schema is not None:
            jsonschema.validate(json.loads(text), schema)
    assert max(passes) == len(asks)


def test_a_caller_that_stops_reading_or_reads_slowly_changes_nobody_elses_answer(served, monkeypatch):
    backend = served.backend
    # One token a pass (no drafts, test_drafting.py's subject), so the pieces and passes are counted as tokens.
    monkeypatch.setattr(backend._generation._passes, "drafting", False)
    with served.runtime.lease("acme.chat") as lease:
        def answer(content: str) -> list[str]:
            return list(backend.stream(lease.name, conversation(content), None, MAX_TOKENS))

        alone = [answer(content) for content in CONTENTS]
        others_done = threading.Event()
        tokens: list[dict] = [{} for _ in CONTENTS]

        def leaves() -> list[str]:  # reads two pieces, then closes its stream (a client that disconnects)
            pieces = backend.stream(lease.name, conversation(CONTENTS[0]), None, MAX_TOKENS, tokens[0])
            head = [next(pieces), next(pieces)]
            pieces.close()
            return head

        def dawdles() -> list[str]:  # reads one piece, then nothing until the others have their whole answers
            pieces = backend.stream(lease.name, conversation(CONTENTS[1]), None, MAX_TOKENS, tokens[1])
            head = [next(pieces)]
            assert others_done.wait(timeout=60), "the other rows waited for a caller that was not reading"
            return head + list(pieces)

        def reads(index: int) -> list[str]:
            answered = list(backend.stream(lease.name, conversation(CONTENTS[index]), None, MAX_TOKENS,
                                           tokens[index]))
            return answered

        def reads_then_signals() -> list[str]:
            answered = reads(3)
            wait_until(lambda: tokens[2], what="the other reader to finish")
            others_done.set()
            return answered

        with counted_passes(backend) as passes:
            batched = together(backend, [leaves, dawdles, functools.partial(reads, 2), reads_then_signals])
    assert batched[0] == alone[0][:2]
    assert batched[1:] == alone[1:]
    assert tokens[0] == {}  # closed before its end: no usage
    assert max(passes) == len(CONTENTS)
    assert len(passes) < sum(tokens[index]["completion_tokens"] for index in (1, 2, 3))


def test_a_failing_batch_fails_every_row_and_unloading_its_adapter_fails_cleanly(served, monkeypatch):
    backend = served.backend
    backend.load("kolm-extra", served.adapter_dir, None, ready=lambda: None)
    try:
        assert "".join(backend.stream("kolm-extra", conversation(CONTENTS[2]), None, MAX_TOKENS))
        assert len(backend._generation._passes.drafters["kolm-extra"]) == 1, "a finished answer is remembered"
        first = backend.stream("kolm-extra", conversation(CONTENTS[0]), None, MAX_TOKENS)
        second = backend.stream("kolm-extra", conversation(CONTENTS[1]), None, MAX_TOKENS)
        next(first)
        next(second)  # joins the running row: one batch of two
        assert len(backend._generation._batches["kolm-extra"].rows) == 2

        def broken(batch):
            raise RuntimeError("device lost")

        with monkeypatch.context() as patched:
            patched.setattr(backend._generation._passes, "decode", broken)
            with pytest.raises(BackendError, match="generation failed: RuntimeError: device lost"):
                list(first)
        with pytest.raises(BackendError, match="device lost"):  # the same batch's other row got it too
            list(second)

        first = backend.stream("kolm-extra", conversation(CONTENTS[0]), None, MAX_TOKENS)
        second = backend.stream("kolm-extra", conversation(CONTENTS[1]), None, MAX_TOKENS)
        next(first)
        next(second)
    finally:
        backend.unload("kolm-extra")
    for pieces in (first, second):
        with pytest.raises(BackendError, match="adapter kolm-extra was unloaded"):
            list(pieces)
    with pytest.raises(BackendError, match="adapter kolm-extra is not loaded"):
        list(backend.stream("kolm-extra", conversation(CONTENTS[0]), None, MAX_TOKENS))
    assert "kolm-extra" not in backend._generation._batches
    assert "kolm-extra" not in backend._generation._passes.drafters, "its answers are forgotten with it"
    # The served tasks are untouched.
    assert ask(served, "acme.chat", CONTENTS[2])[0]


def test_rows_join_and_leave_a_running_batch_at_any_step_without_changing_answers(served, monkeypatch):
    """Continuous batching: a request joins the running batch at the next pass and a finished row leaves it; the
    cache keeps only the columns some running row still attends to."""
    backend = served.backend
    # One token a pass (no drafts, test_drafting.py's subject): a draft's rejected columns would widen the cache.
    monkeypatch.setattr(backend._generation._passes, "drafting", False)
    limits = [6, MAX_TOKENS, 11, MAX_TOKENS]  # rows leave at different steps
    with served.runtime.lease("acme.chat") as lease:
        def start(index: int, usage: dict | None = None) -> Iterator[str]:
            return backend.stream(lease.name, conversation(CONTENTS[index]), None, limits[index], usage)

        usages: list[dict] = [{} for _ in CONTENTS]
        alone = ["".join(start(index, usages[index])) for index in range(len(CONTENTS))]
        streams: dict[int, Iterator[str]] = {}
        answers = {index: "" for index in range(len(CONTENTS))}
        finished: set[int] = set()
        with counted_passes(backend) as passes:
            for turn in range(10 * MAX_TOKENS):
                if turn % 3 == 0 and len(streams) < len(CONTENTS):
                    streams[len(streams)] = start(len(streams))  # a new request every third step
                for index, pieces in streams.items():
                    if index not in finished:
                        piece = next(pieces, None)
                        if piece is None:
                            finished.add(index)
                        else:
                            answers[index] += piece
                batch = backend._generation._batches.get(lease.name)
                if batch is not None and batch.rows:
                    width = max(row.prompt_tokens + len(row.generated) - 1 for row in batch.rows)
                    assert batch.mask.shape == (len(batch.rows), width)
                    assert batch.cache.get_seq_length() == width
                if len(finished) == len(CONTENTS):
                    break
    assert [answers[index] for index in range(len(CONTENTS))] == alone
    assert lease.name not in backend._generation._batches
    assert max(passes) > 1
    assert len(passes) < sum(usage["completion_tokens"] for usage in usages)
