"""The ``.kolm`` archive: one deterministic tar holding manifest, PEFT adapter, evals and receipt chain.

Deterministic (sorted names, zeroed metadata, USTAR headers) so the same inputs give the same CID and
``verify_kolm`` can demand the exact canonical bytes: any flipped byte, header or padding included, shows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kolm_pipeline.provenance.atomic import atomic_output, fsync_dir
from kolm_pipeline.provenance.cid import cid_for_bytes, cid_for_file, cid_for_sha256
from kolm_pipeline.provenance.encoding import pretty_json
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.keys import TenantKey, keyid_for
from kolm_pipeline.provenance.receipts import (
    ChainReport,
    make_receipt,
    read_statement,
    receipt_cid,
    verify_chain,
)

FORMAT = "kolm/1"
FINAL_STAGE = "artifact"
ADAPTER_STAGE = "adapter"
MANIFEST = "manifest.json"
EVALS = "evals.json"
ADAPTER_PREFIX = "adapter/"
RECEIPTS_PREFIX = "receipts/"
REQUIRED_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_STAGE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_NAME_MAX = 100  # USTAR name field; longer names would need a prefix split we do not want
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KolmArtifact:
    """A parsed archive; ``files`` maps every member path to its bytes."""

    manifest: dict[str, Any]
    evals: dict[str, Any]
    receipts: list[bytes]
    files: dict[str, bytes]


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of ``verify_kolm``; ``cid`` is the archive file's CID ("" if it could not be read)."""

    ok: bool
    cid: str
    problems: list[str] = field(default_factory=list)
    chain: ChainReport | None = None
    # The parsed archive (when it could be read), so a caller that goes on to use it reads the file once.
    artifact: KolmArtifact | None = None


class _HashingReader:
    """Reads a file while hashing exactly the bytes handed on, so the CID matches what was archived."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        return data


class _HashingSink:
    """A write-only file object that keeps only a sha256, to compare a rebuild without storing it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self._offset = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset


def _check_member_name(name: str) -> None:
    if len(name) > _NAME_MAX or not _MEMBER_RE.fullmatch(name) or ".." in name.split("/"):
        raise RegistryError(f"unsupported archive member name {name!r}")


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    _check_member_name(name)
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _open_writer(handle: Any) -> tarfile.TarFile:
    return tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _adapter_files(adapter_dir: Path) -> list[tuple[str, Path]]:
    """(archive path, source path) for every regular file under the adapter dir, sorted by archive path."""
    if not adapter_dir.is_dir():
        raise RegistryError(f"adapter directory {adapter_dir} does not exist")
    for required in REQUIRED_ADAPTER_FILES:
        if not (adapter_dir / required).is_file():
            raise RegistryError(f"adapter directory {adapter_dir} lacks {required}")
    found = []
    for path in adapter_dir.rglob("*"):
        if path.is_symlink():
            raise RegistryError(f"adapter file {path} is a symlink; archives hold regular files only")
        if path.is_file():
            name = ADAPTER_PREFIX + path.relative_to(adapter_dir).as_posix()
            _check_member_name(name)
            found.append((name, path))
    return sorted(found)


def adapter_file_cids(adapter_dir: Path) -> dict[str, str]:
    """CID of every file an artifact built from ``adapter_dir`` serves, by its path in the adapter directory:
    what the adapter stage's receipt names, so that the files are bound to the receipt signed when they were
    trained, not only to the manifest signed when they were packaged."""
    return {name.removeprefix(ADAPTER_PREFIX): cid_for_file(path) for name, path in _adapter_files(adapter_dir)}


def _receipt_name(index: int, count: int, stage: str) -> str:
    width = max(2, len(str(count)))
    return f"{RECEIPTS_PREFIX}{index:0{width}d}-{stage}.dsse.json"


def _predicate(envelope: bytes) -> dict[str, Any]:
    predicate = read_statement(envelope).get("predicate")
    if not isinstance(predicate, dict):
        raise RegistryError("receipt statement has no predicate object")
    return predicate


