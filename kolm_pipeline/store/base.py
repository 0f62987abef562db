"""The base every query mixin of `CaptureStore` builds on: the engine (SQLite pragmas, PostgreSQL timeouts),
the clock, and the private helpers more than one concern needs (UTC times, chunks of ids, the canonical
text a body is digested in, the audit row, the counters, the tenant's digest secret)."""

from __future__ import annotations

import json
import secrets
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, insert, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from kolm_pipeline.provenance.atomic import private_file
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.settings import read_settings
from kolm_pipeline.store.keyed_digest import KeyedDigest
from kolm_pipeline.store.migrations import migrate
from kolm_pipeline.store.records import NamespaceSettings
from kolm_pipeline.store.tables import CAPTURE_SOURCES, audit_log, captures, tenant_secrets

_CHUNK = 500
# A second call with the same input this soon after the first is read as "the answer was not good enough".
IMPLICIT_RETRY_WINDOW = timedelta(minutes=10)
HMAC_PREFIX = "hmac-sha256:"
_COUNTERS = ("captured", "kept", "discarded", "distilled", "merged")
# Adds to a namespace's counters, making its row on first use; plain SQL that SQLite and PostgreSQL share.
_ADD_TO_COUNTERS = text(
    f"INSERT INTO namespace_counters (tenant, namespace, {', '.join(_COUNTERS)}) "
    f"VALUES (:tenant, :namespace, {', '.join(':' + name for name in _COUNTERS)}) "
    "ON CONFLICT (tenant, namespace) DO UPDATE SET "
    + ", ".join(f"{name} = namespace_counters.{name} + excluded.{name}" for name in _COUNTERS)
)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything written is UTC, so say so."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _chunks(ids: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]


def canonical_text(text: str) -> str:
    """The form a body is digested in: NFC, whitespace collapsed, case folded (the corpus dedups the same
    way, so two inputs the corpus would merge also share a digest)."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def canonical_messages(messages: list[dict[str, Any]]) -> str:
    """One line `role:content` per message; non-text content is written as sorted compact JSON."""
    lines = []
    for message in messages:
        content = message.get("content", "")
        body = content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False)
        lines.append(f"{message.get('role')}:{canonical_text(body)}")
    return "\n".join(lines)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    # Freed pages are overwritten, so text removed by retention does not linger in the file.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # A host that swallows packets must not hang a proxy write or a sensor tick until the OS gives up.
        return create_engine(parsed, hide_parameters=True, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, hide_parameters=True, pool_pre_ping=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = StaticPool
    else:
        private_file(Path(parsed.database).expanduser())  # it holds the tenants' key hashes and HMAC secrets
    engine = create_engine(parsed, hide_parameters=True, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class StoreBase:
    """The engine, the clock and the settings every query mixin of `CaptureStore` shares, and the helpers
    several of them call inside their own transactions: the tenant's digest secret, the audit row, the
    counters, the switches read from a row, the retry-digest backfill."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], datetime] | None = None,
        default_retention_days: int | None = None,
        source_weights: Mapping[str, float] | None = None,
    ) -> None:
        if source_weights is None or default_retention_days is None:
            # Whatever the caller leaves out comes from the one place settings are read (KOLM_* variables).
            settings = read_settings()
            source_weights = settings.source_weights if source_weights is None else source_weights
            if default_retention_days is None:
                default_retention_days = settings.retention_days
        missing = sorted(set(CAPTURE_SOURCES) - set(source_weights))
        if missing:
            raise InvalidInput(f"source_weights lacks a weight for {missing}")
        self.source_weights = {source: float(source_weights[source]) for source in CAPTURE_SOURCES}
        self.engine = _make_engine(url)
        self.clock = clock or (lambda: datetime.now(UTC))
        if default_retention_days < 1:
            raise InvalidInput("retention must be at least one day")
        self.default_retention_days = default_retention_days
        self._secrets: dict[str, KeyedDigest] = {}
        self._signals_seen: dict[tuple[str, str], bool] = {}
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _now(self) -> datetime:
        return _utc(self.clock())

    def _insert(self) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        return pg_dialect.insert if self.engine.dialect.name == "postgresql" else sqlite_dialect.insert

    def _secret(self, conn: Any, tenant: str) -> KeyedDigest:
        """HMAC under the tenant's secret, made on first use; the secret never changes, so it is cached."""
        cached = self._secrets.get(tenant)
        if cached is not None:
            return cached
        stmt = select(tenant_secrets.c.hmac_secret).where(tenant_secrets.c.tenant == tenant)
        value = conn.execute(stmt).scalar_one_or_none()
        if value is None:
            conn.execute(
                self._insert()(tenant_secrets)
                .values(tenant=tenant, hmac_secret=secrets.token_hex(32), created_at=self._now())
                .on_conflict_do_nothing(index_elements=["tenant"])
            )
            value = conn.execute(stmt).scalar_one()
        secret = KeyedDigest(bytes.fromhex(value))
        self._secrets[tenant] = secret
        return secret

    def _audit(
        self, conn: Any, tenant: str, namespace: str | None, action: str, detail: dict[str, Any], actor: str
    ) -> None:
        conn.execute(
            insert(audit_log).values(
                tenant=tenant,
                namespace=namespace,
                action=action,
                detail_json=_dumps(detail),
                actor=actor,
                created_at=self._now(),
            )
        )

    def _add_to_counters(self, conn: Any, changes: Mapping[tuple[str, str], Mapping[str, int]]) -> None:
        """Add `changes` (counter name → amount, per tenant and namespace) to the stored counters, in the
        caller's transaction. Namespaces go in sorted order, so two PostgreSQL writers never wait on each
        other's rows crosswise."""
        for (tenant, namespace), change in sorted(changes.items()):
            amounts = {name: int(change.get(name, 0)) for name in _COUNTERS}
            if any(amounts.values()):
                conn.execute(_ADD_TO_COUNTERS, {"tenant": tenant, "namespace": namespace, **amounts})

    def _settings_of(self, row: Any) -> NamespaceSettings:
        if row is None:
            return NamespaceSettings(self.default_retention_days, False, False, None)
        entities = None if row.redact_entities is None else tuple(e for e in row.redact_entities.split(",") if e)
        defaults = NamespaceSettings(self.default_retention_days, False, False, None)
        return NamespaceSettings(
            row.retention_days or self.default_retention_days,
            bool(row.implicit_signals),
            bool(row.distill_ready),
            entities,
            routing=row.routing or defaults.routing,
            routing_target=row.routing_target if row.routing_target is not None else defaults.routing_target,
            canary_share=row.canary_share if row.canary_share is not None else defaults.canary_share,
            shadow_min=row.shadow_min if row.shadow_min is not None else defaults.shadow_min,
            image_bytes_limit=row.image_bytes_limit if row.image_bytes_limit is not None
            else defaults.image_bytes_limit,
        )

    def _backfill_retry_digests(self, conn: Any, tenant: str, namespace: str) -> None:
        """Give the namespace's captures of the retry window their retry digest: a retry of them is a signal."""
        conn.execute(
            update(captures)
            .where(
                captures.c.tenant == tenant,
                captures.c.namespace == namespace,
                captures.c.retry_digest.is_(None),
                captures.c.expired_at.is_(None),
                captures.c.created_at >= self._now() - IMPLICIT_RETRY_WINDOW,
            )
            .values(retry_digest=captures.c.input_hmac)
        )
