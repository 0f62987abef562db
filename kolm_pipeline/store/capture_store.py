"""The capture store: every proxied call, its triage state, rules, switches, the registry and the audit log.

One class over SQLAlchemy Core so the same code runs on an embedded SQLite file and on PostgreSQL; the
schema is built and upgraded by `store/migrations.py`. Only a sha256 of each kolm key is kept; the
plaintext key is shown once, at creation. Bodies carry an HMAC-SHA256 digest under a per-tenant secret
from the start, so after the retention window the text can go while dedup and the counters keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Engine, bindparam, create_engine, delete, event, func, insert, select, text, union_all, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.provenance.jsontext import dumps_compact
from kolm_pipeline.store.keyed_digest import KeyedDigest
from kolm_pipeline.store.migrations import migrate
from kolm_pipeline.store.namespaces import validate_namespace, validate_tenant
from kolm_pipeline.store.records import (
    AuditRow,
    Capture,
    ImportOutcome,
    KeptPair,
    NamespaceSettings,
    NewCapture,
    RegistryRow,
    Tenant,
    TriageRule,
)
from kolm_pipeline.store.rules import rule_matches, validate_rule
from kolm_pipeline.store.tables import (
    CAPTURE_SOURCES,
    TRIAGE_STATES,
    audit_log,
    captures,
    namespace_counters,
    namespace_settings,
    registry,
    tenant_secrets,
    tenants,
    triage_rules,
)

KEY_PREFIX = "kolm_"
_KEY_PREFIX_LEN = len(KEY_PREFIX) + 8
_CHUNK = 500
DEFAULT_RETENTION_DAYS = 30
# A second call with the same input this soon after the first is read as "the answer was not good enough".
IMPLICIT_RETRY_WINDOW = timedelta(minutes=10)
HMAC_PREFIX = "hmac-sha256:"
_SWITCH_NAMES = ("retention_days", "implicit_signals", "distill_ready", "redact_entities")
TAG_MAX_LENGTH = 64
# Captures tagged so (at capture with `x-kolm-tags`, or at triage) are held out for evaluation: never trained on.
EVAL_CANDIDATE_TAG = "eval-candidate"


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything written is UTC, so say so."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else _utc(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _split_tags(text: str) -> list[str]:
    return [tag for tag in text.split(",") if tag]


def validate_tags(tags: Iterable[str], what: str = "tag") -> list[str]:
    """Tags as stored: printable, no commas (the column is a comma list), at most 64 characters; duplicates
    dropped, order kept."""
    found: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag or len(tag) > TAG_MAX_LENGTH or "," in tag or not tag.isprintable():
            raise InvalidInput(f"invalid {what} {tag!r}: 1-{TAG_MAX_LENGTH} printable characters, no commas")
        if tag not in found:
            found.append(tag)
    return found


# What every new capture starts with: no triage, no feedback, no retention, distill or merge mark yet.
_NEW_CAPTURE_CONSTANTS: dict[str, str | None] = {
    "triage_state": "untriaged",
    "triaged_by": None,
    "feedback_output": None,
    "feedback_rating": None,
    "expired_at": None,
    "distilled_at": None,
    "merged_at": None,
    "implicit_signal": None,
}
_CAPTURE_COLUMNS = tuple(column.name for column in captures.columns if column.name != "id")
# What the writer binds, in the order `_capture_values` gives them; the constants above are written into its SQL.
_CAPTURE_BOUND_COLUMNS = (
    "request_id", "tenant", "namespace", "provider", "model", "input_json", "output_text", "latency_us", "status",
    "http_status", "prompt_tokens", "completion_tokens", "tags", "streamed", "created_at", "input_hmac",
    "output_hmac", "source", "retry_digest",
)  # fmt: skip
if tuple(name for name in _CAPTURE_COLUMNS if name not in _NEW_CAPTURE_CONSTANTS) != _CAPTURE_BOUND_COLUMNS:
    raise RuntimeError("_CAPTURE_BOUND_COLUMNS no longer lists the captures table's columns in order")
# Columns a new capture often leaves empty (token counts a stream did not report; the retry digest of a
# namespace without implicit signals): where a row has None there, a variant of the INSERT writes NULL.
_OFTEN_NULL = tuple(
    _CAPTURE_BOUND_COLUMNS.index(name) for name in ("prompt_tokens", "completion_tokens", "retry_digest")
)
_PROMPT_TOKENS, _COMPLETION_TOKENS, _RETRY_DIGEST = _OFTEN_NULL
_TENANT, _NAMESPACE = _CAPTURE_BOUND_COLUMNS.index("tenant"), _CAPTURE_BOUND_COLUMNS.index("namespace")
_COUNTERS = ("captured", "kept", "discarded", "distilled", "merged")
# Adds to a namespace's counters, making its row on first use; plain SQL that SQLite and PostgreSQL share.
_ADD_TO_COUNTERS = text(
    f"INSERT INTO namespace_counters (tenant, namespace, {', '.join(_COUNTERS)}) "
    f"VALUES (:tenant, :namespace, {', '.join(':' + name for name in _COUNTERS)}) "
    "ON CONFLICT (tenant, namespace) DO UPDATE SET "
    + ", ".join(f"{name} = namespace_counters.{name} + excluded.{name}" for name in _COUNTERS)
)


class _Retry(NamedTuple):
    """A new capture in a namespace with implicit signals on: earlier captures of its input may be retries."""

    tenant: str
    namespace: str
    digest: str
    request_id: str
    created_at: datetime


class _DriverInsert:
    """The capture writer's INSERT … ON CONFLICT DO NOTHING in the driver's own SQL and parameter style.
    The writer inserts every proxied call, and SQLAlchemy's per-row parameter handling cost about as much as
    SQLite's insert itself.

    The columns every new capture starts alike are SQL constants, not parameters, and so is NULL where a row
    leaves one of the `_OFTEN_NULL` columns empty (a batch is one executemany per run of rows alike there):
    binding a None costs Python's sqlite3 module a formatted and discarded AttributeError (its adapter
    lookup), ≈ 3,000 instructions each. On SQLite the values come converted already (`prepared`: the
    boolean as 0/1, the time as SQLAlchemy writes it); elsewhere `converters` are SQLAlchemy's own."""

    def __init__(
        self,
        render: Callable[[frozenset[int]], str],
        converters: tuple[tuple[int, Callable[[Any], Any]], ...],
        prepared: bool,
    ) -> None:
        self._render = render
        self.converters = converters
        self.prepared = prepared
        self.sql = render(frozenset())
        self._variants: dict[tuple[bool, bool, bool], tuple[str, Callable[[Any], tuple[Any, ...]] | None]] = {}

    def statements(
        self, rows: list[tuple[Any, ...]]
    ) -> list[tuple[str, list[tuple[Any, ...]], tuple[str, str]]]:
        """(SQL, parameters, (tenant, namespace)) per run of consecutive `rows` (values from
        `_capture_values`) of one namespace that leave the same columns empty: runs, not groups, so ids keep
        the order the calls came in; one namespace each, so a run's row count is what its counters gain."""
        runs: list[tuple[tuple[tuple[str, str], tuple[bool, bool, bool]], list[tuple[Any, ...]]]] = []
        for values in rows if not self.converters else map(self._convert, rows):
            where = (values[_TENANT], values[_NAMESPACE])
            empty = (values[_PROMPT_TOKENS] is None, values[_COMPLETION_TOKENS] is None, values[_RETRY_DIGEST] is None)
            if not runs or runs[-1][0] != (where, empty):
                runs.append(((where, empty), []))
            runs[-1][1].append(values)
        statements = []
        for (where, empty), run in runs:
            sql, kept = self._variant(empty)
            statements.append((sql, run if kept is None else list(map(kept, run)), where))
        return statements

    def _variant(self, key: tuple[bool, bool, bool]) -> tuple[str, Callable[[Any], tuple[Any, ...]] | None]:
        variant = self._variants.get(key)
        if variant is None:
            nulls = frozenset(index for index, empty in zip(_OFTEN_NULL, key, strict=True) if empty)
            kept = itemgetter(*(index for index in range(len(_CAPTURE_BOUND_COLUMNS)) if index not in nulls))
            variant = self._variants[key] = (self._render(nulls), kept if nulls else None)
        return variant

    def _convert(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        converted = list(values)
        for index, convert in self.converters:
            if converted[index] is not None:  # these columns' processors map None to None
                converted[index] = convert(converted[index])
        return tuple(converted)


def _rows_of(values: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """`_capture_values`' tuples as rows by column name, with a new capture's constant columns."""
    return [{**dict(zip(_CAPTURE_BOUND_COLUMNS, row, strict=True)), **_NEW_CAPTURE_CONSTANTS} for row in values]


def _sql_literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    if not value.isidentifier():  # the constants are plain words; anything else would need quoting rules
        raise InvalidInput(f"not a plain word: {value!r}")
    return f"'{value}'"


def sqlite_datetime_text(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite DATETIME stores it (`YYYY-MM-DD HH:MM:SS.ffffff`, any zone dropped),
    from one C call: its own processor formats a dict of eight fields, 1.5 µs a value for the writer."""
    return value.isoformat(" ", "microseconds")[:26]


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
        feedback_rating=row.feedback_rating,
        input_hmac=row.input_hmac,
        output_hmac=row.output_hmac,
        expired_at=_utc_or_none(row.expired_at),
        distilled_at=_utc_or_none(row.distilled_at),
        merged_at=_utc_or_none(row.merged_at),
        implicit_signal=row.implicit_signal,
        source=row.source,
    )


class CaptureStore:
    """Capture store on any SQLAlchemy URL (`sqlite:///path` or `postgresql+psycopg://...`).

    `clock` returns the current UTC time (tests pass a controlled one); `default_retention_days` is the
    window of namespaces that set none (default: `KOLM_RETENTION_DAYS`, else 30); `source_weights` is the
    training weight of each capture source (default: `KOLM_SOURCE_WEIGHTS` over the built-in weights)."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], datetime] | None = None,
        default_retention_days: int | None = None,
        source_weights: Mapping[str, float] | None = None,
    ) -> None:
        if source_weights is None:
            from kolm_pipeline.settings import load_source_weights

            source_weights = load_source_weights()
        missing = sorted(set(CAPTURE_SOURCES) - set(source_weights))
        if missing:
            raise InvalidInput(f"source_weights lacks a weight for {missing}")
        self.source_weights = {source: float(source_weights[source]) for source in CAPTURE_SOURCES}
        self.engine = _make_engine(url)
        self.clock = clock or (lambda: datetime.now(UTC))
        if default_retention_days is None:
            default_retention_days = int(os.environ.get("KOLM_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS)
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

    @cached_property
    def _capture_insert_sql(self) -> _DriverInsert | None:
        """The capture writer's INSERT … ON CONFLICT DO NOTHING as the driver's own SQL, with the type
        conversions SQLAlchemy would apply; None where the driver's parameter style is not positional."""
        dialect = self.engine.dialect
        placeholder = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(dialect.paramstyle)
        if placeholder is None:
            return None
        quote = dialect.identifier_preparer.quote
        bound = {name: index for index, name in enumerate(_CAPTURE_BOUND_COLUMNS)}

        def render(nulls: frozenset[int]) -> str:
            values = [
                _sql_literal(_NEW_CAPTURE_CONSTANTS[name])
                if name not in bound
                else "NULL"
                if bound[name] in nulls
                else placeholder
                for name in _CAPTURE_COLUMNS
            ]
            return (
                f"INSERT INTO {quote(captures.name)} ({', '.join(quote(name) for name in _CAPTURE_COLUMNS)}) "
                f"VALUES ({', '.join(values)}) ON CONFLICT ({quote('request_id')}) DO NOTHING"
            )

        if dialect.name == "sqlite":
            return _DriverInsert(render, (), prepared=True)
        converters = []
        for index, name in enumerate(_CAPTURE_BOUND_COLUMNS):
            convert = captures.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if convert is not None:
                converters.append((index, convert))
        return _DriverInsert(render, tuple(converters), prepared=False)

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
                        created_at=self._now(),
                    )
                )
                self._audit(conn, name, None, "tenant.create", {"capture_only": capture_only}, "store")
        except IntegrityError as exc:
            raise InvalidInput(f"tenant {name!r} already exists") from exc
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

    def input_digest(self, tenant: str, messages: list[dict[str, Any]]) -> str:
        """HMAC-SHA256 of a conversation's canonical text under the tenant's secret."""
        with self.engine.begin() as conn:
            return self._secret(conn, tenant).hexdigest(canonical_messages(messages))

    def keyed_digests(self, tenant: str, texts: Iterable[str]) -> list[str]:
        """HMAC-SHA256 of each exact text under the tenant's secret: stable ids derived from content that
        cannot be checked against a guessed text without the secret."""
        with self.engine.begin() as conn:
            secret = self._secret(conn, tenant)
        return [secret.hexdigest(text) for text in texts]

    # Captures

    def insert_captures(self, records: list[NewCapture]) -> list[int]:
        """Insert a batch in one transaction; returns the new ids in the order of `records`."""
        if not records:
            return []
        stmt = insert(captures).returning(captures.c.id, sort_by_parameter_order=True)
        with self.engine.begin() as conn:
            values, retries = self._capture_values(conn, records)
            ids = [row.id for row in conn.execute(stmt, _rows_of(values))]
            self._implicit_signals(conn, retries)
            captured: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"captured": 0})
            for row in values:
                captured[(row[_TENANT], row[_NAMESPACE])]["captured"] += 1
            self._add_to_counters(conn, captured)
        return ids

    def insert_captures_once(self, records: list[NewCapture]) -> None:
        """Insert a batch, skipping records whose request id is already stored: replaying a batch whose
        first write did commit (but was not acknowledged) leaves every capture there exactly once."""
        if not records:
            return
        driver_insert = self._capture_insert_sql
        captured: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"captured": 0})
        with self.engine.begin() as conn:
            if driver_insert is None:
                values, retries = self._capture_values(conn, records)
                stmt = self._insert()(captures).on_conflict_do_nothing(index_elements=["request_id"])
                for row in _rows_of(values):  # one at a time: an executemany's row count is the driver's guess
                    captured[(row["tenant"], row["namespace"])]["captured"] += conn.execute(stmt, row).rowcount
            else:
                values, retries = self._capture_values(conn, records, driver_insert.prepared)
                for sql, parameters, where in driver_insert.statements(values):
                    captured[where]["captured"] += conn.exec_driver_sql(sql, parameters).rowcount
            self._implicit_signals(conn, retries)
            self._add_to_counters(conn, captured)

    def _capture_rows(self, conn: Any, records: list[NewCapture]) -> list[dict[str, Any]]:
        """Rows to insert, by column name; in namespaces with implicit signals on they carry their retry digest."""
        return _rows_of(self._capture_values(conn, records)[0])

    def _capture_values(
        self, conn: Any, records: list[NewCapture], for_sqlite_driver: bool = False
    ) -> tuple[list[tuple[Any, ...]], list[_Retry]]:
        """Each record's values in `_CAPTURE_BOUND_COLUMNS` order, and the retries to look for. With
        `for_sqlite_driver` the boolean and the time come as SQLAlchemy would write them to SQLite, so the
        writer's INSERT binds the tuples as they are."""
        now = self._now()
        rows = []
        retries = []
        signals: dict[tuple[str, str], bool] = {}
        for record in records:
            where = (record.tenant, record.namespace)
            if where not in signals:
                validate_tenant(record.tenant)
                validate_namespace(record.namespace)
                signals[where] = self._signals_on(conn, record.tenant, record.namespace)
            tags = record.tags
            if tags and any("," in tag for tag in tags):
                raise InvalidInput("tags must not contain commas")
            if record.source not in CAPTURE_SOURCES:
                raise InvalidInput(f"invalid source {record.source!r}: expected one of {', '.join(CAPTURE_SOURCES)}")
            secret = self._secret(conn, record.tenant)
            input_hmac = secret.hexdigest(canonical_messages(record.messages))
            created_at = _utc(record.created_at) if record.created_at else now
            retry_digest = None
            if signals[where]:
                retry_digest = input_hmac
                retries.append(_Retry(record.tenant, record.namespace, input_hmac, record.request_id, created_at))
            rows.append(
                (
                    record.request_id,
                    record.tenant,
                    record.namespace,
                    record.provider,
                    record.model,
                    dumps_compact(record.messages),
                    record.output_text,
                    int(record.latency_us),
                    record.status,
                    int(record.http_status),
                    record.prompt_tokens,
                    record.completion_tokens,
                    ",".join(filter(None, tags)) if tags else "",
                    int(bool(record.streamed)) if for_sqlite_driver else bool(record.streamed),
                    sqlite_datetime_text(created_at) if for_sqlite_driver else created_at,
                    input_hmac,
                    secret.hexdigest(canonical_text(record.output_text)),
                    record.source,
                    retry_digest,
                )
            )
        return rows, retries

    def _signals_on(self, conn: Any, tenant: str, namespace: str) -> bool:
        """Whether the namespace has implicit signals on. The first time this store sees them on (at start,
        or after it saw them off) it gives the window's captures their retry digest: rows it wrote while the
        switch was being turned on (read as off, committed after the switch's own backfill) are found too."""
        stmt = select(namespace_settings.c.implicit_signals).where(
            namespace_settings.c.tenant == tenant, namespace_settings.c.namespace == namespace
        )
        on = bool(conn.execute(stmt).scalar_one_or_none())
        key = (tenant, namespace)
        if on and not self._signals_seen.get(key, False):
            self._backfill_retry_digests(conn, tenant, namespace)
            # The backfill is undone if this transaction is: then the next write must run it again.
            event.listen(conn, "rollback", lambda _conn: self._signals_seen.pop(key, None), once=True)
        self._signals_seen[key] = on
        return on

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

    def import_captures(
        self,
        records: list[NewCapture],
        actor: str,
        kept_by: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> ImportOutcome:
        """Insert imported pairs of one namespace all or nothing, in one transaction with their triage.

        Records whose request id is already stored (or repeats an earlier record) are skipped, so importing
        the same file twice stores each pair once. With `kept_by` (who approved them, e.g. `import:human`)
        the new rows are kept at once; otherwise the namespace's rules triage them exactly as `apply_rules`
        triages captured rows, and what no rule matches stays untriaged for a person. Imports set no
        implicit signals: rows written together are not retries. `progress` is called with the number of
        rows written after each chunk."""
        namespaces = {(record.tenant, record.namespace) for record in records}
        if len(namespaces) > 1:
            raise InvalidInput("an import writes to one namespace")
        if not records:
            return ImportOutcome(imported=0, skipped=0, kept=0, discarded=0, ids=[])
        tenant, namespace = next(iter(namespaces))
        rules = [] if kept_by is not None else self.rules(tenant, namespace)
        with self.engine.begin() as conn:
            rows = self._capture_rows(conn, records)
            stored: set[str] = set()
            for chunk in _chunks([row["request_id"] for row in rows]):
                stored.update(
                    conn.execute(select(captures.c.request_id).where(captures.c.request_id.in_(chunk))).scalars()
                )
            fresh: list[dict[str, Any]] = []
            for row in rows:
                if row["request_id"] in stored:
                    continue
                stored.add(row["request_id"])
                if kept_by is not None:
                    row.update(triage_state="kept", triaged_by=kept_by)
                else:
                    self._triage_by_rules(row, rules)
                fresh.append(row)
            ids: list[int] = []
            stmt = insert(captures).returning(captures.c.id, sort_by_parameter_order=True)
            for start in range(0, len(fresh), _CHUNK):
                chunk_rows = fresh[start : start + _CHUNK]
                ids.extend(row.id for row in conn.execute(stmt, chunk_rows))
                if progress is not None:
                    progress(len(chunk_rows))
            states = [row["triage_state"] for row in fresh]
            counts = {"captured": len(ids), "kept": states.count("kept"), "discarded": states.count("discarded")}
            self._add_to_counters(conn, {(tenant, namespace): counts})
            outcome = ImportOutcome(
                imported=len(ids),
                skipped=len(rows) - len(ids),
                kept=states.count("kept"),
                discarded=states.count("discarded"),
                ids=ids,
            )
            detail = {"source": sorted({row["source"] for row in rows}), **outcome.counts()}
            self._audit(conn, tenant, namespace, "captures.import", detail, actor)
        return outcome

    @staticmethod
    def _triage_by_rules(row: dict[str, Any], rules: list[TriageRule]) -> None:
        """The first matching rule decides a new row's state, as `apply_rules` decides an untriaged one."""
        tags = _split_tags(row["tags"])
        for rule in rules:
            if rule_matches(rule.match, row["status"], row["model"], tags, row["output_text"]):
                row.update(triage_state="kept" if rule.action == "keep" else "discarded", triaged_by=f"rule:{rule.id}")
                return

    def _implicit_signals(self, conn: Any, retries: list[_Retry]) -> None:
        """Where a namespace opted in, mark earlier captures whose input came again soon after as 'retried'."""
        for retry in retries:
            conn.execute(
                update(captures)
                .where(
                    captures.c.tenant == retry.tenant,
                    captures.c.namespace == retry.namespace,
                    captures.c.retry_digest == retry.digest,
                    captures.c.request_id != retry.request_id,
                    captures.c.created_at >= retry.created_at - IMPLICIT_RETRY_WINDOW,
                    captures.c.created_at <= retry.created_at,
                    captures.c.implicit_signal.is_(None),
                )
                .values(implicit_signal="retried")
            )

    def list_captures(
        self,
        tenant: str,
        namespace: str | None = None,
        triage_state: str | None = None,
        limit: int = 100,
        offset: int = 0,
        status: str | None = None,
        model: str | None = None,
        tag: str | None = None,
    ) -> list[Capture]:
        """A tenant's captures, newest first, filtered by any of namespace, triage state, status, model, tag."""
        stmt = select(captures).where(captures.c.tenant == tenant)
        if namespace is not None:
            stmt = stmt.where(captures.c.namespace == validate_namespace(namespace))
        if triage_state is not None:
            if triage_state not in TRIAGE_STATES:
                raise InvalidInput(f"invalid triage state {triage_state!r}")
            stmt = stmt.where(captures.c.triage_state == triage_state)
        if status is not None:
            stmt = stmt.where(captures.c.status == status)
        if model is not None:
            stmt = stmt.where(captures.c.model == model)
        if limit < 0 or offset < 0:
            raise InvalidInput("limit and offset must not be negative")
        stmt = stmt.order_by(captures.c.id.desc())
        if tag is None:
            with self.engine.connect() as conn:
                return [_capture(row) for row in conn.execute(stmt.limit(limit).offset(offset))]
        # Tags are a comma list; filter exactly in Python (a LIKE would also match substrings).
        found: list[Capture] = []
        with self.engine.connect() as conn:
            for row in conn.execution_options(yield_per=500).execute(stmt):
                if tag in _split_tags(row.tags):
                    found.append(_capture(row))
                    if len(found) >= offset + limit:
                        break
        return found[offset:]

    def stored_request_ids(self, request_ids: Iterable[str]) -> set[str]:
        """Which of `request_ids` are stored already (an importer skips those before redacting them)."""
        ids = sorted(set(request_ids))
        found: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(ids):
                found.update(
                    conn.execute(select(captures.c.request_id).where(captures.c.request_id.in_(chunk))).scalars()
                )
        return found

    def get_capture(self, tenant: str, capture_id: int) -> Capture | None:
        stmt = select(captures).where(captures.c.tenant == tenant, captures.c.id == capture_id)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return _capture(row) if row is not None else None

    def owned_ids(self, tenant: str, capture_ids: Iterable[int], namespace: str | None = None) -> set[int]:
        """Which of `capture_ids` belong to `tenant` (others are answered as if they did not exist), and
        to `namespace` when one is given."""
        ids = sorted({int(i) for i in capture_ids})
        owned: set[int] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(ids):
                stmt = select(captures.c.id).where(captures.c.tenant == tenant, captures.c.id.in_(chunk))
                if namespace is not None:
                    stmt = stmt.where(captures.c.namespace == namespace)
                owned.update(conn.execute(stmt).scalars())
        return owned

    # Triage

    def set_triage(
        self,
        tenant: str,
        capture_ids: list[int],
        state: str,
        actor: str,
        add_tags: Sequence[str] = (),
        remove_tags: Sequence[str] = (),
    ) -> int:
        """Move captures to `state` and return how many changed; a capture whose status is not 'ok', or
        whose text retention already removed, is never kept: it stays as it is. `add_tags`/`remove_tags`
        change the tags of every named capture of the tenant in the same transaction (e.g. keep a pair and
        mark it `eval-candidate`, so it is held out for evaluation and never trained on)."""
        if state not in TRIAGE_STATES:
            raise InvalidInput(f"invalid triage state {state!r}: expected one of {', '.join(TRIAGE_STATES)}")
        add, remove = validate_tags(add_tags), validate_tags(remove_tags)
        ids = sorted({int(i) for i in capture_ids})
        triaged_by = None if state == "untriaged" else actor
        changed: dict[str, list[int]] = defaultdict(list)
        moved: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        with self.engine.begin() as conn:
            if add or remove:
                self._retag(conn, tenant, ids, add, remove, actor)
            for chunk in _chunks(ids):
                if conn.dialect.name == "postgresql":
                    # Lock the rows first, in id order (chunks ascend too): the updates below then see every
                    # state a concurrent triage committed, and two triages never lock each other's rows
                    # crosswise. SQLite has one writer at a time; a read here would only make its snapshot old.
                    locked = select(captures.c.id).where(captures.c.tenant == tenant, captures.c.id.in_(chunk))
                    conn.execute(locked.order_by(captures.c.id).with_for_update())
                for before in TRIAGE_STATES:  # one state at a time: the counters move from it to `state`
                    if before == state:
                        continue
                    stmt = update(captures).where(
                        captures.c.tenant == tenant,
                        captures.c.id.in_(chunk),
                        captures.c.triage_state == before,
                    )
                    if state == "kept":
                        stmt = stmt.where(captures.c.status == "ok", captures.c.expired_at.is_(None))
                    stmt = stmt.values(triage_state=state, triaged_by=triaged_by).returning(
                        captures.c.id, captures.c.namespace
                    )
                    for row in conn.execute(stmt):
                        changed[row.namespace].append(row.id)
                        counts = moved[(tenant, row.namespace)]
                        counts[before] -= 1
                        counts[state] += 1
            self._add_to_counters(conn, moved)
            for namespace, changed_ids in sorted(changed.items()):
                self._audit(conn, tenant, namespace, f"triage.{state}", {"ids": sorted(changed_ids)}, actor)
        return sum(len(v) for v in changed.values())

    def retag(
        self, tenant: str, capture_ids: Iterable[int], add: Sequence[str], remove: Sequence[str], actor: str
    ) -> int:
        """Add and remove tags on the tenant's captures (ids of other tenants are ignored); returns how many
        captures' tags changed. A tag both added and removed is added."""
        add_list, remove_list = validate_tags(add), validate_tags(remove)
        ids = sorted({int(i) for i in capture_ids})
        with self.engine.begin() as conn:
            return self._retag(conn, tenant, ids, add_list, remove_list, actor)

    def _retag(self, conn: Any, tenant: str, ids: list[int], add: list[str], remove: list[str], actor: str) -> int:
        changed: dict[str, list[int]] = defaultdict(list)
        new_tags: list[dict[str, Any]] = []
        for chunk in _chunks(ids):
            rows = conn.execute(
                select(captures.c.id, captures.c.namespace, captures.c.tags).where(
                    captures.c.tenant == tenant, captures.c.id.in_(chunk)
                )
            ).all()
            for row in rows:
                before = _split_tags(row.tags)
                after = [tag for tag in before if tag not in remove or tag in add]
                after += [tag for tag in add if tag not in after]
                if after != before:
                    new_tags.append({"row_id": row.id, "new_tags": ",".join(after)})
                    changed[row.namespace].append(row.id)
        if new_tags:
            conn.execute(
                update(captures).where(captures.c.id == bindparam("row_id")).values(tags=bindparam("new_tags")),
                new_tags,
            )
        for namespace, changed_ids in sorted(changed.items()):
            detail = {"ids": sorted(changed_ids), "added": add, "removed": remove}
            self._audit(conn, tenant, namespace, "tags.update", detail, actor)
        return len(new_tags)

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
                    created_at=self._now(),
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
                if rule_matches(rule.match, row.status, row.model, tags, row.output_text, row.implicit_signal):
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
                        stmt = stmt.where(captures.c.status == "ok", captures.c.expired_at.is_(None))
                    result = conn.execute(stmt.values(triage_state=state, triaged_by=f"rule:{rule.id}"))
                    counts[state] += result.rowcount
            self._add_to_counters(conn, {(tenant, namespace): counts})
            if counts["kept"] or counts["discarded"]:
                self._audit(conn, tenant, namespace, "rules.apply", dict(counts), "rules")
        return counts

    def _untriaged(self, tenant: str, namespace: str) -> Iterable[Any]:
        """Untriaged captures whose text is still there, in id order, read a page at a time."""
        last_id = 0
        c = captures.c
        columns = (c.id, c.status, c.model, c.tags, c.output_text, c.implicit_signal)
        while True:
            stmt = (
                select(*columns)
                .where(
                    c.tenant == tenant,
                    c.namespace == namespace,
                    c.triage_state == "untriaged",
                    c.expired_at.is_(None),
                    c.id > last_id,
                )
                .order_by(c.id)
                .limit(1000)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    def set_feedback(
        self,
        tenant: str,
        capture_id: int,
        corrected_output: str | None,
        actor: str,
        rating: int | None = None,
    ) -> None:
        """Record explicit feedback: a correction (it replaces the teacher's output in `kept_pairs`), a
        rating from 1 to 5, or both. A capture whose text retention removed takes no correction."""
        if corrected_output is not None and not isinstance(corrected_output, str):
            raise InvalidInput("corrected output must be a string")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            raise InvalidInput("rating must be an integer from 1 to 5")
        if corrected_output is None and rating is None:
            raise InvalidInput("feedback needs a corrected output or a rating")
        values: dict[str, Any] = {}
        if corrected_output is not None:
            values["feedback_output"] = corrected_output
        if rating is not None:
            values["feedback_rating"] = rating
        with self.engine.begin() as conn:
            found = conn.execute(
                select(captures.c.namespace, captures.c.expired_at).where(
                    captures.c.tenant == tenant, captures.c.id == capture_id
                )
            ).first()
            if found is None:
                raise LookupError(f"no capture {capture_id} for tenant {tenant!r}")
            if found.expired_at is not None and corrected_output is not None:
                raise InvalidInput(f"capture {capture_id} is past its retention window; its text is gone")
            conn.execute(
                update(captures).where(captures.c.tenant == tenant, captures.c.id == capture_id).values(**values)
            )
            detail = {"id": capture_id, "correction": corrected_output is not None, "rating": rating}
            self._audit(conn, tenant, found.namespace, "feedback.set", detail, actor)

    def delete_namespace(self, tenant: str, namespace: str, actor: str = "store") -> int:
        """Delete a namespace's captures and rules; the audit log keeps a row saying so. Its switches stay.

        Returns how many captures were deleted."""
        with self.engine.begin() as conn:
            # The counters first: on PostgreSQL that locks their row, so a writer whose captures this delete
            # cannot see yet waits, and then counts them in a fresh row instead of into the deleted one.
            conn.execute(
                delete(namespace_counters).where(
                    namespace_counters.c.tenant == tenant, namespace_counters.c.namespace == namespace
                )
            )
            deleted = conn.execute(
                delete(captures).where(captures.c.tenant == tenant, captures.c.namespace == namespace)
            ).rowcount
            conn.execute(
                delete(triage_rules).where(triage_rules.c.tenant == tenant, triage_rules.c.namespace == namespace)
            )
            self._audit(conn, tenant, namespace, "namespace.delete", {"captures": deleted}, actor)
        return deleted

    # Switches, retention, distilled and merged marks

    def namespace_settings(self, tenant: str, namespace: str) -> NamespaceSettings:
        """The namespace's switches; defaults (retention window of the store, the rest off) until set."""
        stmt = select(namespace_settings).where(
            namespace_settings.c.tenant == tenant, namespace_settings.c.namespace == namespace
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return self._settings_of(row)

    def _settings_of(self, row: Any) -> NamespaceSettings:
        if row is None:
            return NamespaceSettings(self.default_retention_days, False, False, None)
        entities = None if row.redact_entities is None else tuple(e for e in row.redact_entities.split(",") if e)
        return NamespaceSettings(
            row.retention_days or self.default_retention_days,
            bool(row.implicit_signals),
            bool(row.distill_ready),
            entities,
        )

    def all_namespace_settings(self) -> dict[tuple[str, str], NamespaceSettings]:
        """Every namespace that set a switch; the others run on the defaults."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(namespace_settings)).all()
        return {(row.tenant, row.namespace): self._settings_of(row) for row in rows}

    def set_switches(self, tenant: str, namespace: str, actor: str, **changes: Any) -> NamespaceSettings:
        """Change switches (`retention_days`, `implicit_signals`, `distill_ready`, `redact_entities`); each
        change is written to the audit log with its old and new value, in the same transaction."""
        validate_tenant(tenant)
        validate_namespace(namespace)
        unknown = sorted(set(changes) - set(_SWITCH_NAMES))
        if unknown:
            raise InvalidInput(f"unknown switches {unknown}: allowed are {', '.join(_SWITCH_NAMES)}")
        changes = {name: value for name, value in changes.items() if value is not None or name == "redact_entities"}
        if "retention_days" in changes:
            days = changes["retention_days"]
            if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
                raise InvalidInput("retention_days must be an integer from 1 to 3650")
        for name in ("implicit_signals", "distill_ready"):
            if name in changes and not isinstance(changes[name], bool):
                raise InvalidInput(f"{name} must be true or false")
        if "redact_entities" in changes and changes["redact_entities"] is not None:
            entities = changes["redact_entities"]
            if not isinstance(entities, list | tuple) or not all(
                isinstance(e, str) and e.isidentifier() and e.isupper() for e in entities
            ):
                raise InvalidInput("redact_entities must be a list of entity names such as EMAIL")
            changes["redact_entities"] = tuple(sorted(set(entities)))
        key = (namespace_settings.c.tenant == tenant, namespace_settings.c.namespace == namespace)
        with self.engine.begin() as conn:
            row = conn.execute(select(namespace_settings).where(*key)).first()
            before = self._settings_of(row)
            after = {
                "retention_days": before.retention_days,
                "implicit_signals": before.implicit_signals,
                "distill_ready": before.distill_ready,
                "redact_entities": before.redact_entities,
                **changes,
            }
            stored = {
                "retention_days": after["retention_days"],
                "implicit_signals": after["implicit_signals"],
                "distill_ready": after["distill_ready"],
                "redact_entities": None if after["redact_entities"] is None else ",".join(after["redact_entities"]),
                "updated_at": self._now(),
            }
            if row is None:
                conn.execute(insert(namespace_settings).values(tenant=tenant, namespace=namespace, **stored))
            else:
                conn.execute(update(namespace_settings).where(*key).values(**stored))
            if after["implicit_signals"] and not before.implicit_signals:
                self._backfill_retry_digests(conn, tenant, namespace)
            for name in _SWITCH_NAMES:
                old, new = getattr(before, name), after[name]
                if old != new:
                    detail = {
                        "from": list(old) if isinstance(old, tuple) else old,
                        "to": list(new) if isinstance(new, tuple) else new,
                    }
                    self._audit(conn, tenant, namespace, f"switch.{name}", detail, actor)
        return NamespaceSettings(
            after["retention_days"], after["implicit_signals"], after["distill_ready"], after["redact_entities"]
        )

    def apply_retention(self, now: datetime | None = None) -> dict[str, int]:
        """Past each namespace's window, replace bodies by their HMAC-SHA256 and delete the text.

        The row stays (counters, triage state, token usage and latency keep working) and so do the
        digests taken at insert, so a later identical input is still recognised. Returns the number of
        captures expired per `tenant.namespace`."""
        now = _utc(now) if now is not None else self._now()
        custom = self.all_namespace_settings()
        expired: dict[str, int] = {}
        with self.engine.connect() as conn:
            pairs = conn.execute(
                select(captures.c.tenant, captures.c.namespace).where(captures.c.expired_at.is_(None)).distinct()
            ).all()
        for tenant, namespace in pairs:
            settings = custom.get((tenant, namespace)) or self._settings_of(None)
            cutoff = now - timedelta(days=settings.retention_days)
            count = self._expire(tenant, namespace, cutoff, now)
            if count:
                expired[f"{tenant}.{namespace}"] = count
        return expired

    def _expire(self, tenant: str, namespace: str, cutoff: datetime, now: datetime) -> int:
        c = captures.c
        total = 0
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(c.id, c.input_json, c.output_text, c.feedback_output, c.input_hmac, c.output_hmac)
                    .where(
                        c.tenant == tenant,
                        c.namespace == namespace,
                        c.expired_at.is_(None),
                        c.created_at < cutoff,
                    )
                    .order_by(c.id)
                    .limit(_CHUNK)
                ).all()
                if not rows:
                    break
                secret = self._secret(conn, tenant)
                params = []
                for row in rows:
                    feedback = row.feedback_output
                    params.append(
                        {
                            "row_id": row.id,
                            "new_input_hmac": row.input_hmac
                            or secret.hexdigest(canonical_messages(json.loads(row.input_json))),
                            "new_output_hmac": row.output_hmac or secret.hexdigest(canonical_text(row.output_text)),
                            "new_feedback": None
                            if feedback is None
                            else HMAC_PREFIX + secret.hexdigest(canonical_text(feedback)),
                        }
                    )
                conn.execute(
                    update(captures)
                    .where(c.id == bindparam("row_id"))
                    .values(
                        input_json="[]",
                        output_text="",
                        feedback_output=bindparam("new_feedback"),
                        input_hmac=bindparam("new_input_hmac"),
                        output_hmac=bindparam("new_output_hmac"),
                        expired_at=now,
                    ),
                    params,
                )
                self._audit(conn, tenant, namespace, "retention.expire", {"captures": len(rows)}, "retention")
                total += len(rows)
        return total

    def seen_input(self, tenant: str, namespace: str, messages: list[dict[str, Any]]) -> bool:
        """Whether this conversation was captured before in the namespace, expired text included."""
        digest = self.input_digest(tenant, messages)
        stmt = select(captures.c.id).where(
            captures.c.tenant == tenant, captures.c.namespace == namespace, captures.c.input_hmac == digest
        )
        with self.engine.connect() as conn:
            return conn.execute(stmt.limit(1)).first() is not None

    def mark_distilled(self, tenant: str, namespace: str, capture_ids: Iterable[int], actor: str = "corpus") -> int:
        """Record that these kept pairs went into a corpus (the `distilled` counter); returns how many
        were newly marked. Ids of other tenants or namespaces, or not kept, are ignored."""
        return self._mark(tenant, namespace, capture_ids, captures.c.distilled_at, "corpus.distilled", actor)

    def mark_merged(self, tenant: str, namespace: str, capture_ids: Iterable[int], actor: str = "deployment") -> int:
        """Record that these pairs are in a deployed artifact (the `merged` counter); they count as
        distilled too."""
        self._mark(tenant, namespace, capture_ids, captures.c.distilled_at, None, actor)
        return self._mark(tenant, namespace, capture_ids, captures.c.merged_at, "artifact.merged", actor)

    def _mark(
        self, tenant: str, namespace: str, capture_ids: Iterable[int], column: Any, action: str | None, actor: str
    ) -> int:
        """Set `column` (distilled_at or merged_at, named as its counter plus `_at`) on kept captures that
        lack it; returns how many it was set on."""
        ids = sorted({int(i) for i in capture_ids})
        now = self._now()
        marked = 0
        with self.engine.begin() as conn:
            for chunk in _chunks(ids):
                marked += conn.execute(
                    update(captures)
                    .where(
                        captures.c.tenant == tenant,
                        captures.c.namespace == namespace,
                        captures.c.id.in_(chunk),
                        captures.c.triage_state == "kept",
                        column.is_(None),
                    )
                    .values({column.name: now})
                ).rowcount
            self._add_to_counters(conn, {(tenant, namespace): {column.name.removesuffix("_at"): marked}})
            if action and marked:
                self._audit(conn, tenant, namespace, action, {"captures": marked}, actor)
        return marked

    # Reading for the later stages

    def kept_pairs(self, tenant: str, namespace: str) -> list[KeptPair]:
        """Kept, complete pairs whose text is still there, in id order.

        Each pair's `source` is where its output came from: a person's feedback correction counts as
        `human` whatever the capture's own source, since a person wrote that output; otherwise the
        capture's source. Its `weight` is that source's weight in `source_weights`."""
        stmt = (
            select(captures)
            .where(
                captures.c.tenant == tenant,
                captures.c.namespace == namespace,
                captures.c.triage_state == "kept",
                captures.c.status == "ok",
                captures.c.expired_at.is_(None),
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
                    source=self._output_source(row),
                    weight=self.source_weights[self._output_source(row)],
                )
                for row in conn.execute(stmt)
            ]

    @staticmethod
    def _output_source(row: Any) -> str:
        return "human" if row.feedback_output is not None else row.source

    def counters(self, tenant: str, namespace: str) -> dict[str, int]:
        """The counters of a namespace: captured, kept, discarded, untriaged, distilled (kept pairs that
        went into a corpus) and merged (pairs in a deployed artifact). Retention changes none of them."""
        with self.engine.connect() as conn:
            return self._counters_in(conn, tenant, namespace)

    @staticmethod
    def _counters_in(conn: Any, tenant: str, namespace: str) -> dict[str, int]:
        c = namespace_counters.c
        stmt = select(*(c[name] for name in _COUNTERS)).where(c.tenant == tenant, c.namespace == namespace)
        row = conn.execute(stmt).first()
        counts = dict(zip(_COUNTERS, map(int, row), strict=True)) if row is not None else dict.fromkeys(_COUNTERS, 0)
        return {
            "captured": counts["captured"],
            "kept": counts["kept"],
            "discarded": counts["discarded"],
            "untriaged": counts["captured"] - counts["kept"] - counts["discarded"],
            "distilled": counts["distilled"],
            "merged": counts["merged"],
        }

    def recount(self, tenant: str, namespace: str, actor: str) -> dict[str, int]:
        """Count the namespace's captures row by row and store the result as its counters; returns the
        counters as they were. The repair for counters a writer left behind: a process of a version from
        before migration 6 still running against an upgraded store inserts captures without counting them.
        A change is written to the audit log. Writers and triages may go on meanwhile: the counters row is
        locked first, so what they commit before the count is in it and what they add after waits for it."""
        c = captures.c
        with self.engine.begin() as conn:
            conn.execute(_ADD_TO_COUNTERS, {"tenant": tenant, "namespace": namespace, **dict.fromkeys(_COUNTERS, 0)})
            before = self._counters_in(conn, tenant, namespace)
            stored = {name: before[name] for name in _COUNTERS}
            rows = conn.execute(
                select(c.triage_state, func.count(c.id), func.count(c.distilled_at), func.count(c.merged_at))
                .where(c.tenant == tenant, c.namespace == namespace)
                .group_by(c.triage_state)
            ).all()
            by_state = {state: int(count) for state, count, _, _ in rows}
            counted = {
                "captured": sum(by_state.values()),
                "kept": by_state.get("kept", 0),
                "discarded": by_state.get("discarded", 0),
                "distilled": sum(int(row[2]) for row in rows),
                "merged": sum(int(row[3]) for row in rows),
            }
            conn.execute(
                update(namespace_counters)
                .where(namespace_counters.c.tenant == tenant, namespace_counters.c.namespace == namespace)
                .values(**counted)
            )
            if counted != stored:
                self._audit(conn, tenant, namespace, "counters.recount", {"before": stored, "after": counted}, actor)
        return before

    def _add_to_counters(self, conn: Any, changes: Mapping[tuple[str, str], Mapping[str, int]]) -> None:
        """Add `changes` (counter name → amount, per tenant and namespace) to the stored counters, in the
        caller's transaction. Namespaces go in sorted order, so two PostgreSQL writers never wait on each
        other's rows crosswise."""
        for (tenant, namespace), change in sorted(changes.items()):
            amounts = {name: int(change.get(name, 0)) for name in _COUNTERS}
            if any(amounts.values()):
                conn.execute(_ADD_TO_COUNTERS, {"tenant": tenant, "namespace": namespace, **amounts})

    def status(self, tenant: str, namespace: str) -> dict[str, Any]:
        """Counters and switches of a namespace, as the status route and `kolm capture status` show them."""
        settings = self.namespace_settings(tenant, namespace)
        return {
            "namespace": namespace,
            "counters": self.counters(tenant, namespace),
            "switches": settings.switches(),
            "redaction": sorted(settings.redact_entities) if settings.redact_entities is not None else "all",
        }

    def observation(self, tenant: str, namespace: str) -> dict[str, Any]:
        """What a Dagster observation of the namespace's captures reports: counters and the newest capture
        (the last stored, highest id) with the time it was made."""
        c = captures.c
        ours = (c.tenant == tenant, c.namespace == namespace)
        if self.engine.dialect.name == "sqlite":
            # The newest id of each triage state is the last entry of its part of the (tenant, namespace,
            # triage_state) index, which ends in the row id: three lookups. Ordering the namespace's rows by
            # id sorted them all (0.12 s at 200,000).
            newest = [select(func.max(c.id)).where(*ours, c.triage_state == state) for state in TRIAGE_STATES]
            newest_id = select(func.max(union_all(*newest).subquery().c[0])).scalar_subquery()
            stmt = select(c.id, c.created_at).where(c.id == newest_id)
        else:  # PostgreSQL walks its primary key backwards
            stmt = select(c.id, c.created_at).where(*ours).order_by(c.id.desc()).limit(1)
        with self.engine.connect() as conn:
            last = conn.execute(stmt).first()
        return {
            "counters": self.counters(tenant, namespace),
            "last_capture_id": last.id if last is not None else None,
            "last_capture_at": _utc(last.created_at).isoformat() if last is not None else None,
        }

    def namespaces(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """Every (tenant, namespace) with at least one capture, optionally of one tenant."""
        c = namespace_counters.c
        stmt = select(c.tenant, c.namespace).where(c.captured > 0)
        if tenant is not None:
            stmt = stmt.where(c.tenant == tenant)
        stmt = stmt.order_by(c.tenant, c.namespace)
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
                    created_at=self._now(),
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

    def audit(self, tenant: str, namespace: str | None, action: str, detail: dict[str, Any], actor: str) -> None:
        with self.engine.begin() as conn:
            self._audit(conn, tenant, namespace, action, detail, actor)

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
