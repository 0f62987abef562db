"""Byte encodings the registry signs and hashes, kept canonical so one value has exactly one encoding."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from kolm_pipeline.provenance.errors import RegistryError


def canonical_json(value: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON: the form that is signed and content-addressed."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"value is not plain JSON: {exc}") from exc


def pretty_json(value: Any) -> bytes:
    """Key-sorted, indented JSON for files people read inside an archive; still deterministic."""
    try:
        text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"value is not plain JSON: {exc}") from exc
    return (text + "\n").encode("utf-8")


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as DSSE uses."""
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: Any) -> bytes:
    """Decode base64, rejecting stray characters and non-canonical forms (e.g. set unused trailing bits)."""
    if not isinstance(text, str):
        raise RegistryError("expected a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RegistryError(f"invalid base64: {exc}") from exc
    if b64encode(data) != text:
        raise RegistryError("non-canonical base64")
    return data
