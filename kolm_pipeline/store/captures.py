"""Writing captures (the capture writer's batch insert, imports, implicit retry signals) and reading them
back (listing, lookup by id or request id, ownership checks), and deleting a namespace's captures."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

from sqlalchemy import delete, event, insert, select, update

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.provenance.jsontext import dumps_compact
from kolm_pipeline.store.base import (
    _CHUNK,
    IMPLICIT_RETRY_WINDOW,
    StoreBase,
    _chunks,
    _utc,
    canonical_messages,
    canonical_text,
)
from kolm_pipeline.store.capture_rows import (
    _CAPTURE_BOUND_COLUMNS,
    _CAPTURE_COLUMNS,
    _NEW_CAPTURE_CONSTANTS,
    _capture,
    _DriverInsert,
    _Retry,
    _rows_of,
    _sql_literal,
    sqlite_datetime_text,
)
from kolm_pipeline.store.capture_search import CaptureFilter
from kolm_pipeline.store.namespaces import validate_namespace, validate_tenant
from kolm_pipeline.store.records import Capture, ImportOutcome, NewCapture
from kolm_pipeline.store.tables import (
    CAPTURE_SOURCES,
    capture_images,
    captures,
    namespace_counters,
    namespace_settings,
    student_comparisons,
    triage_rules,
)


class CaptureQueries(StoreBase):
    """Inserting, importing, reading and deleting captures."""

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

    def insert_captures(self, records: list[NewCapture]) -> list[int]:
        """Insert a batch in one transaction by the capture writer's own path (`insert_captures_once`);
        returns the new ids in the order of `records`. A request id already stored, or repeated in the
        batch, fails the whole batch instead of being skipped."""
        if not records:
            return []
        with self.engine.begin() as conn:
            written = self._write_captures(conn, records)
            if written != len(records):
                raise InvalidInput(f"{len(records) - written} of {len(records)} request ids are already stored")
            request_ids = [record.request_id for record in records]
            ids: dict[str, int] = {}
            for chunk in _chunks(request_ids):
                stmt = select(captures.c.request_id, captures.c.id).where(captures.c.request_id.in_(chunk))
                ids.update(conn.execute(stmt).tuples().all())
        return [ids[request_id] for request_id in request_ids]

    def insert_captures_once(self, records: list[NewCapture]) -> None:
        """Insert a batch, skipping records whose request id is already stored: replaying a batch whose
        first write did commit (but was not acknowledged) leaves every capture there exactly once."""
        if not records:
            return
        with self.engine.begin() as conn:
            self._write_captures(conn, records)

    def _write_captures(self, conn: Any, records: list[NewCapture]) -> int:
        """The capture writer's INSERT … ON CONFLICT DO NOTHING of `records` in the caller's transaction,
        with their implicit signals and counters; returns how many rows it inserted."""
        driver_insert = self._capture_insert_sql
        captured: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"captured": 0})
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
        image_rows = [{"request_id": record.request_id, "tenant": record.tenant, "namespace": record.namespace,
                       "digest": digest, "media_type": media_type, "bytes": size}
                      for record in records for digest, media_type, size in record.images]
        if image_rows:  # a replayed batch finds its rows there already
            conn.execute(self._insert()(capture_images).on_conflict_do_nothing(
                index_elements=["request_id", "digest"]), image_rows)
        return sum(change["captured"] for change in captured.values())

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
                    record.served_by,
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
        """A tenant's captures, newest first, filtered by any of namespace, triage state, status, model, tag
        (`capture_search.CaptureFilter` has every filter)."""
        if limit < 0 or offset < 0:
            raise InvalidInput("limit and offset must not be negative")
        where = CaptureFilter(namespace=namespace, state=triage_state, status=status, model=model, tag=tag)
        stmt = where.statement(tenant).order_by(captures.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_capture(row) for row in conn.execute(stmt)]

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

    def seen_input(self, tenant: str, namespace: str, messages: list[dict[str, Any]]) -> bool:
        """Whether this conversation was captured before in the namespace, expired text included."""
        digest = self.input_digest(tenant, messages)
        stmt = select(captures.c.id).where(
            captures.c.tenant == tenant, captures.c.namespace == namespace, captures.c.input_hmac == digest
        )
        with self.engine.connect() as conn:
            return conn.execute(stmt.limit(1)).first() is not None

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
            conn.execute(delete(student_comparisons).where(student_comparisons.c.tenant == tenant,
                                                           student_comparisons.c.namespace == namespace))
            self._audit(conn, tenant, namespace, "namespace.delete", {"captures": deleted}, actor)
        return deleted
