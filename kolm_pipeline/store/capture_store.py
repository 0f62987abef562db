"""The capture store: every proxied call, its triage state, rules, the registry and the audit log.

One class over SQLAlchemy Core so the same code runs on an embedded SQLite file and on PostgreSQL.
Only a sha256 of each kolm key is kept; the plaintext key is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from kolm_pipeline.store.namespaces import validate_namespace, validate_tenant
from kolm_pipeline.store.records import (
    AuditRow,
    Capture,
    KeptPair,
    NewCapture,
    RegistryRow,
    Tenant,
    TriageRule,
)
from kolm_pipeline.store.rules import rule_matches, validate_rule
from kolm_pipeline.store.tables import (
    TRIAGE_STATES,
    audit_log,
    captures,
    metadata,
    registry,
    tenants,
    triage_rules,
)

KEY_PREFIX = "kolm_"
_KEY_PREFIX_LEN = len(KEY_PREFIX) + 8
_CHUNK = 500


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything written is UTC, so say so."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _split_tags(text: str) -> list[str]:
    return [tag for tag in text.split(",") if tag]


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, hide_parameters=True, pool_pre_ping=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = StaticPool
    else:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, hide_parameters=True, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _capture(row: Any) -> Capture:
    return Capture(
        id=row.id,
        request_id=row.request_id,
        tenant=row.tenant,
        namespace=row.namespace,
        provider=row.provider,
        model=row.model,
        messages=json.loads(row.input_json),
        output_text=row.output_text,
        latency_us=row.latency_us,
        status=row.status,
        http_status=row.http_status,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        tags=_split_tags(row.tags),
        streamed=bool(row.streamed),
        triage_state=row.triage_state,
        triaged_by=row.triaged_by,
        created_at=_utc(row.created_at),
        feedback_output=row.feedback_output,
    )


class CaptureStore:
    """Capture store on any SQLAlchemy URL (`sqlite:///path` or `postgresql+psycopg://...`)."""

    def __init__(self, url: str) -> None:
        self.engine = _make_engine(url)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # Tenants

    def create_tenant(self, name: str, capture_only: bool = False) -> str:
        """Create a tenant and return its kolm key; this is the only time the key is visible."""
        validate_tenant(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(tenants).values(
                        name=name,
                        key_hash=_hash_key(key),
                        key_prefix=key[:_KEY_PREFIX_LEN],
                        capture_only=capture_only,
                        created_at=_now(),
                    )
                )
                self._audit(conn, name, None, "tenant.create", {"capture_only": capture_only}, "store")
        except IntegrityError as exc:
            raise ValueError(f"tenant {name!r} already exists") from exc
        return key

    def create_tenant_key(self, name: str, capture_only: bool = False) -> str:
        """Issue a fresh key for `name`, creating the tenant if needed; any earlier key stops working.

        Lets a rerunnable tool (the demo) obtain a usable key without ever having stored one."""
        validate_tenant(name)
        try:
            return self.create_tenant(name, capture_only)
        except ValueError:
            pass
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                update(tenants)
                .where(tenants.c.name == name)
                .values(key_hash=_hash_key(key), key_prefix=key[:_KEY_PREFIX_LEN], capture_only=capture_only)
            )
            self._audit(conn, name, None, "tenant.rotate_key", {"capture_only": capture_only}, "store")
        return key

    def tenant_for_key(self, key: str) -> Tenant | None:
        """The tenant owning `key`, or None; hashes are compared in constant time."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) <= _KEY_PREFIX_LEN:
            return None
        digest = _hash_key(key)
        with self.engine.connect() as conn:
            rows = conn.execute(select(tenants).where(tenants.c.key_prefix == key[:_KEY_PREFIX_LEN])).all()
        for row in rows:
            if hmac.compare_digest(row.key_hash, digest):
                return Tenant(row.name, row.key_prefix, bool(row.capture_only), _utc(row.created_at))
        return None

    # Captures

    def insert_captures(self, records: list[NewCapture]) -> list[int]:
        """Insert a batch in one transaction; returns the new ids in the order of `records`."""
        if not records:
            return []
        rows = [self._capture_row(record) for record in records]
        stmt = insert(captures).returning(captures.c.id, sort_by_parameter_order=True)
        with self.engine.begin() as conn:
            return [row.id for row in conn.execute(stmt, rows)]

    @staticmethod
    def _capture_row(record: NewCapture) -> dict[str, Any]:
        validate_tenant(record.tenant)
        validate_namespace(record.namespace)
        if any("," in tag for tag in record.tags):
            raise ValueError("tags must not contain commas")
        return {
            "request_id": record.request_id,
            "tenant": record.tenant,
            "namespace": record.namespace,
            "provider": record.provider,
            "model": record.model,
            "input_json": _dumps(record.messages),
            "output_text": record.output_text,
            "latency_us": int(record.latency_us),
            "status": record.status,
            "http_status": int(record.http_status),
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "tags": ",".join(tag for tag in record.tags if tag),
            "streamed": bool(record.streamed),
            "triage_state": "untriaged",
            "triaged_by": None,
            "created_at": record.created_at or _now(),
            "feedback_output": None,
        }

    def list_captures(
        self,
        tenant: str,
        namespace: str | None = None,
        triage_state: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Capture]:
        """A tenant's captures, newest first."""
        stmt = select(captures).where(captures.c.tenant == tenant)
        if namespace is not None:
            stmt = stmt.where(captures.c.namespace == validate_namespace(namespace))
        if triage_state is not None:
            if triage_state not in TRIAGE_STATES:
                raise ValueError(f"invalid triage state {triage_state!r}")
            stmt = stmt.where(captures.c.triage_state == triage_state)
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        stmt = stmt.order_by(captures.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_capture(row) for row in conn.execute(stmt)]

    def get_capture(self, tenant: str, capture_id: int) -> Capture | None:
        stmt = select(captures).where(captures.c.tenant == tenant, captures.c.id == capture_id)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return _capture(row) if row is not None else None

    # Triage

    def set_triage(self, tenant: str, capture_ids: list[int], state: str, actor: str) -> int:
        """Move captures to `state` and return how many changed; a capture whose status is not 'ok'
        is never kept, it stays as it is."""
        if state not in TRIAGE_STATES:
            raise ValueError(f"invalid triage state {state!r}: expected one of {', '.join(TRIAGE_STATES)}")
        ids = sorted({int(i) for i in capture_ids})
        triaged_by = None if state == "untriaged" else actor
        changed: dict[str, list[int]] = defaultdict(list)
        with self.engine.begin() as conn:
            for chunk in _chunks(ids):
                stmt = update(captures).where(
                    captures.c.tenant == tenant,
                    captures.c.id.in_(chunk),
                    captures.c.triage_state != state,
                )
                if state == "kept":
                    stmt = stmt.where(captures.c.status == "ok")
                stmt = stmt.values(triage_state=state, triaged_by=triaged_by).returning(
                    captures.c.id, captures.c.namespace
                )
                for row in conn.execute(stmt):
                    changed[row.namespace].append(row.id)
            for namespace, changed_ids in sorted(changed.items()):
                self._audit(conn, tenant, namespace, f"triage.{state}", {"ids": sorted(changed_ids)}, actor)
        return sum(len(v) for v in changed.values())

    def add_rule(self, tenant: str, namespace: str, action: str, match: dict[str, Any], actor: str) -> int:
        """Store a triage rule; `apply_rules` runs the namespace's rules in the order they were added."""
        validate_namespace(namespace)
        match = validate_rule(action, match)
        with self.engine.begin() as conn:
            rule_id = conn.execute(
                insert(triage_rules)
                .values(
                    tenant=tenant,
                    namespace=namespace,
                    action=action,
                    match_json=_dumps(match),
                    created_by=actor,
                    created_at=_now(),
                )
                .returning(triage_rules.c.id)
            ).scalar_one()
            detail = {"id": rule_id, "action": action, "match": match}
            self._audit(conn, tenant, namespace, "rule.add", detail, actor)
        return rule_id

    def rules(self, tenant: str, namespace: str) -> list[TriageRule]:
        stmt = (
            select(triage_rules)
            .where(triage_rules.c.tenant == tenant, triage_rules.c.namespace == namespace)
            .order_by(triage_rules.c.id)
        )
        with self.engine.connect() as conn:
            return [
                TriageRule(
                    row.id,
                    row.tenant,
                    row.namespace,
                    row.action,
                    json.loads(row.match_json),
                    row.created_by,
                    _utc(row.created_at),
                )
                for row in conn.execute(stmt)
            ]

    def apply_rules(self, tenant: str, namespace: str) -> dict[str, int]:
        """Triage the namespace's untriaged captures by its rules; the first matching rule decides."""
        rules = self.rules(tenant, namespace)
        counts = {"kept": 0, "discarded": 0}
        if not rules:
            return counts
        decided: dict[int, list[int]] = defaultdict(list)
        for row in self._untriaged(tenant, namespace):
            tags = _split_tags(row.tags)
            for rule in rules:
                if rule_matches(rule.match, row.status, row.model, tags, row.output_text):
                    decided[rule.id].append(row.id)
                    break
        with self.engine.begin() as conn:
            for rule in rules:
                state = "kept" if rule.action == "keep" else "discarded"
                for chunk in _chunks(decided.get(rule.id, [])):
                    stmt = update(captures).where(
                        captures.c.tenant == tenant,
                        captures.c.id.in_(chunk),
                        captures.c.triage_state == "untriaged",
                    )
                    if state == "kept":
                        stmt = stmt.where(captures.c.status == "ok")
                    result = conn.execute(stmt.values(triage_state=state, triaged_by=f"rule:{rule.id}"))
                    counts[state] += result.rowcount
            if counts["kept"] or counts["discarded"]:
                self._audit(conn, tenant, namespace, "rules.apply", dict(counts), "rules")
        return counts

    def _untriaged(self, tenant: str, namespace: str) -> Iterable[Any]:
        """Untriaged captures in id order, read a page at a time."""
        last_id = 0
        c = captures.c
        columns = (c.id, c.status, c.model, c.tags, c.output_text)
        while True:
            stmt = (
                select(*columns)
                .where(
                    captures.c.tenant == tenant,
                    captures.c.namespace == namespace,
                    captures.c.triage_state == "untriaged",
                    captures.c.id > last_id,
                )
                .order_by(captures.c.id)
                .limit(1000)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    def set_feedback(self, tenant: str, capture_id: int, corrected_output: str, actor: str) -> None:
        """Record an explicit correction; it replaces the teacher's output in `kept_pairs`."""
        if not isinstance(corrected_output, str):
            raise ValueError("corrected output must be a string")
        with self.engine.begin() as conn:
            result = conn.execute(
                update(captures)
                .where(captures.c.tenant == tenant, captures.c.id == capture_id)
                .values(feedback_output=corrected_output)
                .returning(captures.c.namespace)
            ).first()
            if result is None:
                raise LookupError(f"no capture {capture_id} for tenant {tenant!r}")
            self._audit(conn, tenant, result.namespace, "feedback.set", {"id": capture_id}, actor)

    def delete_namespace(self, tenant: str, namespace: str, actor: str = "store") -> int:
        """Delete a namespace's captures and rules; the audit log keeps a row saying so.

        Returns how many captures were deleted."""
        with self.engine.begin() as conn:
            deleted = conn.execute(
                delete(captures).where(captures.c.tenant == tenant, captures.c.namespace == namespace)
            ).rowcount
            conn.execute(
                delete(triage_rules).where(
                    triage_rules.c.tenant == tenant, triage_rules.c.namespace == namespace
                )
            )
            self._audit(conn, tenant, namespace, "namespace.delete", {"captures": deleted}, actor)
        return deleted

    # Reading for the later stages

    def kept_pairs(self, tenant: str, namespace: str) -> list[KeptPair]:
        stmt = (
            select(captures)
            .where(
                captures.c.tenant == tenant,
                captures.c.namespace == namespace,
                captures.c.triage_state == "kept",
                captures.c.status == "ok",
            )
            .order_by(captures.c.id)
        )
        with self.engine.connect() as conn:
            return [
                KeptPair(
                    id=row.id,
                    messages=json.loads(row.input_json),
                    output=row.feedback_output if row.feedback_output is not None else row.output_text,
                    model=row.model,
                    latency_us=row.latency_us,
                    prompt_tokens=row.prompt_tokens,
                    completion_tokens=row.completion_tokens,
                    created_at=_utc(row.created_at),
                    tags=_split_tags(row.tags),
                )
                for row in conn.execute(stmt)
            ]

    def counters(self, tenant: str, namespace: str) -> dict[str, int]:
        """The four counters: captured, kept, discarded, untriaged."""
        stmt = (
            select(captures.c.triage_state, func.count())
            .where(captures.c.tenant == tenant, captures.c.namespace == namespace)
            .group_by(captures.c.triage_state)
        )
        with self.engine.connect() as conn:
            by_state = {state: count for state, count in conn.execute(stmt)}
        counts = {state: int(by_state.get(state, 0)) for state in ("kept", "discarded", "untriaged")}
        return {"captured": sum(counts.values()), **counts}

    def namespaces(self) -> list[tuple[str, str]]:
        """Every (tenant, namespace) with at least one capture."""
        stmt = (
            select(captures.c.tenant, captures.c.namespace)
            .distinct()
            .order_by(captures.c.tenant, captures.c.namespace)
        )
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(stmt)]

    # Registry and audit

    def add_registry_row(
        self,
        task: str,
        from_cid: str | None,
        to_cid: str | None,
        k_before: float | None,
        k_after: float | None,
        decision: str,
        actor: str,
        details: dict[str, Any],
    ) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                insert(registry)
                .values(
                    task=task,
                    from_cid=from_cid,
                    to_cid=to_cid,
                    k_before=k_before,
                    k_after=k_after,
                    decision=decision,
                    actor=actor,
                    details_json=_dumps(details),
                    created_at=_now(),
                )
                .returning(registry.c.id)
            ).scalar_one()

    def registry_rows(self, task: str | None = None) -> list[RegistryRow]:
        """Registry rows, newest first."""
        stmt = select(registry).order_by(registry.c.id.desc())
        if task is not None:
            stmt = stmt.where(registry.c.task == task)
        with self.engine.connect() as conn:
            return [
                RegistryRow(
                    id=row.id,
                    task=row.task,
                    from_cid=row.from_cid,
                    to_cid=row.to_cid,
                    k_before=row.k_before,
                    k_after=row.k_after,
                    decision=row.decision,
                    actor=row.actor,
                    details=json.loads(row.details_json),
                    created_at=_utc(row.created_at),
                )
                for row in conn.execute(stmt)
            ]

    def audit(
        self, tenant: str, namespace: str | None, action: str, detail: dict[str, Any], actor: str
    ) -> None:
        with self.engine.begin() as conn:
            self._audit(conn, tenant, namespace, action, detail, actor)

    @staticmethod
    def _audit(
        conn: Any, tenant: str, namespace: str | None, action: str, detail: dict[str, Any], actor: str
    ) -> None:
        conn.execute(
            insert(audit_log).values(
                tenant=tenant,
                namespace=namespace,
                action=action,
                detail_json=_dumps(detail),
                actor=actor,
                created_at=_now(),
            )
        )

    def audit_rows(self, tenant: str, namespace: str | None = None) -> list[AuditRow]:
        """A tenant's audit log, newest first."""
        stmt = select(audit_log).where(audit_log.c.tenant == tenant).order_by(audit_log.c.id.desc())
        if namespace is not None:
            stmt = stmt.where(audit_log.c.namespace == namespace)
        with self.engine.connect() as conn:
            return [
                AuditRow(
                    row.id,
                    row.tenant,
                    row.namespace,
                    row.action,
                    json.loads(row.detail_json),
                    row.actor,
                    _utc(row.created_at),
                )
                for row in conn.execute(stmt)
            ]
