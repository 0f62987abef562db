"""Recording off the response path. The proxy hands each finished call to the `Recorder` as raw bytes (the
request body and the reply, as they went over the wire) and answers the client at once. A separate writer
process (`writer.py`) does the rest: it parses the reply, scrubs the provider key, redacts PII and writes
batches to the store. Keeping that CPU work out of the proxy's process keeps it off the proxy's GIL, so a
response never waits on it; the proxy pays one pickled tuple per call.

When the store is down a batch goes to the local spool instead, and is replayed once the store answers.
Every batch sent to the writer is kept until the writer acknowledges it (written or spooled); if the writer
process dies, what it had not acknowledged is written from the proxy's own worker threads, and a new
writer is started. The store skips request ids it already has, so a batch written twice is stored once.
Nothing acknowledged to a client is dropped on the way to the store.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import subprocess
from concurrent.futures import Future
from contextlib import suppress
from typing import Any

from kolm_pipeline.capture import writer as writer_process
from kolm_pipeline.capture.batch import (
    _STATS,
    FRAME_HEADER,
    BatchWriter,
    StoreSpec,
    WriterOptions,
    frame,
)
from kolm_pipeline.capture.spool import Spool
from kolm_pipeline.store import CaptureStore

logger = logging.getLogger(__name__)

_WRITER_RESTART_S = (1.0, 60.0)  # first and longest wait before a new writer, doubling in between


class _Writer:
    """The parent's handle on one writer process: the socket to it and the batches it has not acknowledged."""

    def __init__(self, process: subprocess.Popen[bytes], reader: asyncio.StreamReader, stream: Any) -> None:
        self.process = process
        self.reader = reader
        self.stream = stream
        self.unacked: dict[int, list[tuple[Any, ...]]] = {}
        self.unacked_count = 0
        self.stats = dict.fromkeys(_STATS, 0)
        self.task: asyncio.Task[None] | None = None


