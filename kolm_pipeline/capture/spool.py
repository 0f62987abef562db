"""Local-disk spool for captures the store could not take: one file per batch, written atomically, replayed
oldest first once the store answers again, deleted only after its batch is committed.

Replays are idempotent (the store skips request ids it already has), so a batch whose first write did
commit but was never acknowledged, or a file two replayers picked up at once, still ends as exactly one
row per capture. Records arrive here already redacted and free of provider keys.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from kolm_pipeline.store import NewCapture

_SUFFIX = ".jsonl"


def _encode(record: NewCapture) -> str:
    data = asdict(record)
    data["created_at"] = record.created_at.isoformat() if record.created_at else None
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _decode(line: str) -> NewCapture:
    data: dict[str, Any] = json.loads(line)
    if data.get("created_at"):
        data["created_at"] = datetime.fromisoformat(data["created_at"])
    return NewCapture(**data)


class Spool:
    """A directory of spooled batches (`<ns-time>-<uuid>.jsonl`); names sort in write order."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def write(self, records: list[NewCapture]) -> Path:
        """Write a batch durably: temp file, fsync, rename, directory fsync."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{_SUFFIX}"
        final = self.directory / name
        temp = self.directory / f".{name}.tmp"
        payload = "".join(_encode(record) + "\n" for record in records).encode("utf-8")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        self._sync_directory()
        return final

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(path for path in self.directory.iterdir() if path.name.endswith(_SUFFIX))

    def read(self, path: Path) -> list[NewCapture]:
        return [_decode(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

    def remove(self, path: Path) -> None:
        """Delete a replayed file; another replayer may have deleted it first."""
        path.unlink(missing_ok=True)
        self._sync_directory()

    def pending(self) -> int:
        """How many captures wait on disk."""
        return sum(len(self.read(path)) for path in self.files())
