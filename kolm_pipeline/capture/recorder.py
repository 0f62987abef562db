"""Background batched writer: the proxy hands records to a queue and answers the client at once; a
task drains the queue into the store in batches on a worker thread, so no response waits on the database.
"""

from __future__ import annotations

import asyncio
import logging

from kolm_pipeline.store import CaptureStore, NewCapture

logger = logging.getLogger(__name__)


class Recorder:
    """Queue of captures to write. Calls in flight are counted (`begin` … `submit`/`abandon`) so that
    `flush` also waits for streams that have not finished yet."""

    def __init__(self, store: CaptureStore, batch_size: int = 100, max_queue: int = 10_000) -> None:
        self._store = store
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._queue: asyncio.Queue[NewCapture] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self.dropped = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self._max_queue)
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.create_task(self._drain(), name="kolm-capture-recorder")

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the drain task."""
        if self._task is None:
            return
        await self.flush(timeout)
        self._task.cancel()
        await asyncio.wait([self._task])
        self._task = None

    def begin(self) -> None:
        """A call started that will end in exactly one `submit` or `abandon`."""
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def submit(self, record: NewCapture) -> None:
        """Queue a record without waiting; a full queue drops it (and says so in the log)."""
        try:
            if self._queue is None:
                raise RuntimeError("recorder not started")
            self._queue.put_nowait(record)
        except (asyncio.QueueFull, RuntimeError):
            self.dropped += 1
            logger.warning("capture queue unavailable or full, dropped capture %s", record.request_id)
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
        """Wait for calls in flight to be recorded and for everything queued to be written."""
        if self._queue is None or self._idle is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("flush: %d capture(s) still in flight after %.1fs", self._in_flight, timeout)
        await asyncio.wait_for(self._queue.join(), timeout)

    def flush_threadsafe(self, timeout: float = 10.0) -> None:
        """`flush` from another thread, e.g. a test driving a server that runs in a background thread."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.flush(timeout), self._loop).result(timeout * 2 + 1)

    async def _drain(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self._store.insert_captures, batch)
            except Exception:
                logger.exception("could not write %d capture(s); they are lost", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
