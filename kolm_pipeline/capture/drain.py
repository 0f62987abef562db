"""The capture writer: drains journal directories (`journal.py`) into the store.

It follows its own proxy's directory as the proxy appends to it, and adopts the directory of any proxy that
is gone (its lock is free) and finishes it. Each batch it stores moves the directory's checkpoint; a batch
the store cannot take (the store is down) stays in the journal and is tried again after `retry_interval`,
so nothing waits in memory. Spool files left by versions before the journal are stored once as well.

It runs as a process of its own beside the proxy (`spawn`, `main`): the parsing and redaction then stay off
the proxy's interpreter, and it runs at idle priority, so a response never waits on it. Where the store
cannot be opened by another process (in-memory SQLite) it runs on a thread of the proxy instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kolm_pipeline.capture import journal
from kolm_pipeline.capture.batch import BatchWriter, Quarantine, StoreSpec, decode_record
from kolm_pipeline.capture.images import ImageStore
from kolm_pipeline.capture.journal import Position
from kolm_pipeline.provenance.objectstore import open_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainOptions:
    """Where the journals, the quarantine and the store are, and how the writer paces itself."""

    root: Path
    own: Path | None  # this proxy's directory: followed, not adopted
    quarantine: Path
    legacy_spool: Path | None
    batch_size: int = 200
    poll_s: float = 0.05
    retry_interval: float = 1.0
    settings_ttl: float = 5.0
    # Where captured images go (capture/images.py): the object store URL (None: the directory `images_root`);
    # no `images_root`: images are not stored, their references say so.
    images_url: str | None = None
    images_root: Path | None = None

    def image_store(self) -> ImageStore | None:
        if self.images_root is None:
            return None
        return ImageStore(open_store(self.images_url, self.images_root))


class Drain:
    """One writer's work over the journals under `options.root`."""

    def __init__(self, options: DrainOptions, writer: BatchWriter) -> None:
        self.options = options
        self.writer = writer
        self._next_adoption = 0.0
        if options.own is not None:  # a new writer for the same proxy goes on counting
            self.writer.stats.update(journal.read_checkpoint(options.own)[1])
        self.down = False  # the last batch found the store unreachable

    def run(self, stopping: Callable[[], bool]) -> None:
        """Drain until `stopping()`, then once more (what was appended before the stop is stored)."""
        while not stopping():
            if not self.drain_once():
                time.sleep(self.options.retry_interval if self.down else self.options.poll_s)
        self.drain_once()

    def drain_own(self) -> None:
        """Store what this proxy's own directory holds (the proxy's last drain, at its stop)."""
        if self.options.own is not None:
            self._drain(self.options.own, owner_gone=False)

    def drain_once(self) -> bool:
        """One pass: the own directory, then (every `retry_interval`) adoptable ones and old spool files.
        Returns whether anything was stored."""
        self.down = False
        progressed = False
        if self.options.own is not None:
            progressed = self._drain(self.options.own, owner_gone=False)[0] > 0
        if time.monotonic() >= self._next_adoption:
            self._next_adoption = time.monotonic() + self.options.retry_interval
            for directory in journal.instance_dirs(self.options.root):
                if directory != self.options.own:
                    progressed |= self._adopt(directory)
            progressed |= self._legacy_spool()
        return progressed

    def _adopt(self, directory: Path) -> bool:
        """Finish the directory of a proxy that is gone and delete it."""
        lock = journal.adopt(directory)
        if lock is None:
            return False
        try:
            stored, complete = self._drain(directory, owner_gone=True)
            if complete:
                journal.remove(directory)
                logger.info("stored %d capture(s) left by a stopped proxy (%s)", stored, directory.name)
            return stored > 0
        finally:
            os.close(lock)

    def _drain(self, directory: Path, owner_gone: bool) -> tuple[int, bool]:
        """Store what the directory holds past its checkpoint. Returns (records stored, whether the
        directory is finished: its proxy is gone and everything in it is stored or set aside)."""
        position, _ = journal.read_checkpoint(directory)
        found = journal.segments(directory)
        stored = 0
        for index, (number, path) in enumerate(found):
            if number < position.segment:  # stored before a crash, deleted only now
                path.unlink(missing_ok=True)
                continue
            sealed = owner_gone or index < len(found) - 1  # the proxy appends only to its newest segment
            start = position.offset if number == position.segment else 0
            frames = journal.read_frames(path, start)
            for begin in range(0, len(frames.records), self.options.batch_size):
                chunk = frames.records[begin : begin + self.options.batch_size]
                if not self.writer.write([record for record, _ in chunk]):
                    self.down = True
                    return stored, False
                stored += len(chunk)
                position = Position(number, chunk[-1][1])
                journal.write_checkpoint(directory, position, self.writer.stats)
            if not sealed:
                return stored, False
            if frames.torn:  # only a power cut or a hand tears a frame: keep the rest aside, with the reason
                with open(path, "rb") as handle:
                    handle.seek(frames.end)
                    self.writer.set_aside_bytes(handle.read(), f"torn journal frame in {path.name} at {frames.end}")
            position = Position(number + 1, 0)
            journal.write_checkpoint(directory, position, self.writer.stats)
            path.unlink(missing_ok=True)
        return stored, owner_gone

    def _legacy_spool(self) -> bool:
        """Spool files of versions before the journal (redacted records, one JSON per line)."""
        spool = self.options.legacy_spool
        if spool is None or not spool.is_dir():
            return False
        failed = spool / "failed"
        if failed.is_dir():  # the old quarantine joins the new one, where retention reaches it
            self.options.quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
            for path in failed.iterdir():
                path.replace(self.options.quarantine / path.name)
        stored = False
        for path in sorted(spool.glob("*.jsonl")):
            try:
                records = [decode_record(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
            except (OSError, ValueError, TypeError) as exc:
                self.writer.set_aside_bytes(path.read_bytes(), f"unreadable spool file: {type(exc).__name__}")
                path.unlink(missing_ok=True)
                continue
            if not self.writer.store_records(records):
                self.down = True
                break
            path.unlink(missing_ok=True)
            stored = True
        return stored


def writer_for(options: DrainOptions, spec: StoreSpec) -> BatchWriter:
    return BatchWriter(spec.open, Quarantine(options.quarantine), options.settings_ttl, options.image_store())


class DrainThread:
    """The writer on a thread of the proxy's own process (a store only this process can open)."""

    def __init__(self, drain: Drain) -> None:
        self.drain = drain
        self._stop = threading.Event()
        self._thread = threading.Thread(target=drain.run, args=(self._stop.is_set,), name="kolm-capture-writer",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)


def spawn(options: DrainOptions, spec: StoreSpec) -> subprocess.Popen[bytes]:
    """Start a writer process: a fresh interpreter (nothing inherited from the proxy's threads). It stays in
    the proxy's session: with autogroup scheduling its lower priority counts only against processes of the
    same session. Its options arrive on stdin, as JSON."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(part for part in (root, os.environ.get("PYTHONPATH", "")) if part)
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, str(os.getpid())],
        env={**os.environ, "PYTHONPATH": path},
        stdin=subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(_options_json(options, spec).encode("utf-8"))
    process.stdin.close()
    return process


def _options_json(options: DrainOptions, spec: StoreSpec) -> str:
    data = {name: str(value) if isinstance(value, Path) else value for name, value in asdict(options).items()}
    return json.dumps({"options": data, "store": asdict(spec)})


def _read_options(text: str) -> tuple[DrainOptions, StoreSpec]:
    data = json.loads(text)
    paths = ("root", "own", "quarantine", "legacy_spool", "images_root")
    options = {name: Path(value) if name in paths and value is not None else value
               for name, value in data["options"].items()}
    return DrainOptions(**options), StoreSpec(**data["store"])


def _defer_to_the_proxy() -> None:
    """Recording is deferred work: where cores are short, the proxy's responses go first. SCHED_IDLE runs the
    writer only on CPU time nothing else wants; nice 10 where it is missing. Without CAP_SYS_NICE (a container
    running as a user, RLIMIT_NICE 0) there is no way back to normal priority, so nothing the writer must do
    in time is left to it: a stop ends it in the kernel (`main`) and the proxy's stop stores the rest."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(10)


def main(parent: int) -> None:
    """The writer process: drain until the proxy is gone, then once more, and exit. SIGINT is ignored (the
    proxy's own shutdown stops it after its last response); SIGTERM keeps its default action and ends it at
    once, frozen or starved as it may be: a handler would wait for CPU time a busy host never gives an idle-class
    process. Ending mid-batch is safe, as a SIGKILL is: the store ignores a repeated request id and the
    checkpoint moves only after a batch is stored, so what it had not stored is stored once by the proxy's
    stop (`Recorder.stop`) or by the next writer."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s kolm capture writer: %(message)s")
    options, spec = _read_options(sys.stdin.read())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # An ignored SIGTERM is inherited across exec: a proxy started where SIGTERM is ignored (a Dagster step maps it
    # to its SIGINT handler, which a pytest-xdist worker ignores) would leave a writer that SIGTERM cannot end.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _defer_to_the_proxy()
    drain = Drain(options, writer_for(options, spec))
    drain.run(lambda: os.getppid() != parent)


if __name__ == "__main__":
    main(int(sys.argv[1]))
