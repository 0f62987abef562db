"""Friendly names for the versions of a task, wherever a CID is taken (``kolm registry diff``, ``registry log
--cid``, ``swap --cid``, ``verify``): one resolver, so every verb reads a name the same way.

- ``current``: the artifact the task's pointer names now;
- ``previous``: the version that served just before the current one took over (the ``from`` of the newest
  registry row that put the current one into service), the bare base when the current one replaced nothing;
- ``base``: the bare base model (no artifact);
- ``candidate``: the last evaluated candidate of the task's namespace, not packaged yet (no CID);
- a CID, or a unique prefix of one of at least ``MIN_PREFIX`` characters, among the CIDs this home knows
  (published artifacts and registry rows); since every CID starts with ``bafkrei``, the prefix may leave that
  part out. An ambiguous prefix is refused, listing the CIDs it matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.provenance.cid import sha256_of_cid
from kolm_pipeline.provenance.errors import DeployRefused, RegistryError
from kolm_pipeline.registry.swap import pointer_target, validate_task
from kolm_pipeline.settings import Settings
from kolm_pipeline.store.tables import SERVING_DECISIONS

CURRENT, PREVIOUS, BASE, CANDIDATE = "current", "previous", "base", "candidate"
NAMES = (CURRENT, PREVIOUS, BASE, CANDIDATE)
MIN_PREFIX = 6
CID_HEAD = "bafkrei"  # every CID kolm makes: CIDv1, raw codec, sha2-256, base32
KIND_ARTIFACT, KIND_BASE, KIND_CANDIDATE = "artifact", "base", "candidate"
_BASE32 = re.compile(r"[a-z2-7]+")
_CID_LENGTH = 59
REF_HELP = ("`current`, `previous`, `base`, `candidate`, a CID or a unique CID prefix (at least "
            f"{MIN_PREFIX} characters)")


class RefError(DeployRefused):
    """A version reference names nothing, or more than one thing; the message says which and lists choices."""


@dataclass(frozen=True)
class VersionRef:
    """What a reference resolved to: an artifact (``cid``, and its ``task`` when known), the bare base, or the
    task's unpackaged candidate. ``ref`` is what the user wrote."""

    ref: str
    kind: str
    cid: str | None = None
    task: str | None = None

    def describe(self) -> str:
        """How messages name it: ``current (bafkrei…)``, ``the bare base``, ``candidate (not packaged yet)``."""
        if self.kind == KIND_BASE:
            return "the bare base" if self.ref == BASE else f"{self.ref} (the bare base)"
        if self.kind == KIND_CANDIDATE:
            return "candidate (the last evaluated, not packaged yet)"
        return self.cid if self.ref == self.cid else f"{self.ref} ({self.cid})"


def _artifact_cid(path: Path) -> str:
    return Path(path).name.removesuffix(".kolm")


def _is_cid(text: str) -> bool:
    try:
        sha256_of_cid(text)
    except RegistryError:
        return False
    return True


def current_cid(settings: Settings, task: str) -> str | None:
    """The CID the task's pointer names, None when nothing is deployed."""
    pointer = pointer_target(settings.adapters_dir, validate_task(task))
    return _artifact_cid(pointer) if pointer is not None else None


def previous_cid(store, task: str, current: str) -> str | None:
    """The version ``current`` replaced: the ``from`` of the newest row that put it into service (None: it
    replaced the bare base). RefError when no row put it into service (the pointer was set by hand)."""
    row = next((row for row in store.registry_rows(task)
                if row.decision in SERVING_DECISIONS and row.to_cid == current), None)
    if row is None:
        raise RefError(f"{task}: no registry row put the current version {current} into service, so there is "
                       "no `previous`; name a CID")
    return row.from_cid


