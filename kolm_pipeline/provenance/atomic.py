"""Atomic file writes: readers see either the old file or the complete new one, never a partial write."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kolm_pipeline.provenance.errors import RegistryError


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry change (rename, link) to disk so it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_file(path: Path, mode: int) -> Iterator[tuple[BinaryIO, Path]]:
    """A temp file next to ``path`` (same filesystem, so a rename is atomic); removed if not consumed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a writable file that replaces ``path`` only once the block completes without error."""
    with _temp_file(path, mode) as (handle, tmp):
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically, replacing any existing file."""
    with atomic_output(path, mode) as handle:
        handle.write(data)


def write_json_atomic(path: Path, value: object, mode: int = 0o644) -> None:
    """Write ``value`` as indented, key-sorted JSON to ``path`` atomically."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode)


def write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically, refusing if ``path`` already exists (even under a race)."""
    with _temp_file(path, mode) as (handle, tmp):
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise RegistryError(f"{path} already exists; refusing to overwrite it") from None
    fsync_dir(path.parent)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (0700), created if absent and tightened if not: kolm's
    state (the tenants' HMAC secrets, signing keys, captured text) must not be readable by other users."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """``path`` as a file only its owner can read or write (0600), created empty if absent: for databases whose
    library would create them world-readable (SQLite gives its journal files the database file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    return path


def remove_stale_temps(directory: Path, max_age_seconds: float = 3600.0) -> int:
    """Delete the dot-named ``*.tmp`` entries a killed writer left in ``directory``; returns how many.

    Only entries older than ``max_age_seconds`` go, so a write in progress elsewhere is never touched.
    """
    if not Path(directory).is_dir():
        return 0
    removed = 0
    now = time.time()
    for entry in os.scandir(directory):
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < max_age_seconds:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
    return removed