def _receipt_stage(envelope: bytes) -> str:
    stage = _predicate(envelope).get("stage")
    if not isinstance(stage, str) or not _STAGE_RE.fullmatch(stage):
        raise RegistryError(f"receipt stage {stage!r} is not a valid stage name")
    return stage


def _check_links(receipts: list[bytes]) -> None:
    """Refuse to archive a chain whose receipts do not name each other; it could never verify."""
    previous: str | None = None
    for index, envelope in enumerate(receipts, start=1):
        named = _predicate(envelope).get("previous_receipt")
        if named != previous:
            raise RegistryError(f"receipt {index} names previous {named!r}, expected {previous!r}")
        previous = receipt_cid(envelope)


def build_kolm(
    output: Path,
    *,
    manifest: dict[str, Any],
    adapter_dir: Path,
    evals: dict[str, Any],
    receipts: list[bytes],
    signer: tuple[Ed25519PrivateKey, str],
) -> str:
    """Write a signed ``.kolm`` to ``output`` atomically and return the archive's CID.

    The manifest gains ``format`` and ``files`` (archive path → CID); a final ``artifact`` receipt signs
    the manifest's CID after the given chain, so the chain vouches for every byte of the archive.
    """
    if not isinstance(manifest, dict) or not isinstance(evals, dict):
        raise RegistryError("manifest and evals must be dicts")
    private_key, keyid = signer
    if keyid_for(private_key.public_key()) != keyid:
        raise RegistryError(f"signer keyid {keyid!r} does not belong to the signing key")
    receipts = list(receipts)
    _check_links(receipts)
    adapter_files = _adapter_files(adapter_dir)
    evals_bytes = pretty_json(evals)
    output = Path(output)

    with atomic_output(output) as handle:
        tar = _open_writer(handle)
        files: dict[str, str] = {}
        for name, path in adapter_files:
            with open(path, "rb") as source:
                reader = _HashingReader(source)
                tar.addfile(_tar_info(name, os.fstat(source.fileno()).st_size), reader)
            files[name] = cid_for_sha256(reader.digest.digest())
        _add_bytes(tar, EVALS, evals_bytes)
        files[EVALS] = cid_for_bytes(evals_bytes)

        manifest_bytes = pretty_json({**manifest, "format": FORMAT, "files": files})
        _add_bytes(tar, MANIFEST, manifest_bytes)

        final = make_receipt(
            stage=FINAL_STAGE,
            subject_name=MANIFEST,
            subject_cid=cid_for_bytes(manifest_bytes),
            predicate={"format": FORMAT},
            previous_cid=receipt_cid(receipts[-1]) if receipts else None,
            private_key=private_key,
            keyid=keyid,
        )
        chain = [*receipts, final]
        for index, envelope in enumerate(chain, start=1):
            _add_bytes(tar, _receipt_name(index, len(chain), _receipt_stage(envelope)), envelope)
        tar.close()
    return cid_for_file(output)


def _read_members(path: Path) -> dict[str, bytes]:
    """Every member's bytes; raises RegistryError on anything but a complete plain-file tar."""
    members: dict[str, bytes] = {}
    try:
        with open(path, "rb") as handle:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        raise RegistryError(f"{path}: member {info.name!r} is not a regular file")
                    _check_member_name(info.name)
                    if info.name in members:
                        raise RegistryError(f"{path}: member {info.name!r} appears twice")
                    extracted = tar.extractfile(info)
                    if extracted is None:
                        raise RegistryError(f"{path}: member {info.name!r} has no data")
                    members[info.name] = extracted.read()
                end = tar.offset
            handle.seek(end)
            tail = handle.read()
            size = handle.tell()
    except (tarfile.TarError, EOFError) as exc:
        raise RegistryError(f"{path}: not a readable .kolm archive ({exc})") from exc
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read ({exc})") from exc
    # tarfile stops quietly at a damaged header or a missing end; a complete archive ends in zero blocks.
    if size % tarfile.BLOCKSIZE or len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise RegistryError(f"{path}: truncated or damaged .kolm archive (no clean end-of-archive marker)")
    return members


