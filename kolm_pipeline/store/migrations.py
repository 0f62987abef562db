"""Schema migrations of the capture store: a numbered list of steps and a version table.

Each step is written against the schema the step before it left, with alembic's operations (so column
additions work on SQLite and PostgreSQL alike) and never edited once shipped; `tables.py` is the result
of running them all. A database made before versioning existed (it has `captures` but no version table)
is taken to be at version 1. Concurrent starters wait for one another: on PostgreSQL behind an advisory
lock, on SQLite behind the database's write lock, taken before the versions are read (`BEGIN IMMEDIATE`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import OperationalError

from kolm_pipeline.store.tables import schema_versions

_LOCK_ID = 0x6B6F6C6D  # "kolm"
# How long a SQLite starter waits for another one's migration (each attempt waits the busy timeout).
_SQLITE_LOCK_WAIT_S = 600.0


def _v1_baseline(op: Operations, _conn: Connection) -> None:
    """The tables as they were before versioning."""
    op.create_table(
        "tenants",
        Column("name", String(63), primary_key=True),
        Column("key_hash", String(64), nullable=False, unique=True),
        Column("key_prefix", String(16), nullable=False, index=True),
        Column("capture_only", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "captures",
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
        Column("tags", Text, nullable=False),
        Column("streamed", Boolean, nullable=False),
        Column("triage_state", String(16), nullable=False),
        Column("triaged_by", String(255)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("feedback_output", Text),
        CheckConstraint("provider IN ('openai', 'anthropic')", name="ck_captures_provider"),
        CheckConstraint("status IN ('ok', 'error', 'incomplete')", name="ck_captures_status"),
        CheckConstraint("triage_state IN ('untriaged', 'kept', 'discarded')", name="ck_captures_triage_state"),
    )
    op.create_index("ix_captures_tenant_namespace_triage", "captures", ["tenant", "namespace", "triage_state"])
    op.create_table(
        "triage_rules",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("tenant", String(63), nullable=False),
        Column("namespace", String(63), nullable=False),
        Column("action", String(16), nullable=False),
        Column("match_json", Text, nullable=False),
        Column("created_by", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        CheckConstraint("action IN ('keep', 'discard')", name="ck_triage_rules_action"),
    )
    op.create_index("ix_triage_rules_tenant_namespace", "triage_rules", ["tenant", "namespace"])
    op.create_table(
        "registry",
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
    op.create_table(
        "audit_log",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("tenant", String(63), nullable=False),
        Column("namespace", String(63)),
        Column("action", String(64), nullable=False),
        Column("detail_json", Text, nullable=False),
        Column("actor", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_audit_log_tenant_namespace", "audit_log", ["tenant", "namespace"])


def _v2_retention_and_counters(op: Operations, conn: Connection) -> None:
    """Per-tenant HMAC secrets (made on first use, also for tenants that only exist in captures), body
    digests, retention, distilled/merged marks, ratings, implicit signals and per-namespace switches."""
    op.create_table(
        "tenant_secrets",
        Column("tenant", String(63), primary_key=True),
        Column("hmac_secret", String(64), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    for column in (
        Column("feedback_rating", Integer),
        Column("input_hmac", String(64)),
        Column("output_hmac", String(64)),
        Column("expired_at", DateTime(timezone=True)),
        Column("distilled_at", DateTime(timezone=True)),
        Column("merged_at", DateTime(timezone=True)),
        Column("implicit_signal", String(32)),
    ):
        op.add_column("captures", column)
    op.create_index("ix_captures_tenant_namespace_input_hmac", "captures", ["tenant", "namespace", "input_hmac"])
    op.create_index("ix_captures_expired_created", "captures", ["expired_at", "created_at"])
    op.create_table(
        "namespace_settings",
        Column("tenant", String(63), primary_key=True),
        Column("namespace", String(63), primary_key=True),
        Column("retention_days", Integer),
        Column("implicit_signals", Boolean, nullable=False),
        Column("distill_ready", Boolean, nullable=False),
        Column("redact_entities", Text),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


def _v3_capture_source(op: Operations, _conn: Connection) -> None:
    """Where each pair came from (proxy traffic, or an import by a person, an AI peer or a plain file);
    every row captured before this step came through the proxy."""
    op.add_column(
        "captures",
        Column(
            "source",
            String(16),
            CheckConstraint("source IN ('capture', 'human', 'ai', 'import')", name="ck_captures_source"),
            nullable=False,
            server_default="capture",
        ),
    )


def _v4_retry_digest(op: Operations, conn: Connection) -> None:
    """Retries are looked up by a copy of the input digest that only namespaces with implicit signals keep,
    under a partial index. The index of every capture's digest it replaces sat on random keys: each insert
    dirtied a page of its own, about half of what inserting a capture cost the writer."""
    op.add_column("captures", Column("retry_digest", String(64)))
    op.drop_index("ix_captures_tenant_namespace_input_hmac", table_name="captures")
    only_kept = text("retry_digest IS NOT NULL")
    op.create_index(
        "ix_captures_retry_digest",
        "captures",
        ["tenant", "namespace", "retry_digest"],
        sqlite_where=only_kept,
        postgresql_where=only_kept,
    )
    conn.execute(
        text(
            "UPDATE captures SET retry_digest = input_hmac WHERE EXISTS (SELECT 1 FROM namespace_settings s"
            " WHERE s.tenant = captures.tenant AND s.namespace = captures.namespace AND s.implicit_signals)"
        )
    )


_V5_CHECKS = {
    "ck_captures_provider": ("provider", ("openai", "anthropic")),
    "ck_captures_status": ("status", ("ok", "error", "incomplete")),
    "ck_captures_triage_state": ("triage_state", ("untriaged", "kept", "discarded")),
    "ck_captures_source": ("source", ("capture", "human", "ai", "import")),
}
_SQLITE_IN_CHECK = re.compile(r"CONSTRAINT (\w+) CHECK \((\w+) IN \(([^)]*)\)\)")


def _any_of(column: str, values: tuple[str, ...]) -> str:
    return " OR ".join(f"{column} = '{value}'" for value in values)


def _v5_checks_without_in_lists(op: Operations, conn: Connection) -> None:
    """The captures table's CHECK constraints as comparisons joined by OR instead of `IN (…)` lists.

    SQLite evaluates a constant IN list of three or more values through a temporary b-tree that it builds
    once per statement run, and an executemany runs the INSERT once per row: the status, triage-state and
    source checks were a large share of the capture writer's work per capture. SQLite cannot
    alter a constraint, so the table is rebuilt as its documentation prescribes (a new table, the rows
    copied with their ids, the old table dropped, the new one renamed, its indexes and any triggers made
    again; views keep naming `captures`). PostgreSQL has no such cost; its constraints are rewritten the
    same way so both schemas say the same.

    Stores migrated before `migrate` began SQLite's transaction itself (`BEGIN IMMEDIATE`) ran this CREATE
    outside it, committed at once (Python's sqlite3 opens one only for INSERT, UPDATE, DELETE): an attempt
    cut off after it may have left an empty `captures_v5` behind, which this step drops first."""
    if conn.dialect.name != "sqlite":
        for name, (column, values) in _V5_CHECKS.items():
            op.drop_constraint(name, "captures", type_="check")
            op.create_check_constraint(name, "captures", _any_of(column, values))
        return
    conn.exec_driver_sql("DROP TABLE IF EXISTS captures_v5")
    table_sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'captures'")
    ddl = table_sql.scalar_one()
    dependent_sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND tbl_name = 'captures'"
        " AND sql IS NOT NULL ORDER BY type"
    )
    dependents = list(dependent_sql.scalars())
    found = {match.group(1) for match in _SQLITE_IN_CHECK.finditer(ddl)}
    if found != set(_V5_CHECKS):
        raise RuntimeError(f"captures has CHECK constraints {sorted(found)}; expected {sorted(_V5_CHECKS)}")

    def rewritten(match: re.Match[str]) -> str:
        column, values = _V5_CHECKS[match.group(1)]
        return f"CONSTRAINT {match.group(1)} CHECK ({_any_of(column, values)})"

    new_ddl = _SQLITE_IN_CHECK.sub(rewritten, ddl).replace("CREATE TABLE captures", "CREATE TABLE captures_v5", 1)
    columns = ", ".join(row[1] for row in conn.exec_driver_sql("PRAGMA table_info(captures)"))
    conn.exec_driver_sql(new_ddl)
    conn.exec_driver_sql(f"INSERT INTO captures_v5 ({columns}) SELECT {columns} FROM captures")
    conn.exec_driver_sql("DROP TABLE captures")
    # Without the legacy rename SQLite re-checks every view while `captures` is missing, and fails on one
    # that reads it; with it, such a view simply reads the new table, which has the old one's name.
    conn.exec_driver_sql("PRAGMA legacy_alter_table = ON")
    try:
        conn.exec_driver_sql("ALTER TABLE captures_v5 RENAME TO captures")
    finally:
        conn.exec_driver_sql("PRAGMA legacy_alter_table = OFF")
    for statement in dependents:
        conn.exec_driver_sql(statement)


def _v6_namespace_counters(op: Operations, conn: Connection) -> None:
    """Counters kept per namespace instead of counted from the captures on every read; filled from them."""
    op.create_table(
        "namespace_counters",
        Column("tenant", String(63), primary_key=True),
        Column("namespace", String(63), primary_key=True),
        Column("captured", BigInteger, nullable=False),
        Column("kept", BigInteger, nullable=False),
        Column("discarded", BigInteger, nullable=False),
        Column("distilled", BigInteger, nullable=False),
        Column("merged", BigInteger, nullable=False),
    )
    conn.exec_driver_sql(
        "INSERT INTO namespace_counters (tenant, namespace, captured, kept, discarded, distilled, merged) "
        "SELECT tenant, namespace, COUNT(*), "
        "SUM(CASE WHEN triage_state = 'kept' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN triage_state = 'discarded' THEN 1 ELSE 0 END), "
        "COUNT(distilled_at), COUNT(merged_at) FROM captures GROUP BY tenant, namespace"
    )


def _v7_tenant_keys(op: Operations, conn: Connection) -> None:
    """More than one kolm key per tenant, each with a public id, issued and revoked apart. Each tenant's
    key so far becomes its first listed key (id: the first 8 hex digits of its hash, longer on a clash)."""
    op.create_table(
        "tenant_keys",
        Column("key_id", String(16), primary_key=True),
        Column("tenant", String(63), nullable=False, index=True),
        Column("key_hash", String(64), nullable=False, unique=True),
        Column("key_prefix", String(16), nullable=False, index=True),
        Column("capture_only", Boolean, nullable=False),
        Column("created_by", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("revoked_by", String(255)),
        Column("revoked_at", DateTime(timezone=True)),
    )
    taken: set[str] = set()
    rows = conn.exec_driver_sql("SELECT name, key_hash, key_prefix, capture_only, created_at FROM tenants")
    for name, key_hash, key_prefix, capture_only, created_at in sorted(rows.all()):
        length = 8
        while key_hash[:length] in taken:
            length += 2
        taken.add(key_hash[:length])
        conn.execute(
            text(
                "INSERT INTO tenant_keys (key_id, tenant, key_hash, key_prefix, capture_only, created_by, created_at)"
                " VALUES (:key_id, :tenant, :key_hash, :key_prefix, :capture_only, 'store', :created_at)"
            ),
            {"key_id": key_hash[:length], "tenant": name, "key_hash": key_hash, "key_prefix": key_prefix,
             "capture_only": capture_only, "created_at": created_at},
        )



def _v8_merged_counts_published_runs(_op: Operations, conn: Connection) -> None:
    """`merged` counts distill runs that cleared the gate and were published (the deployment stage's swap rows
    in the registry, task `tenant.namespace`), no longer the pairs of deployed corpora: until now it read like a
    second `distilled`. Each capture's `merged_at` keeps saying that the pair is in a deployed artifact."""
    conn.execute(
        text(
            "UPDATE namespace_counters SET merged = (SELECT COUNT(*) FROM registry r"
            " WHERE r.task = namespace_counters.tenant || '.' || namespace_counters.namespace"
            " AND r.decision = 'swap' AND r.details_json LIKE :mark)"
        ),
        {"mark": '%"current":%'},
    )


def _v9_student_routing(op: Operations, _conn: Connection) -> None:
    """Routing through the capture endpoint (issue 23): who answered each capture, the namespace's routing
    switches, and the requests both the teacher and the deployed adapter answered."""
    op.add_column("captures", Column("served_by", String(128)))
    for column in (Column("routing", String(16)), Column("routing_target", Float), Column("canary_share", Float),
                   Column("shadow_min", Integer)):
        op.add_column("namespace_settings", column)
    op.create_table(
        "student_comparisons",
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
        CheckConstraint("kind = 'shadow' OR kind = 'canary' OR kind = 'escalated'",
                        name="ck_student_comparisons_kind"),
    )
    op.create_index("ix_student_comparisons_namespace_cid", "student_comparisons",
                    ["tenant", "namespace", "adapter_cid"])


def _v10_signing_keys(op: Operations, _conn: Connection) -> None:
    """Tenants' public signing keys in the store, for serving replicas without a shared KOLM_HOME."""
    op.create_table(
        "signing_keys",
        Column("keyid", String(64), primary_key=True),
        Column("tenant", String(63), nullable=False),
        Column("public_key", String(64), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )


def _v11_tripwire_states(op: Operations, _conn: Connection) -> None:
    """The collapse tripwire's state per task in the store (it was `work/<task>/tripwire.json`, imported by the
    first run that reads it: `stages/workdir.py: tripwire_ledger`)."""
    op.create_table(
        "tripwire_states",
        Column("task", String(255), primary_key=True),
        Column("state_json", Text, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


def _v12_work_products(op: Operations, _conn: Connection) -> None:
    """Work products by CID (they were files under `work/<task>/`, read by path), with their receipts."""
    op.create_table(
        "work_products",
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("task", String(255), nullable=False),
        Column("stage", String(32), nullable=False),
        Column("cid", String(128), nullable=False),
        Column("directory", Boolean, nullable=False),
        Column("receipt_cid", String(128)),
        Column("receipt", Text),
        Column("capture_ids", Text),
        Column("unnamed_rows", Integer, nullable=False),
        Column("drawn_rows", Integer),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("removed_at", DateTime(timezone=True)),
    )
    op.create_index("ix_work_products_task_stage", "work_products", ["task", "stage"])
    op.create_index("ix_work_products_receipt", "work_products", ["receipt_cid"])


def _v13_capture_images(op: Operations, _conn: Connection) -> None:
    """Images of captures stored by digest outside the capture row, and a per-namespace byte limit on them."""
    op.create_table(
        "capture_images",
        Column("request_id", String(64), nullable=False),
        Column("tenant", String(63), nullable=False),
        Column("namespace", String(63), nullable=False),
        Column("digest", String(64), nullable=False),
        Column("media_type", String(32), nullable=False),
        Column("bytes", BigInteger, nullable=False),
        UniqueConstraint("request_id", "digest", name="uq_capture_images_request_digest"),
    )
    op.create_index("ix_capture_images_digest", "capture_images", ["digest"])
    op.create_index("ix_capture_images_namespace", "capture_images", ["tenant", "namespace"])
    op.add_column("namespace_settings", Column("image_bytes_limit", BigInteger))


MIGRATIONS: list[tuple[int, str, Callable[[Operations, Connection], None]]] = [
    (1, "baseline tables", _v1_baseline),
    (2, "retention, counters and switches", _v2_retention_and_counters),
    (3, "capture source", _v3_capture_source),
    (4, "retry digest", _v4_retry_digest),
    (5, "checks without IN lists", _v5_checks_without_in_lists),
    (6, "namespace counters", _v6_namespace_counters),
    (7, "tenant keys", _v7_tenant_keys),
    (8, "merged counts published distill runs", _v8_merged_counts_published_runs),
    (9, "student routing", _v9_student_routing),
    (10, "signing keys", _v10_signing_keys),
    (11, "tripwire states", _v11_tripwire_states),
    (12, "work products", _v12_work_products),
    (13, "capture images", _v13_capture_images),
]
LATEST = MIGRATIONS[-1][0]


def applied_versions(conn: Connection) -> set[int]:
    if not inspect(conn).has_table(schema_versions.name):
        return set()
    return set(conn.execute(select(schema_versions.c.version)).scalars())


def migrate(engine: Engine) -> list[int]:
    """Bring the database to the newest schema; returns the versions applied now (empty when current)."""
    deadline = time.monotonic() + _SQLITE_LOCK_WAIT_S
    while True:
        try:
            with engine.connect() as conn:  # on SQLite, connecting sets WAL mode: it too waits for the lock
                if _current(applied_versions(conn)):
                    return []
            return _migrate(engine)
        except OperationalError as exc:  # another starter holds the write lock longer than the busy timeout
            if engine.dialect.name != "sqlite" or "locked" not in str(exc.orig) or time.monotonic() > deadline:
                raise


def _current(done: set[int]) -> bool:
    return len(done) == len(MIGRATIONS) and max(done) == LATEST


def _migrate(engine: Engine) -> list[int]:
    """Apply the missing steps in one transaction that holds the lock against other starters."""
    applied_now: list[int] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        elif conn.dialect.name == "sqlite":
            # Python's sqlite3 would begin a transaction only at the first INSERT: DDL before it ran on its own.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        done = applied_versions(conn)
        if _current(done):
            return []
        inspector = inspect(conn)
        if not inspector.has_table(schema_versions.name):
            schema_versions.create(conn)
            if inspector.has_table("captures"):
                _record(conn, 1, MIGRATIONS[0][1])
                done = {1}
        op = Operations(MigrationContext.configure(conn))
        for version, name, step in MIGRATIONS:
            if version in done:
                continue
            step(op, conn)
            _record(conn, version, name)
            applied_now.append(version)
    return applied_now


def _record(conn: Connection, version: int, name: str) -> None:
    conn.execute(insert(schema_versions).values(version=version, name=name, applied_at=datetime.now(UTC)))
