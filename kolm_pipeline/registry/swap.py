"""Per-task pointers: ``adapters/<task>`` is a symlink to a versioned artifact, flipped atomically.

Readers resolving the pointer see the old or the new artifact, never a missing one, and rollback is
pointing back at a file that is still there, because published artifacts are content-addressed and kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from kolm_pipeline.provenance.atomic import atomic_output, fsync_dir
from kolm_pipeline.provenance.cid import cid_for_file, cid_for_sha256
from kolm_pipeline.provenance.errors import RegistryError

_TASK_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


def validate_task(task: str) -> str:
    """Return ``task`` if it is a safe single path component; task names become file and link names."""
    if not isinstance(task, str) or not _TASK_RE.fullmatch(task):
        raise RegistryError(f"invalid task name {task!r}: must match {_TASK_RE.pattern}")
    return task


class _HashingWriter:
    """Passes writes through to a file while hashing them, so a copy is named by what was written."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._handle.write(data)


def publish_artifact(artifacts_dir: Path, task: str, source: Path) -> Path:
    """Copy ``source`` to ``artifacts_dir/<task>/<cid>.kolm`` atomically; publishing twice is a no-op."""
    validate_task(task)
    source, task_dir = Path(source), Path(artifacts_dir) / task
    if not source.is_file():
        raise RegistryError(f"artifact {source} does not exist")
    cid = cid_for_file(source)
    dest = task_dir / f"{cid}.kolm"
    if dest.is_file() and not dest.is_symlink() and cid_for_file(dest) == cid:
        return dest
    with atomic_output(dest) as handle, open(source, "rb") as src:
        writer = _HashingWriter(handle)
        shutil.copyfileobj(src, writer)
        if cid_for_sha256(writer.digest.digest()) != cid:
            raise RegistryError(f"artifact {source} changed while it was being published")
    return dest


def _pointer_path(adapters_dir: Path, task: str) -> Path:
    return Path(adapters_dir) / validate_task(task)


def _link_target(pointer: Path) -> Path | None:
    """Absolute path a pointer names (existing or not), or None when there is no pointer."""
    if not pointer.is_symlink():
        if pointer.exists():
            raise RegistryError(f"{pointer} exists but is not a pointer symlink")
        return None
    return Path(os.path.normpath(pointer.parent.absolute() / os.readlink(pointer)))


def pointer_target(adapters_dir: Path, task: str) -> Path | None:
    """What a task's pointer names, even if that file is gone (for repairs such as a rollback)."""
    return _link_target(_pointer_path(adapters_dir, task))


def read_pointer(adapters_dir: Path, task: str) -> Path | None:
    """The artifact a task's pointer names, or None if the task has none; a dangling pointer is an error."""
    pointer = _pointer_path(adapters_dir, task)
    target = _link_target(pointer)
    if target is not None and not target.is_file():
        raise RegistryError(f"pointer {pointer} names {target}, which is not an existing file")
    return target


def swap_pointer(adapters_dir: Path, task: str, target: Path) -> Path | None:
    """Point ``adapters_dir/<task>`` at ``target`` in one atomic rename; return the previous target.

    The link is stored relative to the pointer's directory, so moving the whole home keeps it valid.
    """
    adapters_dir = Path(adapters_dir)
    pointer = _pointer_path(adapters_dir, task)
    target = Path(os.path.normpath(Path(target).absolute()))
    if not target.is_file():
        raise RegistryError(f"cannot point {task!r} at {target}: not an existing file")
    adapters_dir.mkdir(parents=True, exist_ok=True)
    previous = _link_target(pointer)
    link_text = os.path.relpath(target, adapters_dir.absolute())
    tmp = adapters_dir / f".{task}.{uuid.uuid4().hex}.tmp"
    os.symlink(link_text, tmp)
    try:
        os.replace(tmp, pointer)
    except OSError as exc:
        raise RegistryError(f"cannot replace pointer {pointer}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(adapters_dir)
    return previous