def _load_json(path: Path, name: str, data: bytes | None) -> dict[str, Any]:
    if data is None:
        raise RegistryError(f"{path}: archive has no {name}")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: {name} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise RegistryError(f"{path}: {name} is not a JSON object")
    return value


def read_kolm(path: Path) -> KolmArtifact:
    """Parse a ``.kolm`` without verifying it; raises RegistryError naming the file if it is unreadable."""
    path = Path(path)
    files = _read_members(path)
    receipt_names = sorted(name for name in files if name.startswith(RECEIPTS_PREFIX))
    return KolmArtifact(
        manifest=_load_json(path, MANIFEST, files.get(MANIFEST)),
        evals=_load_json(path, EVALS, files.get(EVALS)),
        receipts=[files[name] for name in receipt_names],
        files=files,
    )


def _manifest_files(manifest: dict[str, Any]) -> dict[str, str]:
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in files.items()
    ):
        raise RegistryError("manifest has no files map of archive path to CID")
    return files


def extract_adapter(path: Path, dest: Path, verified: VerifyReport | None = None) -> Path:
    """Write the archive's PEFT adapter files into ``dest`` (which must not exist) and return ``dest``.

    Files are checked against the manifest CIDs first (unless ``verified``, a passing ``verify_kolm``
    report of this file, already did: then the archive is neither read nor hashed again), and land in a
    temp dir renamed into place, so ``dest`` either holds the whole adapter or does not exist.
    """
    path, dest = Path(path), Path(dest)
    trusted = verified is not None and verified.ok and verified.artifact is not None
    artifact = verified.artifact if trusted else read_kolm(path)
    expected = _manifest_files(artifact.manifest)
    adapter = {name: data for name, data in artifact.files.items() if name.startswith(ADAPTER_PREFIX)}
    for required in REQUIRED_ADAPTER_FILES:
        if ADAPTER_PREFIX + required not in adapter:
            raise RegistryError(f"{path}: archive lacks {ADAPTER_PREFIX + required}")
    for name, data in adapter.items():
        if not trusted and expected.get(name) != cid_for_bytes(data):
            raise RegistryError(f"{path}: {name} does not match the CID in the manifest")
    if dest.exists() or dest.is_symlink():
        raise RegistryError(f"{dest} already exists; extract into a fresh directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for name, data in adapter.items():
            target = tmp / name[len(ADAPTER_PREFIX) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            target.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            raise RegistryError(f"cannot move extracted adapter into {dest}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(dest.parent)
    return dest


def _canonical_sha256(members: Iterable[tuple[str, bytes]]) -> bytes:
    """sha256 of the archive ``build_kolm`` would write for these members."""
    sink = _HashingSink()
    tar = _open_writer(sink)
    for name, data in sorted(members):
        _add_bytes(tar, name, data)
    tar.close()
    return sink.digest.digest()


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _check_contents(artifact: KolmArtifact) -> list[str]:
    """Problems with the member set and CIDs, short of the receipt chain."""
    problems: list[str] = []
    manifest = artifact.manifest
    if manifest.get("format") != FORMAT:
        problems.append(f"manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    try:
        expected = _manifest_files(manifest)
    except RegistryError as exc:
        return [*problems, str(exc)]
    for name, cid in sorted(expected.items()):
        data = artifact.files.get(name)
        if data is None:
            problems.append(f"{name}: listed in the manifest but missing from the archive")
        elif cid_for_bytes(data) != cid:
            problems.append(f"{name}: content does not match its CID in the manifest")
    for required in (EVALS, *(ADAPTER_PREFIX + name for name in REQUIRED_ADAPTER_FILES)):
        if required not in expected:
            problems.append(f"{required}: not listed in the manifest")
    receipt_names = sorted(name for name in artifact.files if name.startswith(RECEIPTS_PREFIX))
    for name in sorted(artifact.files):
        if name != MANIFEST and name not in expected and name not in receipt_names:
            problems.append(f"{name}: in the archive but not listed in the manifest")
    for index, (name, envelope) in enumerate(zip(receipt_names, artifact.receipts, strict=True), start=1):
        try:
            wanted = _receipt_name(index, len(receipt_names), _receipt_stage(envelope))
        except RegistryError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if name != wanted:
            problems.append(f"{name}: receipt file name should be {wanted}")
    return problems


def _check_final_receipt(artifact: KolmArtifact) -> list[str]:
    """The chain must end in an ``artifact`` receipt whose subject is this very manifest."""
    if not artifact.receipts:
        return ["archive holds no receipts"]
    try:
        statement = read_statement(artifact.receipts[-1])
        stage = statement["predicate"]["stage"]
        subject = statement["subject"][0]
        digest, cid = subject["digest"]["sha256"], subject["annotations"]["cid"]
    except (RegistryError, KeyError, IndexError, TypeError) as exc:
        return [f"final receipt is unreadable ({exc})"]
    problems = []
    if stage != FINAL_STAGE:
        problems.append(f"final receipt stage is {stage!r}, expected {FINAL_STAGE!r}")
    manifest_bytes = artifact.files[MANIFEST]
    if digest != hashlib.sha256(manifest_bytes).hexdigest() or cid != cid_for_bytes(manifest_bytes):
        problems.append("final receipt does not name this manifest.json")
    return problems


def _check_adapter_receipt(artifact: KolmArtifact) -> list[str]:
    """The adapter receipt must name exactly the adapter files the manifest lists, with the same CIDs."""
    served = {name.removeprefix(ADAPTER_PREFIX): cid for name, cid in _manifest_files(artifact.manifest).items()
              if name.startswith(ADAPTER_PREFIX)}
    adapter_receipts = [envelope for envelope in artifact.receipts if _receipt_stage(envelope) == ADAPTER_STAGE]
    if len(adapter_receipts) != 1:
        return [f"the chain holds {len(adapter_receipts)} adapter receipts, expected 1"]
    named = _predicate(adapter_receipts[0]).get("files")
    if not isinstance(named, dict):
        return ["the adapter receipt names no adapter files, so they are not bound to the training that made them"]
    problems = [f"adapter/{name}: served but not named by the adapter receipt"
                for name in sorted(set(served) - set(named))]
    problems += [f"adapter/{name}: named by the adapter receipt but not in the archive"
                 for name in sorted(set(named) - set(served))]
    problems += [f"adapter/{name}: content differs from the file the adapter receipt names"
                 for name in sorted(set(served) & set(named)) if served[name] != named[name]]
    return problems


def verify_kolm(path: Path, public_keys: Mapping[str, TenantKey]) -> VerifyReport:
    """Check a ``.kolm`` offline: canonical bytes, file CIDs, receipt chain (every receipt signed by a key of the
    manifest's tenant), manifest signature, and the adapter files against the adapter receipt.

    Never raises for a damaged archive; every finding lands in ``problems``.
    """
    path = Path(path)
    try:
        file_sha256 = _file_sha256(path)
    except OSError as exc:
        return VerifyReport(ok=False, cid="", problems=[f"{path}: cannot read ({exc})"])
    cid = cid_for_sha256(file_sha256)
    try:
        artifact = read_kolm(path)
    except RegistryError as exc:
        return VerifyReport(ok=False, cid=cid, problems=[str(exc)])

    problems: list[str] = []
    if _canonical_sha256(artifact.files.items()) != file_sha256:
        problems.append("archive bytes differ from the canonical encoding of its members")
    problems.extend(_check_contents(artifact))
    tenant = artifact.manifest.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        problems.append("manifest names no tenant, so no key can vouch for it")
        tenant = ""
    chain = verify_chain(artifact.receipts, public_keys, tenant=tenant)
    if not chain.ok:
        problems.append(f"receipt chain broken: {chain.reason}")
    problems.extend(_check_final_receipt(artifact))
    if chain.ok:
        try:
            problems.extend(_check_adapter_receipt(artifact))
        except RegistryError as exc:
            problems.append(str(exc))
    return VerifyReport(ok=not problems, cid=cid, problems=problems, chain=chain, artifact=artifact)
