"""Capture store: tables, namespaces and the `CaptureStore` queries, on SQLite or PostgreSQL."""

from kolm_pipeline.store.capture_search import CaptureFilter, CapturePage, capture_dict, parse_time
from kolm_pipeline.store.capture_store import EVAL_CANDIDATE_TAG, CaptureStore, validate_tags
from kolm_pipeline.store.namespaces import (
    NAMESPACE_RE,
    partition_key,
    split_partition_key,
    validate_namespace,
    validate_tenant,
)
from kolm_pipeline.store.records import (
    AuditRow,
    Capture,
    ImportOutcome,
    IssuedKey,
    KeptPair,
    NamespaceSettings,
    NewCapture,
    RegistryRow,
    Tenant,
    TenantKey,
    TriageRule,
)
from kolm_pipeline.store.tables import CAPTURE_SOURCES, CAPTURE_STATUSES, PROVIDERS, RULE_ACTIONS, TRIAGE_STATES

__all__ = [
    "CAPTURE_SOURCES",
    "CAPTURE_STATUSES",
    "EVAL_CANDIDATE_TAG",
    "NAMESPACE_RE",
    "PROVIDERS",
    "RULE_ACTIONS",
    "TRIAGE_STATES",
    "AuditRow",
    "Capture",
    "CaptureFilter",
    "CapturePage",
    "CaptureStore",
    "ImportOutcome",
    "IssuedKey",
    "KeptPair",
    "NamespaceSettings",
    "NewCapture",
    "RegistryRow",
    "Tenant",
    "TenantKey",
    "TriageRule",
    "capture_dict",
    "parse_time",
    "partition_key",
    "split_partition_key",
    "validate_namespace",
    "validate_tags",
    "validate_tenant",
]
