"""The proxy's side of recording: each finished call goes into the proxy's journal (`journal.py`) before the
client's response completes, and a writer (`drain.py`) stores it from there. The proxy keeps nothing in
memory on the way: a capture whose response a client received is on disk, and survives the proxy and the
writer being killed; the next writer stores it exactly once.

The writer is a process of its own, restarted if it dies; where the store cannot be opened by another
process it is a thread of the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from kolm_pipeline.capture import journal
from kolm_pipeline.capture.batch import STATS, BatchWriter, Quarantine, StoreSpec
from kolm_pipeline.capture.drain import Drain, DrainOptions, DrainThread, spawn
from kolm_pipeline.store import CaptureStore

logger = logging.getLogger(__name__)

_WRITER_RESTART_S = (1.0, 60.0)  # first and longest wait before a new writer, doubling in between
_FLUSH_POLL_S = 0.01


class Recorder:
    """Journals finished calls and keeps a writer storing them. Calls in flight are counted (`begin` …
    `submit`/`abandon`) so that `flush` also waits for streams that have not finished yet."""

    def __init__(
        self,
        store: CaptureStore,
        journal_root: Path,
        quarantine_dir: Path,
        legacy_spool: Path | None = None,
        batch_size: int = 200,
        poll_s: float = 0.05,
        retry_interval: float = 1.0,
        settings_ttl: float = 5.0,
        separate_process: bool = True,
        images_url: str | None = None,
        images_root: Path | None = None,
    ) -> None:
        self._store = store
        self._images = (images_url, images_root)
        self.journal = journal.Journal(journal_root)
        self._quarantine_dir = quarantine_dir
        self._legacy_spool = legacy_spool
        self._batch_size = batch_size
        self._poll_s = poll_s
        self._retry_interval = retry_interval
        self._settings_ttl = settings_ttl
        self._spec = StoreSpec.of(store) if separate_process else None
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: DrainThread | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._lost = 0

    @property
    def stats(self) -> dict[str, int]:
        """Captures written and quarantined by the writer, and lost (the journal could not take them)."""
        directory = self.journal.directory
        _, stats = journal.read_checkpoint(directory) if directory is not None else (None, {})
        totals = {name: int(stats.get(name, 0)) for name in STATS}
        totals["lost"] += self._lost
        return totals

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id; None while captures are written on a thread of the proxy."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def _options(self) -> DrainOptions:
        return DrainOptions(
            root=self.journal.root,
            own=self.journal.directory,
            quarantine=self._quarantine_dir,
            legacy_spool=self._legacy_spool,
            batch_size=self._batch_size,
            poll_s=self._poll_s,
            retry_interval=self._retry_interval,
            settings_ttl=self._settings_ttl,
            images_url=self._images[0],
            images_root=self._images[1],
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        if not self._in_flight:
            self._idle.set()
        self.journal.open()
        if self._spec is not None:
            self._process = await asyncio.to_thread(spawn, self._options(), self._spec)
            self._watchdog = asyncio.create_task(self._watch(), name="kolm-capture-writer-watchdog")
        else:
            options = self._options()
            writer = BatchWriter(self._store, Quarantine(options.quarantine), options.settings_ttl,
                                 options.image_store())
            self._thread = DrainThread(Drain(options, writer))
            self._thread.start()

    async def _watch(self) -> None:
        """Start a new writer when the writer process ends; what it had not stored is still in the journal."""
        delay = _WRITER_RESTART_S[0]
        while True:
            await asyncio.sleep(self._retry_interval)
            process = self._process
            if process is None or process.poll() is None:
                delay = _WRITER_RESTART_S[0]
                continue
            logger.error("capture writer process ended (%s); starting a new one in %.0fs", process.returncode, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WRITER_RESTART_S[1])
            assert self._spec is not None
            self._process = await asyncio.to_thread(spawn, self._options(), self._spec)

    async def stop(self, timeout: float = 10.0) -> None:
        """Journal what is in flight, stop the writer, store what it had not, and release the journal."""
        if self._loop is None:
            return
        await self._journaled(timeout)
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self._process is not None:
            # Killed, not asked: its only state is the journal, and a writer in the idle class may get no CPU time
            # on a busy host to act on a request (it cannot leave that class). This process stores the rest.
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
            await asyncio.to_thread(self._drain_here)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.stop, timeout)
        caught_up = self._caught_up()
        directory = self.journal.directory
        self.journal.close()
        if caught_up and directory is not None:
            journal.remove(directory)
        elif directory is not None:
            logger.warning("captures not yet stored stay in %s; the next proxy's writer stores them", directory)
        self._loop = None

    def begin(self) -> None:
        """A call started that will end in exactly one `submit` or `abandon`."""
        if not self._in_flight and self._idle is not None:
            self._idle.clear()
        self._in_flight += 1

    def submit(self, record: tuple[Any, ...]) -> None:
        """Journal a finished call (`Pending`'s fields, as a plain tuple), before its response completes."""
        try:
            self.journal.append(record)
        except (OSError, ValueError) as exc:  # the disk is full, or the journal is closed
            self._lost += 1
            logger.error("could not journal a capture (%s); it is lost", type(exc).__name__)
        finally:
            self._done()

    def abandon(self) -> None:
        """A call begun with `begin` produced no record."""
        self._done()

    def _done(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _caught_up(self) -> bool:
        directory = self.journal.directory
        if directory is None:
            return True
        position, _ = journal.read_checkpoint(directory)
        return position >= self.journal.position

    def _drain_here(self) -> None:
        """Store what the own journal holds on this process (the last drain, once the writer has ended)."""
        options = self._options()
        writer = BatchWriter(self._store, Quarantine(options.quarantine), options.settings_ttl,
                             options.image_store())
        Drain(options, writer).drain_own()

    async def _journaled(self, timeout: float) -> None:
        """Wait for calls in flight to be journaled."""
        if self._idle is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("%d capture(s) still in flight after %.1fs", self._in_flight, timeout)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait for calls in flight to be journaled and for the writer to store everything journaled."""
        if self._loop is None or self._idle is None:
            return
        await self._journaled(timeout)
        deadline = self._loop.time() + timeout
        while not self._caught_up():
            if self._loop.time() > deadline:
                logger.warning("flush: the capture writer has not stored everything after %.1fs", timeout)
                return
            await asyncio.sleep(_FLUSH_POLL_S)

    def flush_threadsafe(self, timeout: float = 10.0) -> None:
        """`flush` from another thread, e.g. a test driving a server that runs in a background thread."""
        if self._loop is None:
            return
        future: Future[Any] = asyncio.run_coroutine_threadsafe(self.flush(timeout), self._loop)
        future.result(timeout * 2 + 1)

    def unstored(self) -> int:
        """Bytes journaled by this proxy that the writer has not stored yet (0 once it caught up)."""
        directory = self.journal.directory
        if directory is None or self._caught_up():
            return 0
        position, _ = journal.read_checkpoint(directory)
        return sum(
            path.stat().st_size - (position.offset if number == position.segment else 0)
            for number, path in journal.segments(directory)
            if number >= position.segment
        )
