"""The capture journal: an append-only log on local disk in which the proxy puts every finished call before
the client's response completes, and from which the writer (`drain.py`) stores them.

Layout under `KOLM_HOME/capture-log/`: one directory per proxy process (`<time_ns>-<pid>/`) holding

- `lock`: the proxy holds an exclusive `flock` on it for its lifetime. The kernel drops the lock when the
  process dies, however it dies, so a directory whose lock can be taken belongs to a proxy that is gone
  and is adopted by whichever writer takes it first;
- `<n>.log` segments, `n` counting up; only the highest is appended to. A record is one frame: its
  length and CRC-32 (`!II`) and a pickle of the call's plain fields (`Pending`). One `write` per record on
  an `O_APPEND` descriptor: once it returns, the record is in the page cache and survives the process (not
  the machine: a power cut may lose the last seconds, see docs/security.md);
- `checkpoint.json`: how far the writer has stored (`segment`, `offset`), rewritten after each store
  commit. A crash between a commit and its checkpoint replays the records since the last checkpoint; the
  store skips request ids it already has, so each capture is stored exactly once.

Records hold the request and reply bytes as they went over the wire, with the provider key already
removed (`forward.scrub_secret`); PII is redacted by the writer before anything reaches the store. A
directory is deleted once everything in it is stored and its proxy has stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FRAME = struct.Struct("!II")  # payload length, CRC-32 of the payload
SEGMENT_BYTES = 16 * 1024 * 1024  # a new segment past this size, so stored ones can be deleted
LOCK_NAME = "lock"
CHECKPOINT_NAME = "checkpoint.json"
_SUFFIX = ".log"


def _segment_name(number: int) -> str:
    return f"{number:012d}{_SUFFIX}"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The directory's segments, oldest first."""
    found = []
    with suppress(FileNotFoundError):
        for path in directory.iterdir():
            if path.name.endswith(_SUFFIX) and path.name[: -len(_SUFFIX)].isdigit():
                found.append((int(path.name[: -len(_SUFFIX)]), path))
    return sorted(found)


@dataclass(frozen=True, order=True)
class Position:
    """A place in a journal directory: a segment number and a byte offset in it."""

    segment: int = 0
    offset: int = 0


class Journal:
    """The proxy's side: its own directory, appended to one record at a time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.directory: Path | None = None
        self._lock_fd = -1
        self._fd = -1
        self._segment = 0
        self._size = 0

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory = self.root / f"{time.time_ns():020d}-{os.getpid()}"
        directory.mkdir(mode=0o700)
        self._lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.directory = directory
        self._open_segment(1)

    def _open_segment(self, number: int) -> None:
        assert self.directory is not None
        if self._fd >= 0:
            os.close(self._fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(self.directory / _segment_name(number), flags, 0o600)
        self._segment, self._size = number, 0

    @property
    def position(self) -> Position:
        """Where the next record goes: the writer has stored everything before it once it reaches it.
        Nothing appended yet: the start, which any checkpoint has reached."""
        return Position(self._segment, self._size) if self._size else Position()

    def append(self, record: tuple[Any, ...]) -> None:
        """Put one record in the journal: it is in the page cache when this returns. Raises `OSError` (disk
        full, say) when it is not."""
        payload = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        data = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        if self._size and self._size + len(data) > SEGMENT_BYTES:
            self._open_segment(self._segment + 1)
        written = os.write(self._fd, data)
        self._size += written
        if written != len(data):  # a short write (disk full): the frame is torn, so the next goes elsewhere
            self._open_segment(self._segment + 1)
            raise OSError("short write to the capture journal")

    def close(self) -> None:
        """Stop appending and release the directory: a writer may now finish it and delete it."""
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1


def read_checkpoint(directory: Path) -> tuple[Position, dict[str, int]]:
    """How far the directory's records are stored, and the writer's counters for it."""
    try:
        data = json.loads((directory / CHECKPOINT_NAME).read_text("utf-8"))
        return Position(int(data["segment"]), int(data["offset"])), dict(data.get("stats", {}))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return Position(), {}


def write_checkpoint(directory: Path, position: Position, stats: dict[str, int]) -> None:
    """Replace the checkpoint at once (rename). No fsync: it guards against process death, and a lost
    checkpoint only replays records the store then skips."""
    temp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    temp.write_text(json.dumps({"segment": position.segment, "offset": position.offset, "stats": stats}), "utf-8")
    os.replace(temp, directory / CHECKPOINT_NAME)


@dataclass
class Frames:
    """Records read from one segment, each with the offset just past it; `end` is where reading stopped,
    `torn` when the frame there fails its CRC."""

    records: list[tuple[tuple[Any, ...], int]]
    end: int
    torn: bool = False


def read_frames(path: Path, start: int) -> Frames:
    """The complete frames from `start`. A frame still being written (its length runs past the end of the
    file) ends the read; the next read picks it up."""
    records: list[tuple[tuple[Any, ...], int]] = []
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read()
    offset = 0
    while len(data) - offset >= FRAME.size:
        length, crc = FRAME.unpack_from(data, offset)
        end = offset + FRAME.size + length
        if end > len(data):
            break
        payload = data[offset + FRAME.size : end]
        if zlib.crc32(payload) != crc:
            return Frames(records, start + offset, torn=True)
        records.append((pickle.loads(payload), start + end))
        offset = end
    return Frames(records, start + offset)


def adopt(directory: Path) -> int | None:
    """Take the lock of a directory whose proxy is gone; None when its proxy (or another writer) holds it."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def instance_dirs(root: Path) -> Iterator[Path]:
    """Every proxy's journal directory under `root`, oldest first."""
    with suppress(FileNotFoundError):
        yield from sorted(path for path in root.iterdir() if (path / LOCK_NAME).exists())


def remove(directory: Path) -> None:
    """Delete a finished directory (its segments, checkpoint and lock)."""
    with suppress(FileNotFoundError):
        for path in directory.iterdir():
            path.unlink(missing_ok=True)
        directory.rmdir()
