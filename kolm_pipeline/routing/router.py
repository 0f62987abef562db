"""Who answers a namespace's traffic at the capture endpoint: the teacher (the frontier API), or the
namespace's deployed adapter (the student, served by `kolm serve`). The namespace's `routing` switch says:

* `teacher`: the proxy as before; nothing here runs beyond one cached lookup.
* `shadow`: the teacher answers, unchanged and undelayed; once its reply is recorded, the same request is put
  to the student off the response path, and the two answers are compared (`evaluate.verifiers.agreement`).
* `student`: the student is asked first. Its answer is returned when its confidence reaches the namespace's
  threshold (chosen from the compared requests so that the kept answers agree with the teacher at the target,
  `store.student_routing.choose_threshold`) and the serving adapter is the one the threshold was chosen for;
  otherwise, and for a canary share of the confident ones, the teacher answers and the two are compared.
  The student down, slow (a timeout) or not deployed: the teacher answers, and no client request fails.

A namespace's routing is read from the store at its first call, then again every `refresh_s` seconds by a
background task (never on the response path), so a switch change takes effect within that time on every proxy
replica. Comparisons are
written in batches by a background task; a bounded number run at once and the rest are skipped (counted)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import suppress
from dataclasses import dataclass

from kolm_pipeline.capture.batch import REDACTED, STORE_DOWN
from kolm_pipeline.capture.forward import SERVED_BY_HEADER, Call, RawHeaders, Send, respond
from kolm_pipeline.capture.providers import Completion
from kolm_pipeline.capture.redact import Redactor
from kolm_pipeline.evaluate.verifiers import agreement
from kolm_pipeline.provenance import jsontext
from kolm_pipeline.routing.replies import REPLIES
from kolm_pipeline.routing.student_client import (
    StudentClient,
    StudentReply,
    max_tokens_of,
    student_can_answer,
    student_messages,
)
from kolm_pipeline.store import CaptureStore, partition_key
from kolm_pipeline.store.student_routing import Comparison

log = logging.getLogger(__name__)


# Comparisons waiting to be written, at most: past it the oldest are dropped (and counted), never the traffic.
MAX_PENDING = 10_000


@dataclass(frozen=True)
class NamespaceRoute:
    """A namespace's routing as last read: mode, the confidence threshold and the adapter it was chosen for, and
    the namespace's redaction (a student's answer is stored for comparison redacted as a capture is)."""

    mode: str
    threshold: float | None = None
    canary_share: float = 0.0
    adapter_cid: str | None = None
    redactor: Redactor | None = None


TEACHER = NamespaceRoute("teacher")


class StudentRouter:
    """The capture proxy's routing (see the module docstring); one per proxy, started in its lifespan."""

    def __init__(self, store: CaptureStore, client: StudentClient, refresh_s: float = 2.0,
                 max_in_flight: int = 8, flush_s: float = 0.5) -> None:
        self._store = store
        self._client = client
        self._refresh_s = refresh_s
        self._max_in_flight = max_in_flight
        self._flush_s = flush_s
        self._routes: dict[tuple[str, str], NamespaceRoute] = {}
        self._refresher: asyncio.Task | None = None
        self._pending: list[Comparison] = []
        self._tasks: set[asyncio.Task] = set()
        self._flusher: asyncio.Task | None = None
        self.stats = {"student_answered": 0, "escalated": 0, "canaries": 0, "fallbacks": 0, "shadowed": 0,
                      "skipped": 0, "compared": 0, "dropped": 0}

    async def start(self) -> None:
        await self._client.start()
        self._flusher = asyncio.create_task(self._flush_periodically())
        self._refresher = asyncio.create_task(self._refresh_periodically())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for background in (self._flusher, self._refresher):
            if background is not None:
                background.cancel()
                with suppress(asyncio.CancelledError):
                    await background
        await self._flush()
        await self._client.close()

    # --- the namespace's routing ---------------------------------------------------------------------------

    def cached(self, tenant: str, namespace: str) -> NamespaceRoute | None:
        """The namespace's routing as last read; None before its first call."""
        return self._routes.get((tenant, namespace))

    async def load(self, tenant: str, namespace: str) -> NamespaceRoute:
        """Read the namespace's routing now (its first call, then every `refresh_s`). When the store fails, the
        routing last read stays (the teacher for a namespace never read)."""
        try:
            route = await asyncio.to_thread(self._read, tenant, namespace)
        except Exception as exc:  # noqa: BLE001 - the store down: keep what was known
            log.warning("routing of %s.%s unreadable (%s): keeping what was last read", tenant, namespace,
                        type(exc).__name__)
            route = self._routes.get((tenant, namespace), TEACHER)
        self._routes[(tenant, namespace)] = route
        return route

    def _read(self, tenant: str, namespace: str) -> NamespaceRoute:
        settings = self._store.namespace_settings(tenant, namespace)
        if settings.routing == "teacher":
            return TEACHER
        cid = self._store.deployed_cid(tenant, namespace)
        threshold = None
        if settings.routing == "student" and cid is not None:
            threshold = self._store.student_threshold(tenant, namespace, cid, settings.routing_target,
                                                      settings.shadow_min)
        try:
            redactor = Redactor(settings.redact_entities)
        except ValueError:  # a stored choice this version does not know: every entity, as captures get
            redactor = Redactor()
        return NamespaceRoute(settings.routing, threshold, settings.canary_share, cid, redactor)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            for tenant, namespace in list(self._routes):
                await self.load(tenant, namespace)

    # --- the proxied call ----------------------------------------------------------------------------------

    async def answer(self, call: Call, body: dict, send: Send, route: NamespaceRoute) -> bool:
        """Route one call of a namespace whose mode is not `teacher`: True when the student answered it (the
        response is sent and the call recorded), False when the teacher must (comparison hooks set)."""
        call.routed = True
        if route.mode == "shadow" or route.threshold is None or route.adapter_cid is None:
            # Shadow, or a student without a threshold yet (a new adapter): the teacher answers at once, the
            # student is asked off the response path, and the comparison counts toward its threshold.
            call.on_recorded = lambda *recorded: self._spawn(self._shadow(call, body, route, *recorded))
            return False
        began = time.perf_counter_ns()
        reply = await self._ask(call, body)
        if reply is None:
            self.stats["fallbacks"] += 1
            return False
        confident = reply.cid == route.adapter_cid and reply.confidence >= route.threshold
        if confident and random.random() >= route.canary_share:
            await self._answer_as_student(call, body, send, reply, began)
            return True
        kind = "canary" if confident else "escalated"
        self.stats["canaries" if confident else "escalated"] += 1
        call.on_recorded = lambda *recorded: self._spawn(self._compare(call, reply, kind, route, *recorded))
        return False

    async def _ask(self, call: Call, body: dict) -> StudentReply | None:
        if not student_can_answer(body):
            return None
        try:
            messages = student_messages(call.provider.messages(body))
        except ValueError:
            messages = None
        if messages is None or not call.kolm_key:
            return None
        # With the key that named the tenant: kolm serve checks it as the proxy did.
        return await self._client.ask(partition_key(call.tenant, call.namespace), messages, max_tokens_of(body),
                                      call.kolm_key)

    async def _answer_as_student(self, call: Call, body: dict, send: Send, reply: StudentReply, began: int) -> None:
        data, content_type = REPLIES[call.provider.name](call.request_id or "unrecorded", call.model, reply,
                                                         call.streamed)
        call.served_by = reply.cid
        call.start_ns = began
        call.on_recorded = None
        call.record("stream" if call.streamed else "reply", 200, data)
        self.stats["student_answered"] += 1
        headers: RawHeaders = [*call.id_header, (SERVED_BY_HEADER, reply.cid.encode())]
        await respond(send, 200, data, content_type, headers)

    # --- comparisons, off the response path ----------------------------------------------------------------

    def _spawn(self, work) -> None:
        if len(self._tasks) >= self._max_in_flight:
            work.close()
            self.stats["skipped"] += 1
            return
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, call: Call, body: dict, route: NamespaceRoute, outcome: str, status: int, reply: bytes,
                      latency_us: int) -> None:
        if teacher_text(call, outcome, status, reply) is None:
            return
        student = await self._ask(call, body)
        if student is None:
            self.stats["fallbacks"] += 1
            return
        self.stats["shadowed"] += 1
        await self._compare(call, student, "shadow", route, outcome, status, reply, latency_us)

    async def _compare(self, call: Call, student: StudentReply, kind: str, route: NamespaceRoute, outcome: str,
                       status: int, reply: bytes, latency_us: int) -> None:
        teacher = teacher_text(call, outcome, status, reply)
        if teacher is None or call.request_id is None:
            return
        # Stored as a capture's text is: without the provider key, PII redacted (the teacher's is, in the capture).
        stored = student.text.replace(call.secret, REDACTED) if call.secret else student.text
        if route.redactor is not None:
            stored = route.redactor.text(stored)
        if len(self._pending) >= MAX_PENDING:
            del self._pending[0]
            self.stats["dropped"] += 1
        self._pending.append(Comparison(
            tenant=call.tenant, namespace=call.namespace, request_id=call.request_id, adapter_cid=student.cid,
            kind=kind, agreement=agreement(student.kind, student.text, teacher), confidence=student.confidence,
            student_output=stored, student_latency_us=student.latency_us, teacher_latency_us=latency_us,
        ))
        self.stats["compared"] += 1

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await asyncio.to_thread(self._store.add_comparisons, batch)
        except STORE_DOWN as exc:  # the store is away: kept (up to MAX_PENDING) for the next flush
            log.warning("writing %d comparisons failed (%s): retrying", len(batch), type(exc).__name__)
            self._keep(batch)
        except Exception:  # noqa: BLE001 - a row the store refuses: write the others one by one, drop it
            for index, comparison in enumerate(batch):
                try:
                    await asyncio.to_thread(self._store.add_comparisons, [comparison])
                except STORE_DOWN:  # gone meanwhile: the rest waits for the next flush
                    self._keep(batch[index:])
                    return
                except Exception as exc:  # noqa: BLE001
                    log.warning("dropping the comparison of capture %s (%s)", comparison.request_id,
                                type(exc).__name__)
                    self.stats["dropped"] += 1

    def _keep(self, batch: list[Comparison]) -> None:
        pending = batch + self._pending
        self.stats["dropped"] += max(0, len(pending) - MAX_PENDING)
        self._pending = pending[-MAX_PENDING:]


def teacher_text(call: Call, outcome: str, status: int, reply: bytes) -> str | None:
    """The teacher's complete answer in a recorded reply, or None (a failure, an error, a cut-off stream)."""
    if not 200 <= status < 300:
        return None
    try:
        if outcome == "reply":
            completion: Completion = call.provider.completion(jsontext.loads_replies(reply))
            return completion.output_text
        if outcome == "stream":
            state = call.provider.new_stream()
            state.feed(reply)
            return state.text if state.complete and not state.failed else None
    except (ValueError, RecursionError):
        return None
    return None
