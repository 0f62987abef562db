"""Table definitions of the capture store (SQLAlchemy Core), portable across SQLite and PostgreSQL.

This is the schema as of the newest migration (`store/migrations.py` builds it step by step; a test
checks that both agree). JSON payloads are stored as text so both backends behave the same; timestamps
are written in UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

PROVIDERS = ("openai", "anthropic")
CAPTURE_STATUSES = ("ok", "error", "incomplete")
TRIAGE_STATES = ("untriaged", "kept", "discarded")
RULE_ACTIONS = ("keep", "discard")
# Where a pair came from: proxy traffic, or `kolm capture import --source human|ai|import`. The source sets
# the pair's training weight (`KOLM_SOURCE_WEIGHTS`, see settings.py).
CAPTURE_SOURCES = ("capture", "human", "ai", "import")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """Comparisons joined by OR, not `IN (…)`: SQLite builds a temporary b-tree for an IN list of three or
    more values on every row an executemany inserts (migration 5)."""
    return " OR ".join(f"{column} = '{value}'" for value in values)


metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(16), nullable=False, index=True),
    Column("capture_only", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Every kolm key a tenant was issued (only its sha256 is kept). `key_id` is public: the first 8 hex digits of
# the hash, shown by `kolm tenant keys` and named in the audit log; a revoked key stays listed. (`tenants`
# still holds the hash of the tenant's first key, as before keys were listed here; lookups read this table.)
tenant_keys = Table(
    "tenant_keys",
    metadata,
    Column("key_id", String(16), primary_key=True),
    Column("tenant", String(63), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(16), nullable=False, index=True),
    Column("capture_only", Boolean, nullable=False, default=False),
    Column("created_by", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_by", String(255)),
    Column("revoked_at", DateTime(timezone=True)),
)

# Key of HMAC-SHA256 over bodies: dedup digests at insert, and what a body becomes after retention.
# Apart from `tenants` because captures may name a tenant that has no key (imports, tests).
tenant_secrets = Table(
    "tenant_secrets",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("hmac_secret", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

captures = Table(
    "captures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("tenant", String(63), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("provider", String(16), nullable=False),
    Column("model", String(255), nullable=False),
    Column("input_json", Text, nullable=False),
    Column("output_text", Text, nullable=False),
    Column("latency_us", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("http_status", Integer, nullable=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("tags", Text, nullable=False, default=""),
    Column("streamed", Boolean, nullable=False, default=False),
    Column("triage_state", String(16), nullable=False, default="untriaged"),
    Column("triaged_by", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("feedback_output", Text),
    Column("feedback_rating", Integer),
    Column("input_hmac", String(64)),
    Column("output_hmac", String(64)),
    Column("expired_at", DateTime(timezone=True)),
    Column("distilled_at", DateTime(timezone=True)),
    Column("merged_at", DateTime(timezone=True)),
    Column("implicit_signal", String(32)),
    Column("source", String(16), nullable=False, default="capture", server_default="capture"),
    # The input digest again, only where the namespace has implicit signals on: retries are found by it.
    Column("retry_digest", String(64)),
    # The CID of the deployed adapter that answered in the teacher's place (routing `student`); NULL when the
    # teacher answered. Such a pair never trains an adapter (never train on self-output).
    Column("served_by", String(128)),
    CheckConstraint(_one_of("provider", PROVIDERS), name="ck_captures_provider"),
    CheckConstraint(_one_of("status", CAPTURE_STATUSES), name="ck_captures_status"),
    CheckConstraint(_one_of("triage_state", TRIAGE_STATES), name="ck_captures_triage_state"),
    CheckConstraint(_one_of("source", CAPTURE_SOURCES), name="ck_captures_source"),
    Index("ix_captures_tenant_namespace_triage", "tenant", "namespace", "triage_state"),
    Index(
        "ix_captures_retry_digest",
        "tenant",
        "namespace",
        "retry_digest",
        sqlite_where=text("retry_digest IS NOT NULL"),
        postgresql_where=text("retry_digest IS NOT NULL"),
    ),
    Index("ix_captures_expired_created", "expired_at", "created_at"),
)

# The counters of each namespace, kept up to date in the same transactions that insert, triage and mark
# captures: reading them costs one row, however many captures the namespace holds (counting the captures
# took 0.1 s at 200,000). Untriaged is captured less kept and discarded.
namespace_counters = Table(
    "namespace_counters",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("namespace", String(63), primary_key=True),
    Column("captured", BigInteger, nullable=False, default=0),
    Column("kept", BigInteger, nullable=False, default=0),
    Column("discarded", BigInteger, nullable=False, default=0),
    Column("distilled", BigInteger, nullable=False, default=0),
    Column("merged", BigInteger, nullable=False, default=0),
)

namespace_settings = Table(
    "namespace_settings",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("namespace", String(63), primary_key=True),
    Column("retention_days", Integer),
    Column("implicit_signals", Boolean, nullable=False, default=False),
    Column("distill_ready", Boolean, nullable=False, default=False),
    Column("redact_entities", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Who answers the namespace's traffic (`ROUTING_MODES`) and the student-routing knobs; NULL: the default.
    Column("routing", String(16)),
    Column("routing_target", Float),
    Column("canary_share", Float),
    Column("shadow_min", Integer),
    # The most bytes of images the namespace's live captures may hold (capture/images.py); NULL: the default.
    Column("image_bytes_limit", BigInteger),
)

# Tenants' public signing keys (base64 of the 32 raw Ed25519 bytes, as in `keys/<tenant>.pub`), published by
# every deployment: a serving replica with no shared KOLM_HOME verifies artifacts with them. Never a private key.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("keyid", String(64), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("public_key", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# The collapse tripwire's state of each task (JSON: the last good cycle, a halt and its reasons): in the store so
# every run, on any host, compares with the same last good cycle and sees the same halt.
tripwire_states = Table(
    "tripwire_states",
    metadata,
    Column("task", String(255), primary_key=True),
    Column("state_json", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Every work product a stage wrote (corpus, recipe, adapter, evaluation; the case previews and the frozen
# hold-out beside them), stored once in the object store under `cid` (provenance/products.py). A stage's row
# carries its signed receipt, so any host rebuilds the receipt chain from here. `capture_ids` (JSON) are the
# captures whose text the product holds (NULL: none), `unnamed_rows` its rows naming no capture (and, for the
# frozen hold-out, `drawn_rows` the rows it was drawn with): retention
# removes the objects as soon as one of those captures expired, and stamps `removed_at`.
work_products = Table(
    "work_products",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(255), nullable=False),
    Column("stage", String(32), nullable=False),
    Column("cid", String(128), nullable=False),
    Column("directory", Boolean, nullable=False),
    Column("receipt_cid", String(128)),
    Column("receipt", Text),
    Column("capture_ids", Text),
    Column("unnamed_rows", Integer, nullable=False, default=0),
    Column("drawn_rows", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True)),
    Index("ix_work_products_task_stage", "task", "stage"),
    Index("ix_work_products_receipt", "receipt_cid"),
)

# The images of each capture (capture/images.py), by the capture's request id: the bytes are in the image store
# under `digest` (sha256 hex), once however many captures send them. An image goes from the store when no capture
# inside its window refers to it any more.
capture_images = Table(
    "capture_images",
    metadata,
    Column("request_id", String(64), nullable=False),
    Column("tenant", String(63), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("media_type", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    UniqueConstraint("request_id", "digest", name="uq_capture_images_request_digest"),
    Index("ix_capture_images_digest", "digest"),
    Index("ix_capture_images_namespace", "tenant", "namespace"),
)

ROUTING_MODES = ("teacher", "shadow", "student")
# Registry decisions that change what a task serves: a row's `to_cid` is then the adapter served from it on.
SERVING_DECISIONS = ("swap", "rollback")
# How a compared request reached both models: a shadow copy, a canary of a confident student answer sent to
# the teacher anyway, or an escalation (the student was not confident enough).
COMPARISON_KINDS = ("shadow", "canary", "escalated")

# One request answered by both the teacher and the namespace's deployed adapter, and how far they agreed
# (the task's verifier, the teacher's answer as reference). The student's answer is kept for the inbox's
# disagreement list, and swept with the namespace's retention window like the capture it belongs to.
student_comparisons = Table(
    "student_comparisons",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(63), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("adapter_cid", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("agreement", Float, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("student_output", Text, nullable=False),
    Column("student_latency_us", BigInteger, nullable=False),
    Column("teacher_latency_us", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint(_one_of("kind", COMPARISON_KINDS), name="ck_student_comparisons_kind"),
    Index("ix_student_comparisons_namespace_cid", "tenant", "namespace", "adapter_cid"),
)

schema_versions = Table(
    "kolm_schema_versions",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

triage_rules = Table(
    "triage_rules",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(63), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("action", String(16), nullable=False),
    Column("match_json", Text, nullable=False),
    Column("created_by", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Two values: SQLite compares an IN list that short directly, so migration 1's form stays.
    CheckConstraint("action IN ('keep', 'discard')", name="ck_triage_rules_action"),
    Index("ix_triage_rules_tenant_namespace", "tenant", "namespace"),
)

registry = Table(
    "registry",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task", String(255), nullable=False, index=True),
    Column("from_cid", String(128)),
    Column("to_cid", String(128)),
    Column("k_before", Float),
    Column("k_after", Float),
    Column("decision", Text, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("details_json", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(63), nullable=False),
    Column("namespace", String(63)),
    Column("action", String(64), nullable=False),
    Column("detail_json", Text, nullable=False),
    Column("actor", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_audit_log_tenant_namespace", "tenant", "namespace"),
)
