"""A person's correction of a captured answer, as the inbox and `kolm triage correct` record it: redacted as
its namespace redacts captures (it replaces the teacher's output in the corpus, so it must hold no more PII
than the captures do) and written as explicit feedback, with its actor, to the store and the audit log."""

from __future__ import annotations

from dataclasses import dataclass

from kolm_pipeline.capture.redact import namespace_redactor
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store import Capture, CaptureStore

CORRECTION_MAX_CHARS = 1_000_000


@dataclass(frozen=True)
class Correction:
    """What was stored: the redacted text, whether redaction changed it, and the capture it corrects."""

    capture: Capture
    output: str
    redacted: bool


def record_correction(
    store: CaptureStore,
    tenant: str,
    capture_id: int,
    output: str,
    actor: str,
    rating: int | None = None,
    namespace: str | None = None,
) -> Correction:
    """Store `output` (redacted) as the correction of capture `capture_id`, and `rating` with it if given.

    `LookupError` when the tenant has no such capture (or, with `namespace`, none in that namespace);
    `InvalidInput` for an empty or oversized text or a capture whose text retention removed."""
    if not isinstance(output, str) or not output.strip():
        raise InvalidInput("the corrected output is empty")
    if len(output) > CORRECTION_MAX_CHARS:
        raise InvalidInput(f"the corrected output is longer than {CORRECTION_MAX_CHARS:,} characters")
    capture = store.get_capture(tenant, capture_id)
    if capture is None or (namespace is not None and capture.namespace != namespace):
        where = f"{tenant}.{namespace}" if namespace is not None else f"tenant {tenant!r}"
        raise LookupError(f"no capture {capture_id} in {where}")
    redacted = namespace_redactor(store, tenant, capture.namespace).text(output)
    store.set_feedback(tenant, capture_id, redacted, actor, rating)
    return Correction(capture, redacted, redacted != output)
