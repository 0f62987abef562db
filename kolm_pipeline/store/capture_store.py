"""The capture store: every proxied call, its triage state, rules, switches, the registry and the audit log.

One class over SQLAlchemy Core so the same code runs on an embedded SQLite file and on PostgreSQL; the
schema is built and upgraded by `store/migrations.py`. Only a sha256 of each kolm key is kept; the
plaintext key is shown once, at creation. Bodies carry an HMAC-SHA256 digest under a per-tenant secret
from the start, so after the retention window the text can go while dedup and the counters keep working.

`CaptureStore` is composed of one mixin per concern, each in its own module (`tenants`, `captures`,
`capture_search`, `triage`, `switches`, `retention`, `kept_pairs`, `counters`, `registry_rows`, `student_routing`,
`deployments`, `work_products`, `image_refs`, `audit`) over `base.StoreBase`.
"""

from __future__ import annotations

from kolm_pipeline.store.audit import AuditQueries
from kolm_pipeline.store.base import (
    HMAC_PREFIX,
    IMPLICIT_RETRY_WINDOW,
    canonical_messages,
    canonical_text,
)
from kolm_pipeline.store.capture_rows import sqlite_datetime_text
from kolm_pipeline.store.capture_search import CaptureSearchQueries
from kolm_pipeline.store.captures import CaptureQueries
from kolm_pipeline.store.counters import CounterQueries
from kolm_pipeline.store.deployments import DeploymentQueries
from kolm_pipeline.store.image_refs import ImageRefQueries
from kolm_pipeline.store.kept_pairs import KeptPairQueries
from kolm_pipeline.store.registry_rows import RegistryQueries
from kolm_pipeline.store.retention import RetentionQueries
from kolm_pipeline.store.student_routing import StudentRoutingQueries
from kolm_pipeline.store.switches import SwitchQueries
from kolm_pipeline.store.tags import EVAL_CANDIDATE_TAG, TAG_MAX_LENGTH, validate_tags
from kolm_pipeline.store.tenants import KEY_PREFIX, TenantQueries
from kolm_pipeline.store.triage import TriageQueries
from kolm_pipeline.store.work_products import WorkProductQueries

__all__ = [
    "EVAL_CANDIDATE_TAG",
    "HMAC_PREFIX",
    "IMPLICIT_RETRY_WINDOW",
    "KEY_PREFIX",
    "TAG_MAX_LENGTH",
    "CaptureStore",
    "canonical_messages",
    "canonical_text",
    "sqlite_datetime_text",
    "validate_tags",
]


class CaptureStore(
    TenantQueries,
    CaptureQueries,
    CaptureSearchQueries,
    TriageQueries,
    SwitchQueries,
    RetentionQueries,
    KeptPairQueries,
    CounterQueries,
    RegistryQueries,
    StudentRoutingQueries,
    DeploymentQueries,
    WorkProductQueries,
    ImageRefQueries,
    AuditQueries,
):
    """Capture store on any SQLAlchemy URL (`sqlite:///path` or `postgresql+psycopg://...`).

    `clock` returns the current UTC time (tests pass a controlled one); `default_retention_days` is the
    window of namespaces that set none (default: `KOLM_RETENTION_DAYS`, else 30); `source_weights` is the
    training weight of each capture source (default: `KOLM_SOURCE_WEIGHTS` over the built-in weights)."""
