"""Background batched writer: the proxy hands each finished call to a queue and answers the client at once;
a task drains the queue in batches on a worker thread, where the record is built (the reply parsed), the
provider key scrubbed, PII redacted and the batch written. No response waits on any of it.

When the store is down the batch goes to the local spool instead and a replay task writes it back once
the store answers; a full queue hands the call to a worker thread directly. Nothing acknowledged to a
client is dropped on the way to the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kolm_pipeline.capture.redact import Redactor
from kolm_pipeline.capture.spool import Spool
from kolm_pipeline.store import CaptureStore, NewCapture

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"
_STORE_DOWN = (OperationalError, DBAPIError, PoolTimeout, ConnectionError)


def scrub(value: Any, secret: str) -> Any:
    """Replace every occurrence of `secret` in the strings of a JSON-like value."""
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, list):
        return [scrub(item, secret) for item in value]
    if isinstance(value, dict):
        return {scrub(k, secret): scrub(v, secret) for k, v in value.items()}
    return value


def scrub_record(record: NewCapture, secret: str) -> NewCapture:
    return replace(
        record,
        model=scrub(record.model, secret),
        messages=scrub(record.messages, secret),
        output_text=scrub(record.output_text, secret),
        tags=[scrub(tag, secret) for tag in record.tags],
    )


@dataclass(frozen=True)
class Pending:
    """A finished call whose record is built off the response path. `secret` (the provider key) is
    scrubbed from every text of the record and then dropped; it never reaches the store or the spool."""

    build: Callable[[], NewCapture]
    secret: str = ""
    created_at: datetime | None = None


class Recorder:
    """Queue of finished calls to record. Calls in flight are counted (`begin` … `submit`/`abandon`) so
    that `flush` also waits for streams that have not finished yet."""

    def __init__(
        self,
        store: CaptureStore,
        spool: Spool | None = None,
        batch_size: int = 200,
        max_queue: int = 50_000,
        retry_interval: float = 1.0,
        settings_ttl: float = 5.0,
        linger: float = 0.05,
    ) -> None:
        self._store = store
        self.spool = spool
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._retry_interval = retry_interval
        self._settings_ttl = settings_ttl
        self._linger = linger
        self._queue: asyncio.Queue[Pending] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._overflow: set[asyncio.Future[None]] = set()
        self._down_until = 0.0
        self._replay_lock = threading.Lock()
        self._redactors: dict[tuple[str, str], tuple[Redactor, float]] = {}
        self._default_redactor = Redactor()
        self.stats = {"written": 0, "spooled": 0, "replayed": 0, "lost": 0}

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self._max_queue)
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks = [asyncio.create_task(self._drain(), name="kolm-capture-recorder")]
        if self.spool is not None:
            self._tasks.append(asyncio.create_task(self._replay_loop(), name="kolm-capture-replay"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Write (or spool) what is queued, then end the background tasks."""
        if not self._tasks:
            return
        await self.flush(timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks)
        self._tasks = []

    def begin(self) -> None:
        """A call started that will end in exactly one `submit` or `abandon`."""
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def submit(self, pending: Pending) -> None:
        """Queue a finished call without waiting; when the queue is full a worker thread takes it."""
        if pending.created_at is None:
            pending = replace(pending, created_at=datetime.now(UTC))
        try:
            if self._queue is None or self._loop is None:
                raise RuntimeError("recorder not started")
            try:
                self._queue.put_nowait(pending)
            except asyncio.QueueFull:
                future = self._loop.run_in_executor(None, self._write, [pending])
                self._overflow.add(future)
                future.add_done_callback(self._overflow.discard)
        except RuntimeError:
            self.stats["lost"] += 1
            logger.error("capture recorder not running; a capture was lost")
        finally:
            self._done()

    def abandon(self) -> None:
        """A call begun with `begin` produced no record."""
        self._done()

    def _done(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait for calls in flight to be recorded and for everything queued to be written or spooled."""
        if self._queue is None or self._idle is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("flush: %d capture(s) still in flight after %.1fs", self._in_flight, timeout)
        await asyncio.wait_for(self._queue.join(), timeout)
        if self._overflow:
            await asyncio.wait(list(self._overflow), timeout=timeout)

    def _threadsafe(self, coro: Any, timeout: float) -> Any:
        if self._loop is None:
            coro.close()
            return None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def flush_threadsafe(self, timeout: float = 10.0) -> None:
        """`flush` from another thread, e.g. a test driving a server that runs in a background thread."""
        self._threadsafe(self.flush(timeout), timeout * 2 + 1)

    async def replay(self) -> int:
        """Write spooled batches back now; returns how many captures were replayed."""
        return await asyncio.to_thread(self._replay_files)

    def replay_threadsafe(self, timeout: float = 30.0) -> int:
        return self._threadsafe(self.replay(), timeout) or 0

    def spooled(self) -> int:
        """Captures waiting in the spool."""
        return self.spool.pending() if self.spool is not None else 0

    # Worker-thread side

    def _redactor(self, tenant: str, namespace: str) -> Redactor:
        """The namespace's redactor, re-read every few seconds; every entity while the store is down."""
        now = time.monotonic()
        cached = self._redactors.get((tenant, namespace))
        if cached is not None and cached[1] > now:
            return cached[0]
        if not self._store_up():
            return cached[0] if cached is not None else self._default_redactor
        try:
            entities = self._store.namespace_settings(tenant, namespace).redact_entities
            redactor = self._default_redactor if entities is None else Redactor(entities)
        except ValueError:
            redactor = self._default_redactor
        except _STORE_DOWN:
            self._mark_down()
            return cached[0] if cached is not None else self._default_redactor
        self._redactors[(tenant, namespace)] = (redactor, now + self._settings_ttl)
        return redactor

    def _store_up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _mark_down(self) -> None:
        self._down_until = time.monotonic() + self._retry_interval

    def _build(self, batch: list[Pending]) -> list[NewCapture]:
        records = []
        for pending in batch:
            try:
                record = pending.build()
                if record.created_at is None:
                    record = replace(record, created_at=pending.created_at)
                if pending.secret:
                    record = scrub_record(record, pending.secret)
                records.append(self._redactor(record.tenant, record.namespace).capture(record))
            except Exception as exc:  # a record that cannot be built must not take the batch with it
                self.stats["lost"] += 1
                logger.error("could not build a capture record: %s", type(exc).__name__)
        return records

    def _write(self, batch: list[Pending]) -> None:
        records = self._build(batch)
        if not records:
            return
        if self._store_up():
            try:
                self._store.insert_captures_once(records)
                self.stats["written"] += len(records)
                return
            except _STORE_DOWN as exc:
                self._mark_down()
                logger.warning(
                    "capture store unavailable (%s); spooling %d capture(s)", type(exc).__name__, len(records)
                )
            except Exception as exc:
                logger.error(
                    "capture store refused a batch (%s); spooling %d capture(s)", type(exc).__name__, len(records)
                )
        self._spool(records)

    def _spool(self, records: list[NewCapture]) -> None:
        if self.spool is None:
            self.stats["lost"] += len(records)
            logger.error("no spool configured; %d capture(s) lost", len(records))
            return
        try:
            self.spool.write(records)
            self.stats["spooled"] += len(records)
        except OSError as exc:
            self.stats["lost"] += len(records)
            logger.error("could not spool %d capture(s): %s", len(records), type(exc).__name__)

    def _replay_files(self) -> int:
        if self.spool is None:
            return 0
        replayed = 0
        with self._replay_lock:
            for path in self.spool.files():
                try:
                    records = self.spool.read(path)
                except (OSError, ValueError, TypeError) as exc:
                    self._quarantine(path, exc)
                    continue
                try:
                    self._store.insert_captures_once(records)
                except _STORE_DOWN:
                    self._mark_down()
                    break
                except Exception as exc:
                    self._quarantine(path, exc)
                    continue
                self.spool.remove(path)
                self._down_until = 0.0
                replayed += len(records)
        self.stats["replayed"] += replayed
        if replayed:
            logger.info("replayed %d spooled capture(s)", replayed)
        return replayed

    def _quarantine(self, path: Path, exc: Exception) -> None:
        """A file the store keeps refusing for a reason other than being down is set aside, not retried."""
        target = path.parent / "failed" / path.name
        target.parent.mkdir(exist_ok=True, mode=0o700)
        path.replace(target)
        logger.error("spooled batch %s refused (%s); moved to %s", path.name, type(exc).__name__, target.parent)

    # Event-loop side

    async def _drain(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            if self._linger > 0 and self._queue.qsize() < self._batch_size:
                # Let a batch gather: one transaction per burst, not one per call, keeps the writer's share
                # of the CPU (and of the GIL) away from the responses in flight.
                await asyncio.sleep(self._linger)
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception as exc:
                logger.error("capture writer failed: %s", type(exc).__name__)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _replay_loop(self) -> None:
        assert self.spool is not None
        while True:
            await asyncio.sleep(self._retry_interval)
            try:
                if await asyncio.to_thread(self.spool.files):
                    await asyncio.to_thread(self._replay_files)
            except Exception as exc:
                logger.error("spool replay failed: %s", type(exc).__name__)