def known_cids(settings: Settings, store, task: str | None = None) -> dict[str, str]:
    """CID → task of every artifact this home knows: published ones (``artifacts/<task>/<cid>.kolm``) and those
    the registry names (of ``task`` only, when given)."""
    found: dict[str, str] = {}
    for row in store.registry_rows(task):
        named = row.details.get("artifact") if isinstance(row.details, dict) else None
        for cid in (row.from_cid, row.to_cid, named):
            if isinstance(cid, str) and _is_cid(cid):
                found.setdefault(cid, row.task)
    pattern = f"{task}/*.kolm" if task is not None else "*/*.kolm"
    if settings.artifacts_dir.is_dir():
        for path in settings.artifacts_dir.glob(pattern):
            cid = _artifact_cid(path)
            if _is_cid(cid):
                found.setdefault(cid, path.parent.name)
    return found


def _matching(ref: str, cids: dict[str, str]) -> list[str]:
    text = ref.lower()
    return sorted(cid for cid in cids if cid.startswith(text) or cid.removeprefix(CID_HEAD).startswith(text))


def resolve_ref(settings: Settings, store, ref: str, task: str | None = None,
                allow: tuple[str, ...] = (KIND_ARTIFACT, KIND_BASE, KIND_CANDIDATE)) -> VersionRef:
    """Read ``ref`` (see the module docstring) as a version of ``task`` (any task when None: names that depend
    on a task's pointer then need one). ``allow`` says which kinds the caller can use; another kind is a
    RefError saying what the name means and what to write instead."""
    if task is not None:
        validate_task(task)
    ref = ref.strip()
    resolved = _resolve(settings, store, ref, task)
    if resolved.kind not in allow:
        if resolved.kind == KIND_BASE:
            raise RefError(f"{resolved.describe()} is no artifact; name a deployed version")
        raise RefError(f"`{CANDIDATE}` is the last evaluated candidate, which has no CID until a deployment "
                       f"packages it; `kolm registry diff --task {task or 'TASK'} candidate` compares it")
    return resolved


def _need_task(ref: str, task: str | None) -> str:
    if task is None:
        raise RefError(f"`{ref}` names a version of one task: give --task")
    return task


def _resolve(settings: Settings, store, ref: str, task: str | None) -> VersionRef:
    if ref == BASE:
        return VersionRef(ref, KIND_BASE, task=task)
    if ref == CANDIDATE:
        return VersionRef(ref, KIND_CANDIDATE, task=_need_task(ref, task))
    if ref in (CURRENT, PREVIOUS):
        task = _need_task(ref, task)
        current = current_cid(settings, task)
        if current is None:
            raise RefError(f"{task}: nothing is deployed, so there is no `{ref}`; name a CID, `base` or `candidate`")
        if ref == CURRENT:
            return VersionRef(ref, KIND_ARTIFACT, current, task)
        previous = previous_cid(store, task, current)
        if previous is None:
            return VersionRef(ref, KIND_BASE, task=task)
        return VersionRef(ref, KIND_ARTIFACT, previous, task)
    if _is_cid(ref):
        return VersionRef(ref, KIND_ARTIFACT, ref, task or known_cids(settings, store).get(ref))
    where = f"of {task}" if task else "in this kolm home"
    if not _BASE32.fullmatch(ref) or len(ref) >= _CID_LENGTH:
        raise RefError(f"malformed CID {ref!r}: a CID is 'b' followed by 58 base32 characters (a-z, 2-7); write "
                       f"{REF_HELP}")
    if len(ref) < MIN_PREFIX:
        raise RefError(f"{ref!r} is not a version {where}: write {REF_HELP}")
    cids = known_cids(settings, store, task)
    matches = _matching(ref, cids)
    if not matches:
        raise RefError(f"no version {where} has a CID starting with {ref!r}: write {REF_HELP}"
                       + (f" ({len(cids)} known; `kolm registry log` lists them)" if cids else ""))
    if len(matches) > 1:
        listed = "\n  ".join(f"{cid}  ({cids[cid]})" for cid in matches[:20])
        more = f"\n  … and {len(matches) - 20} more" if len(matches) > 20 else ""
        raise RefError(f"{ref!r} matches {len(matches)} CIDs {where}; write more of it:\n  {listed}{more}")
    return VersionRef(ref, KIND_ARTIFACT, matches[0], cids[matches[0]])
