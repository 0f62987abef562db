"""Content identifiers: CIDv1, raw codec, sha256 multihash, multibase base32 (``bafkrei…``).

Hand-rolled because the format is four fixed prefix bytes and a base32 alphabet; no dependency is needed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from kolm_pipeline.provenance.errors import RegistryError

# CID version 1, multicodec raw (0x55), multihash sha2-256 (0x12) with a 32-byte digest (0x20).
_PREFIX = bytes([0x01, 0x55, 0x12, 0x20])
_MULTIBASE_BASE32 = "b"
_CID_RE = re.compile(r"^b[a-z2-7]{58}$")
_CHUNK = 1 << 20


def cid_for_sha256(digest: bytes) -> str:
    """The CID of content whose sha256 digest is already known (lets callers hash while streaming)."""
    if len(digest) != 32:
        raise RegistryError(f"a sha256 digest is 32 bytes, got {len(digest)}")
    encoded = base64.b32encode(_PREFIX + digest).decode("ascii").rstrip("=").lower()
    return _MULTIBASE_BASE32 + encoded


def cid_for_bytes(data: bytes) -> str:
    """The CID of ``data``."""
    return cid_for_sha256(hashlib.sha256(data).digest())


def cid_for_file(path: Path) -> str:
    """The CID of a file's content, hashed in chunks so large files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return cid_for_sha256(digest.digest())


def sha256_of_cid(cid: str) -> str:
    """The hex sha256 digest a CID names; raises RegistryError unless ``cid`` is a canonical kolm CID."""
    if not isinstance(cid, str) or not _CID_RE.fullmatch(cid):
        raise RegistryError(f"malformed CID {cid!r}: expected 'b' followed by 58 base32 characters")
    body = cid[1:].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    if not raw.startswith(_PREFIX) or len(raw) != len(_PREFIX) + 32:
        raise RegistryError(f"malformed CID {cid!r}: not CIDv1 raw sha2-256")
    if cid_for_sha256(raw[len(_PREFIX) :]) != cid:
        raise RegistryError(f"malformed CID {cid!r}: non-canonical base32 encoding")
    return raw[len(_PREFIX) :].hex()
