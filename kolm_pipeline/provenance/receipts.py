"""Receipts: DSSE envelopes holding in-toto Statements v1, one per stage, each naming the previous one's CID.

The chain lets ``kolm verify`` prove, offline, which stages produced an artifact and in what order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kolm_pipeline.provenance.cid import cid_for_bytes, sha256_of_cid
from kolm_pipeline.provenance.encoding import b64decode_strict, b64encode, canonical_json
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.keys import TenantKey

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://kolm.dev/receipt/v1"
_RESERVED = ("stage", "previous_receipt")


@dataclass(frozen=True)
class ChainReport:
    """Outcome of checking a receipt chain.

    ``links`` holds the stage names of the receipts that verified, in order (all of them when ``ok``);
    ``first_broken`` is the 0-based list index of the first bad receipt, while ``reason`` counts from 1
    ("receipt 3 (evaluation): ...") to match the ``NN-`` numbers of receipt files inside a ``.kolm``.
    """

    ok: bool
    links: list[str]
    first_broken: int | None
    reason: str | None


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed, so type and body cannot be swapped."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(body), body)


def make_receipt(
    *,
    stage: str,
    subject_name: str,
    subject_cid: str,
    predicate: dict[str, Any],
    previous_cid: str | None,
    private_key: Ed25519PrivateKey,
    keyid: str,
) -> bytes:
    """Sign a statement that ``stage`` produced ``subject_cid`` after the receipt ``previous_cid``."""
    if not isinstance(stage, str) or not stage:
        raise RegistryError("a receipt needs a non-empty stage name")
    clash = [key for key in _RESERVED if key in predicate]
    if clash:
        raise RegistryError(f"predicate may not set {', '.join(clash)}: the receipt sets them itself")
    if previous_cid is not None:
        sha256_of_cid(previous_cid)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {
                "name": subject_name,
                "digest": {"sha256": sha256_of_cid(subject_cid)},
                "annotations": {"cid": subject_cid},
            }
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"stage": stage, "previous_receipt": previous_cid, **predicate},
    }
    body = canonical_json(statement)
    signature = private_key.sign(pae(PAYLOAD_TYPE, body))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": b64encode(body),
        "signatures": [{"keyid": keyid, "sig": b64encode(signature)}],
    }
    return canonical_json(envelope)


def receipt_cid(envelope: bytes) -> str:
    """The CID the next receipt names as its ``previous_receipt``."""
    return cid_for_bytes(envelope)


def _parse_envelope(envelope: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(envelope)
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"envelope is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise RegistryError("envelope is not a JSON object")
    if parsed.get("payloadType") != PAYLOAD_TYPE:
        raise RegistryError(f"payloadType is {parsed.get('payloadType')!r}, expected {PAYLOAD_TYPE!r}")
    return parsed


def _parse_statement(body: bytes) -> dict[str, Any]:
    try:
        statement = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"payload is not JSON: {exc}") from exc
    if not isinstance(statement, dict):
        raise RegistryError("payload is not a JSON object")
    return statement


def read_statement(envelope: bytes) -> dict[str, Any]:
    """The in-toto Statement inside an envelope, without checking signatures (for display and lookup)."""
    parsed = _parse_envelope(envelope)
    return _parse_statement(b64decode_strict(parsed.get("payload")))


def _check_statement(statement: dict[str, Any]) -> str:
    """Validate the statement's shape; return its stage."""
    if statement.get("_type") != STATEMENT_TYPE:
        raise RegistryError(f"statement _type is {statement.get('_type')!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise RegistryError(f"predicateType is {statement.get('predicateType')!r}")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise RegistryError("statement has no subject")
    for subject in subjects:
        if not isinstance(subject, dict) or not isinstance(subject.get("name"), str):
            raise RegistryError("subject has no name")
        digest = subject.get("digest")
        if not isinstance(digest, dict) or not isinstance(digest.get("sha256"), str):
            raise RegistryError(f"subject {subject['name']!r} has no sha256 digest")
        annotations = subject.get("annotations", {})
        cid = annotations.get("cid") if isinstance(annotations, dict) else None
        if cid is not None and sha256_of_cid(cid) != digest["sha256"]:
            raise RegistryError(f"subject {subject['name']!r}: annotated CID does not match its digest")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        raise RegistryError("statement has no predicate object")
    stage = predicate.get("stage")
    if not isinstance(stage, str) or not stage:
        raise RegistryError("predicate has no stage")
    if "previous_receipt" not in predicate:
        raise RegistryError("predicate has no previous_receipt")
    return stage


def _check_signatures(parsed: dict[str, Any], body: bytes, public_keys: Mapping[str, TenantKey],
                      tenant: str | None) -> None:
    signatures = parsed.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise RegistryError("envelope carries no signatures")
    message = pae(PAYLOAD_TYPE, body)
    for entry in signatures:
        if not isinstance(entry, dict):
            raise RegistryError("malformed signature entry")
        keyid = entry.get("keyid")
        public_key = public_keys.get(keyid) if isinstance(keyid, str) else None
        if public_key is None:
            raise RegistryError(f"signed by unknown keyid {keyid!r}")
        if tenant is not None and public_key.tenant != tenant:
            raise RegistryError(f"signed by {keyid} of tenant {public_key.tenant!r}, not by tenant {tenant!r}")
        try:
            public_key.verify(b64decode_strict(entry.get("sig")), message)
        except InvalidSignature:
            raise RegistryError("signature does not verify") from None


def _stage_hint(envelope: bytes) -> str:
    """Best-effort stage name for an error message about a receipt that may not parse."""
    try:
        stage = read_statement(envelope).get("predicate", {}).get("stage")
    except (RegistryError, AttributeError):
        return "unreadable"
    return stage if isinstance(stage, str) and stage else "unknown stage"


def _verify_link(envelope: bytes, previous: bytes | None, public_keys: Mapping[str, TenantKey],
                 tenant: str | None) -> str:
    """Check one receipt and its link to the one before; return its stage."""
    if not isinstance(envelope, bytes):
        raise RegistryError("receipt is not bytes")
    parsed = _parse_envelope(envelope)
    if canonical_json(parsed) != envelope:
        raise RegistryError("envelope is not in canonical JSON form")
    body = b64decode_strict(parsed.get("payload"))
    _check_signatures(parsed, body, public_keys, tenant)
    statement = _parse_statement(body)
    stage = _check_statement(statement)
    expected = None if previous is None else receipt_cid(previous)
    actual = statement["predicate"]["previous_receipt"]
    if actual != expected:
        raise RegistryError(f"previous_receipt is {actual!r}, expected {expected!r}")
    return stage


def verify_chain(
    envelopes: list[bytes], public_keys: Mapping[str, TenantKey], tenant: str | None = None
) -> ChainReport:
    """Verify signatures, shape and links of a receipt chain, stopping at the first broken link. With
    ``tenant``, every receipt must be signed by a key of that tenant."""
    if not envelopes:
        return ChainReport(ok=False, links=[], first_broken=None, reason="the receipt chain is empty")
    links: list[str] = []
    for index, envelope in enumerate(envelopes):
        previous = envelopes[index - 1] if index else None
        try:
            links.append(_verify_link(envelope, previous, public_keys, tenant))
        except RegistryError as exc:
            reason = f"receipt {index + 1} ({_stage_hint(envelope)}): {exc}"
            return ChainReport(ok=False, links=links, first_broken=index, reason=reason)
    return ChainReport(ok=True, links=links, first_broken=None, reason=None)
