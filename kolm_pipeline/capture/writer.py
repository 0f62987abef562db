"""The capture writer process: reads batches of finished calls from the proxy over a socket pair, builds,
scrubs, redacts and writes them (or spools them while the store is down), replays the spool, and
acknowledges every batch once it is written or spooled.

Frames both ways are a 4-byte length and a pickle. Proxy → writer: first its `WriterOptions`, then
`("batch", seq, [Pending's fields as a plain tuple, …])` or `("stop", 0, None)`. Writer → proxy: `([seq, …], stats)`.

The writer ignores SIGINT (the proxy's own shutdown flushes and then stops it) and treats SIGTERM, a
`stop` frame or the end of the socket (the proxy is gone) alike: it writes everything it has received and
exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kolm_pipeline.capture.batch import FRAME_HEADER, BatchWriter, WriterOptions, frame
from kolm_pipeline.capture.spool import Spool

_POLL_S = 0.2
_READ_SIZE = 1 << 20
_NICENESS = 10


def spawn(sock: socket.socket) -> subprocess.Popen[bytes]:
    """Start a writer on `sock` (its end of the pair): a fresh interpreter (nothing inherited from the
    proxy's threads, no re-import of the proxy's main script). It stays in the proxy's session: with
    autogroup scheduling its lower priority counts only against processes of the same session, so a new
    session would give it a whole share of the CPU of its own. Its first frame must be its `WriterOptions`."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(part for part in (root, os.environ.get("PYTHONPATH", "")) if part)
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, str(sock.fileno())],
        pass_fds=[sock.fileno()],
        env={**os.environ, "PYTHONPATH": path},
        stdin=subprocess.DEVNULL,
    )
    return process


class _Inbox:
    """Length-prefixed frames from the proxy, read into one reused buffer (a fresh 1 MiB `recv` buffer per
    read cost the writer a page fault every 20-odd captures)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._chunk = bytearray(_READ_SIZE)
        self._view = memoryview(self._chunk)
        self.closed = False

    def receive(self, timeout: float) -> list[Any]:
        """Frames that arrive within `timeout` (waiting only for the first), plus any already behind it."""
        self._sock.settimeout(timeout if timeout > 0 else 0.0)
        try:
            size = self._sock.recv_into(self._chunk)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError:
            size = 0
        self._sock.setblocking(False)
        while size:
            self._buffer += self._view[:size]
            try:
                size = self._sock.recv_into(self._chunk)
            except BlockingIOError:
                break
            except OSError:
                size = 0
        if not size:  # the loop ends on an empty read only at the end of the stream
            self.closed = True
        return self._frames()

    def _frames(self) -> list[Any]:
        frames = []
        view = memoryview(self._buffer)
        offset = 0
        while len(view) - offset >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(view, offset)
            end = offset + FRAME_HEADER.size + length
            if end > len(view):
                break
            frames.append(pickle.loads(view[offset + FRAME_HEADER.size : end]))
            offset = end
        view.release()
        del self._buffer[:offset]
        return frames


def _defer_to_the_proxy() -> None:
    """Recording is deferred work: where cores are short, the proxy's responses go first.

    SCHED_IDLE runs the writer only on CPU time nothing else wants, and a waking proxy preempts it at once;
    nice 10 (where SCHED_IDLE is missing) still lets a running batch delay a response by a few ms, which
    bench/proxy.py shows at concurrency 1. A writer that falls behind does not lose anything: its batches stay
    with the proxy unacknowledged, and past the queue limit the proxy writes them itself."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(_NICENESS)


def main(sock: socket.socket) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s kolm capture writer: %(message)s")
    inbox = _Inbox(sock)
    frames: list[Any] = []
    while not frames and not inbox.closed:
        frames = inbox.receive(_POLL_S)
    if not frames:
        return
    options: WriterOptions = frames.pop(0)
    terminated = False

    def on_term(_signum: int, _frame: Any) -> None:
        nonlocal terminated
        terminated = True

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    _defer_to_the_proxy()
    spool = Spool(options.spool_dir) if options.spool_dir is not None else None
    writer = BatchWriter(options.store.open, spool, options.retry_interval, options.settings_ttl)
    next_replay = time.monotonic()
    stopping = False
    while True:
        # The proxy batches already (one frame per `linger`): a frame is written as soon as it arrives.
        wait = 0.0 if terminated or frames else min(_POLL_S, max(0.0, next_replay - time.monotonic()))
        frames += inbox.receive(wait)
        batch: list[tuple[Any, ...]] = []  # `Pending`'s fields, as the proxy sent them
        seqs: list[int] = []
        for kind, seq, items in frames:
            if kind == "batch":
                batch.extend(items)
                seqs.append(seq)
            elif kind == "stop":
                stopping = True
        frames = []
        if batch:
            for start in range(0, len(batch), options.batch_size):
                writer.write(batch[start : start + options.batch_size])
            if not _acknowledge(sock, seqs, writer.stats):
                break
        if stopping or terminated or inbox.closed:
            break
        if time.monotonic() >= next_replay:
            next_replay = time.monotonic() + options.retry_interval
            replayed = spool is not None and spool.files() and writer.replay()
            if replayed and not _acknowledge(sock, [], writer.stats):
                break
    sock.close()


def _acknowledge(sock: socket.socket, seqs: list[int], stats: dict[str, int]) -> bool:
    """False when the proxy is gone."""
    try:
        sock.settimeout(None)
        sock.sendall(frame((seqs, dict(stats))))
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main(socket.socket(fileno=int(sys.argv[1])))
