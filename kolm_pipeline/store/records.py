"""Plain records passed in and out of the capture store, so callers never touch SQLAlchemy rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Tenant:
    """The tenant a kolm key names, with what that key may do; `key_id` is the key's public id."""

    name: str
    key_prefix: str
    capture_only: bool
    created_at: datetime
    key_id: str | None = None


@dataclass(frozen=True)
class TenantKey:
    """One kolm key of a tenant as `kolm tenant keys` lists it: never the key, only its public id."""

    key_id: str
    tenant: str
    capture_only: bool
    created_by: str
    created_at: datetime
    revoked_by: str | None = None
    revoked_at: datetime | None = None

    @property
    def kind(self) -> str:
        return "capture-only" if self.capture_only else "full"


@dataclass(frozen=True)
class IssuedKey:
    """A key just issued: `key` is the only time its plaintext exists outside the client that keeps it."""

    key: str
    key_id: str
    tenant: str
    capture_only: bool


@dataclass(slots=True)
class NewCapture:
    """One proxied call as the recorder hands it to the store (or one imported pair: `source` says which).

    Not frozen, unlike the records read back: the capture writer makes one per proxied call, and a frozen
    dataclass's `__init__` pays a guarded `object.__setattr__` per field."""

    request_id: str
    tenant: str
    namespace: str
    provider: str
    model: str
    messages: list[dict[str, Any]]
    output_text: str
    latency_us: int
    status: str
    http_status: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tags: list[str] = field(default_factory=list)
    streamed: bool = False
    created_at: datetime | None = None
    source: str = "capture"
    served_by: str | None = None
    # The capture's stored images (capture/images.py): (sha256 hex, media type, bytes) each.
    images: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Capture:
    id: int
    request_id: str
    tenant: str
    namespace: str
    provider: str
    model: str
    messages: list[dict[str, Any]]
    output_text: str
    latency_us: int
    status: str
    http_status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    tags: list[str]
    streamed: bool
    triage_state: str
    triaged_by: str | None
    created_at: datetime
    feedback_output: str | None
    feedback_rating: int | None = None
    input_hmac: str | None = None
    output_hmac: str | None = None
    expired_at: datetime | None = None
    distilled_at: datetime | None = None
    merged_at: datetime | None = None
    implicit_signal: str | None = None
    source: str = "capture"
    served_by: str | None = None


# Student routing defaults: agreement the student's kept answers must reach, the share of confident requests
# still sent to the teacher, and how many compared requests `student` needs first.
DEFAULT_ROUTING_TARGET = 0.98
DEFAULT_CANARY_SHARE = 0.05
DEFAULT_SHADOW_MIN = 200
# Images a namespace's live captures may hold, in bytes, until its `image_bytes_limit` switch says otherwise.
DEFAULT_IMAGE_BYTES_LIMIT = 1 << 30


@dataclass(frozen=True)
class NamespaceSettings:
    """The switches of one namespace. `redact_entities` None means every entity the redactor knows."""

    retention_days: int
    implicit_signals: bool
    distill_ready: bool
    redact_entities: tuple[str, ...] | None
    routing: str = "teacher"
    routing_target: float = DEFAULT_ROUTING_TARGET
    canary_share: float = DEFAULT_CANARY_SHARE
    shadow_min: int = DEFAULT_SHADOW_MIN
    image_bytes_limit: int = DEFAULT_IMAGE_BYTES_LIMIT

    def switches(self) -> dict[str, int | bool | str | float]:
        """The switches shown with the counters."""
        return {
            "retention_days": self.retention_days,
            "implicit_signals": self.implicit_signals,
            "distill_ready": self.distill_ready,
            "routing": self.routing,
            "routing_target": self.routing_target,
            "canary_share": self.canary_share,
            "shadow_min": self.shadow_min,
            "image_bytes_limit": self.image_bytes_limit,
        }


@dataclass(frozen=True)
class KeptPair:
    """A training pair: the request's messages and the output to learn (the correction if one exists).

    `source` is the provenance of `output`: the capture's source (`capture`, `human`, `ai`, `import`), or
    `human` when a person's feedback correction replaced the output. `weight` is that source's training
    weight (`KOLM_SOURCE_WEIGHTS`): the trainer scales the pair's loss by it. `tags` carries the capture's
    tags, e.g. `eval-candidate` (never trained on)."""

    id: int
    messages: list[dict[str, Any]]
    output: str
    model: str
    latency_us: int
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime
    tags: list[str]
    source: str = "capture"
    weight: float = 1.0


@dataclass(frozen=True)
class ImportOutcome:
    """What an import wrote: new rows (`ids`), rows skipped as already stored, and how triage sorted the
    new rows (kept by approval or a rule, discarded by a rule; the rest stay untriaged)."""

    imported: int
    skipped: int
    kept: int
    discarded: int
    ids: list[int]

    def counts(self) -> dict[str, int]:
        return {"imported": self.imported, "skipped": self.skipped, "kept": self.kept, "discarded": self.discarded}


@dataclass(frozen=True)
class TriageRule:
    id: int
    tenant: str
    namespace: str
    action: str
    match: dict[str, str]
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class RegistryRow:
    id: int
    task: str
    from_cid: str | None
    to_cid: str | None
    k_before: float | None
    k_after: float | None
    decision: str
    actor: str
    details: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class AuditRow:
    id: int
    tenant: str
    namespace: str | None
    action: str
    detail: dict[str, Any]
    actor: str
    created_at: datetime