class Recorder:
    """Takes finished calls from the proxy and gets them recorded. Calls in flight are counted (`begin` …
    `submit`/`abandon`) so that `flush` also waits for streams that have not finished yet.

    `separate_process=False` (or a store another process cannot open) writes on worker threads of the
    proxy's own process instead."""

    def __init__(
        self,
        store: CaptureStore,
        spool: Spool | None = None,
        batch_size: int = 200,
        max_queue: int = 50_000,
        retry_interval: float = 1.0,
        settings_ttl: float = 5.0,
        linger: float = 0.05,
        separate_process: bool = True,
    ) -> None:
        self._store = store
        self.spool = spool
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._retry_interval = retry_interval
        self._linger = linger
        self._local = BatchWriter(store, spool, retry_interval, settings_ttl)
        spec = StoreSpec.of(store) if separate_process else None
        self._options = (
            WriterOptions(
                spec,
                spool.directory.resolve() if spool is not None else None,
                batch_size,
                retry_interval,
                settings_ttl,
            )
            if spec is not None
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: _Writer | None = None
        self._retired = dict.fromkeys(_STATS, 0)
        self._outbox: list[tuple[Any, ...]] = []  # `Pending`s fields as plain tuples, see `submit`
        self._send_timer: asyncio.TimerHandle | None = None
        self._seq = 0
        self._acked = asyncio.Event()
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._local_jobs: set[asyncio.Future[Any]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._lost = 0
        self._restart_delay = _WRITER_RESTART_S[0]

    @property
    def stats(self) -> dict[str, int]:
        """Captures written, spooled, replayed and lost, by the writer processes and the proxy together."""
        live = self._writer.stats if self._writer is not None else {}
        totals = {name: self._retired[name] + live.get(name, 0) + self._local.stats[name] for name in _STATS}
        totals["lost"] += self._lost
        return totals

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id; None while captures are written in the proxy's own process."""
        return self._writer.process.pid if self._writer is not None else None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        if not self._in_flight:
            self._idle.set()
        self._acked = asyncio.Event()
        self._acked.set()
        self._stopping = False
        if self._options is not None:
            await self._start_writer()
        if self.spool is not None and self._options is None:
            self._tasks.append(asyncio.create_task(self._replay_loop(), name="kolm-capture-replay"))

    async def _start_writer(self) -> None:
        """Start a writer process and the task that reads its acknowledgements."""
        assert self._options is not None
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.to_thread(writer_process.spawn, theirs)
            ours.sendall(frame(self._options))
        except Exception as exc:
            ours.close()
            logger.error("could not start the capture writer process (%s); writing in-process", type(exc).__name__)
            self._options = None
            if self.spool is not None:
                self._tasks.append(asyncio.create_task(self._replay_loop(), name="kolm-capture-replay"))
            return
        finally:
            theirs.close()
        reader, stream = await asyncio.open_connection(sock=ours)
        writer = _Writer(process, reader, stream)
        writer.task = asyncio.create_task(self._read_acks(writer), name="kolm-capture-writer-acks")
        self._writer = writer
        self._tasks.append(writer.task)

    async def stop(self, timeout: float = 10.0) -> None:
        """Record what is in flight and queued, then stop the writer process and the background tasks."""
        if self._loop is None:
            return
        await self.flush(timeout)
        self._stopping = True
        writer = self._writer
        if writer is not None:
            self._send()
            with suppress(OSError):
                writer.stream.write(frame(("stop", 0, None)))
                await writer.stream.drain()
            try:
                await asyncio.to_thread(writer.process.wait, timeout)
            except subprocess.TimeoutExpired:
                logger.error("capture writer process did not stop in %.0fs; terminating it", timeout)
                writer.process.terminate()
                await asyncio.to_thread(writer.process.wait)
            # The writer has exited, so its socket ends: the acknowledgement reader finishes by itself.
            if writer.task is not None:
                with suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(writer.task), timeout)
            writer.stream.close()
        if self._local_jobs:
            await asyncio.wait(list(self._local_jobs), timeout=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._loop = None

    def begin(self) -> None:
        """A call started that will end in exactly one `submit` or `abandon`."""
        if not self._in_flight and self._idle is not None:
            self._idle.clear()
        self._in_flight += 1

    def submit(self, record: tuple[Any, ...]) -> None:
        """Queue a finished call without waiting: `record` is `Pending`'s fields, as a plain tuple. Calls go
        to the writer in batches, `linger` seconds or `batch_size` calls at a time: one write to the socket
        and one wake-up of the writer per batch.

        The proxy holds the plain tuple until the writer acknowledges it: the garbage collector stops
        tracking a tuple of strings and numbers at its first pass, never a NamedTuple. It also pickles without
        calling back into Python, on the event loop."""
        try:
            if self._loop is None:
                self._lost += 1
                logger.error("capture recorder not running; a capture was lost")
                return
            outbox = self._outbox
            outbox.append(record if type(record) is tuple else tuple(record))
            if len(outbox) >= self._batch_size:
                self._send()
            elif self._send_timer is None:
                self._send_timer = self._loop.call_later(self._linger, self._send)
        finally:
            self._done()

    def abandon(self) -> None:
        """A call begun with `begin` produced no record."""
        self._done()

    def _done(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        batch, self._outbox = self._outbox, []
        writer = self._writer
        if writer is not None and batch and writer.unacked_count + len(batch) <= self._max_queue:
            self._seq += 1
            writer.unacked[self._seq] = batch
            writer.unacked_count += len(batch)
            self._acked.clear()
            writer.stream.write(frame(("batch", self._seq, batch)))
        elif batch:
            self._write_locally(batch)

    def _write_locally(self, batch: list[tuple[Any, ...]]) -> None:
        """Write on a worker thread of this process: no writer process, or it is too far behind."""
        assert self._loop is not None
        job = self._loop.run_in_executor(None, self._local.write, batch)
        self._local_jobs.add(job)
        job.add_done_callback(self._local_jobs.discard)

    async def _read_acks(self, writer: _Writer) -> None:
        try:
            while True:
                header = await writer.reader.readexactly(FRAME_HEADER.size)
                (length,) = FRAME_HEADER.unpack(header)
                seqs, stats = pickle.loads(await writer.reader.readexactly(length))
                for seq in seqs:
                    writer.unacked_count -= len(writer.unacked.pop(seq, ()))
                writer.stats = stats
                self._restart_delay = _WRITER_RESTART_S[0]
                if not writer.unacked:
                    self._acked.set()
        except (asyncio.IncompleteReadError, OSError):
            pass
        except Exception as exc:  # a garbled frame: this writer cannot be trusted any more
            logger.error("bad frame from the capture writer (%s); replacing it", type(exc).__name__)
            with suppress(OSError):
                writer.process.kill()
        if self._writer is writer:
            self._writer_gone(writer)

    def _writer_gone(self, writer: _Writer) -> None:
        """The writer process ended: whatever it had not acknowledged is written here, and, unless the
        recorder is stopping, a new writer is started."""
        self._writer = None
        unacked = [pending for batch in writer.unacked.values() for pending in batch]
        writer.unacked.clear()
        writer.unacked_count = 0
        self._retire(writer)
        if unacked:
            self._write_locally(unacked)
        self._acked.set()
        if self._stopping:
            return
        logger.error("capture writer process ended; %d unacknowledged capture(s) written in-process", len(unacked))
        self._tasks.append(asyncio.create_task(self._restart_writer(writer), name="kolm-capture-writer-restart"))

    def _retire(self, writer: _Writer) -> None:
        for name in _STATS:
            self._retired[name] += writer.stats.get(name, 0)
        writer.stats = dict.fromkeys(_STATS, 0)

    async def _restart_writer(self, old: _Writer) -> None:
        old.stream.close()
        await asyncio.to_thread(old.process.wait)
        delay, self._restart_delay = self._restart_delay, min(self._restart_delay * 2, _WRITER_RESTART_S[1])
        await asyncio.sleep(delay)
        if not self._stopping and self._writer is None and self._options is not None:
            await self._start_writer()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait for calls in flight to be recorded and for everything queued to be written or spooled."""
        if self._loop is None or self._idle is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("flush: %d capture(s) still in flight after %.1fs", self._in_flight, timeout)
        self._send()
        try:
            await asyncio.wait_for(self._acked.wait(), timeout)
        except TimeoutError:
            logger.warning("flush: the capture writer has not acknowledged everything after %.1fs", timeout)
        if self._local_jobs:
            await asyncio.wait(list(self._local_jobs), timeout=timeout)

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
        return await asyncio.to_thread(self._local.replay)

    def replay_threadsafe(self, timeout: float = 30.0) -> int:
        return self._threadsafe(self.replay(), timeout) or 0

    def spooled(self) -> int:
        """Captures waiting in the spool."""
        return self.spool.pending() if self.spool is not None else 0

    async def _replay_loop(self) -> None:
        """Without a writer process, the proxy replays the spool itself."""
        assert self.spool is not None
        while True:
            await asyncio.sleep(self._retry_interval)
            try:
                if await asyncio.to_thread(self.spool.files):
                    await asyncio.to_thread(self._local.replay)
            except Exception as exc:
                logger.error("spool replay failed: %s", type(exc).__name__)
