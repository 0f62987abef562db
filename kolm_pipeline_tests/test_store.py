"""The capture store on SQLite and PostgreSQL: tenants, captures, triage, rules, feedback, registry."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from sqlalchemy import select, text, update

from kolm_pipeline.store import (
    CaptureStore,
    NewCapture,
    partition_key,
    split_partition_key,
    validate_namespace,
)
from kolm_pipeline.store.tables import TRIAGE_STATES, audit_log, captures, metadata, tenants

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[CaptureStore]:
    """A fresh store; on PostgreSQL a throwaway database so parallel runs never share tables."""
    if request.param == "sqlite":
        capture_store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
        yield capture_store
        capture_store.close()
        return
    db = f"kolm_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        capture_store = CaptureStore(PG_URL.format(db=db))
        try:
            yield capture_store
        finally:
            capture_store.close()
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def capture(n: int, *, namespace: str = "support", status: str = "ok", tenant: str = "acme", **kw) -> NewCapture:
    fields = {
        "request_id": uuid.uuid4().hex,
        "tenant": tenant,
        "namespace": namespace,
        "provider": "openai",
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": f"question {n}"}],
        "output_text": f"answer {n}",
        "latency_us": 1000 + n,
        "status": status,
        "http_status": 200 if status == "ok" else 500,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "tags": [],
        "streamed": False,
    }
    fields.update(kw)
    return NewCapture(**fields)


def test_namespace_rules() -> None:
    assert validate_namespace("support-v2_x") == "support-v2_x"
    for bad in ["", "Support", "a.b", "-lead", "x" * 64, "tab\t", "ok\n", None]:
        with pytest.raises(ValueError):
            validate_namespace(bad)
    assert partition_key("acme", "support") == "acme.support"
    assert split_partition_key("acme.support") == ("acme", "support")
    for bad_key in ["acme", "a.b.c", "Acme.support", ".support"]:
        with pytest.raises(ValueError):
            split_partition_key(bad_key)


def test_tenant_keys_are_hashed(store: CaptureStore) -> None:
    key = store.create_tenant("acme")
    assert key.startswith("kolm_") and len(key) > 40
    tenant = store.tenant_for_key(key)
    assert tenant is not None and tenant.name == "acme" and not tenant.capture_only
    assert tenant.created_at.tzinfo is not None
    assert store.tenant_for_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.tenant_for_key("nope") is None
    with store.engine.connect() as conn:
        row = conn.execute(select(tenants)).one()
    assert key not in [str(value) for value in row]
    with pytest.raises(ValueError, match="already exists"):
        store.create_tenant("acme")
    with pytest.raises(ValueError):
        store.create_tenant("Bad.Name")
    with pytest.raises(ValueError):
        store.create_tenant_key("Bad.Name")
    reader = store.tenant_for_key(store.create_tenant("shop", capture_only=True))
    assert reader is not None and reader.capture_only


def test_insert_list_get(store: CaptureStore) -> None:
    ids = store.insert_captures([capture(1, tags=["a", "b"]), capture(2, streamed=True), capture(3, namespace="ops")])
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.insert_captures([]) == []
    newest_first = store.list_captures("acme")
    assert [c.id for c in newest_first] == ids[::-1]
    assert [c.id for c in store.list_captures("acme", namespace="support")] == ids[1::-1]
    assert [c.id for c in store.list_captures("acme", limit=1, offset=1)] == [ids[1]]
    assert store.list_captures("other") == []
    first = store.get_capture("acme", ids[0])
    assert first is not None
    assert first.messages == [{"role": "user", "content": "question 1"}]
    assert (first.tags, first.streamed, first.triage_state, first.feedback_output) == (
        ["a", "b"],
        False,
        "untriaged",
        None,
    )
    assert first.created_at.tzinfo == UTC
    assert store.get_capture("other", ids[0]) is None
    with pytest.raises(ValueError):
        store.insert_captures([capture(4, namespace="Bad NS")])
    with pytest.raises(ValueError):
        store.list_captures("acme", triage_state="maybe")


def test_set_triage_never_keeps_failed_captures(store: CaptureStore) -> None:
    ok, error, incomplete = store.insert_captures(
        [capture(1), capture(2, status="error"), capture(3, status="incomplete")]
    )
    assert store.set_triage("acme", [ok, error, incomplete], "kept", "alice") == 1
    assert store.get_capture("acme", ok).triage_state == "kept"
    assert store.get_capture("acme", ok).triaged_by == "alice"
    assert store.get_capture("acme", error).triage_state == "untriaged"
    assert store.get_capture("acme", incomplete).triage_state == "untriaged"
    assert store.set_triage("acme", [ok], "kept", "alice") == 0
    assert store.set_triage("other", [error], "discarded", "mallory") == 0
    assert store.set_triage("acme", [error, incomplete], "discarded", "alice") == 2
    with pytest.raises(ValueError):
        store.set_triage("acme", [ok], "maybe", "alice")
    actions = [row.action for row in store.audit_rows("acme", "support")]
    assert actions == ["triage.discarded", "triage.kept"]
    assert store.audit_rows("acme", "support")[1].detail == {"ids": [ok]}


def test_rules(store: CaptureStore) -> None:
    ids = store.insert_captures(
        [
            capture(1, tags=["gold"]),
            capture(2, output_text="I cannot help with that"),
            capture(3, status="error", output_text=""),
            capture(4, status="incomplete", tags=["gold"]),
            capture(5, model="gpt-4o-mini"),
            capture(6, namespace="ops", tags=["gold"]),
        ]
    )
    for action, match in [
        ("keep", {"colour": "red"}),
        ("keep", {"status": "error"}),
        ("keep", {"output_regex": "("}),
        ("promote", {}),
        ("keep", {"model": 4}),
    ]:
        with pytest.raises(ValueError):
            store.add_rule("acme", "support", action, match, "alice")

    assert store.apply_rules("acme", "support") == {"kept": 0, "discarded": 0}
    store.add_rule("acme", "support", "discard", {"output_regex": r"(?i)cannot help"}, "alice")
    store.add_rule("acme", "support", "keep", {"tag": "gold"}, "alice")
    store.add_rule("acme", "support", "discard", {"status": "error"}, "alice")
    store.add_rule("acme", "support", "keep", {"model": "gpt-4o-mini"}, "alice")
    assert [r.match for r in store.rules("acme", "support")][0] == {
        "status": "ok",
        "output_regex": r"(?i)cannot help",
    }

    assert store.apply_rules("acme", "support") == {"kept": 2, "discarded": 2}
    states = {c.id: c.triage_state for c in store.list_captures("acme")}
    assert states == {
        ids[0]: "kept",
        ids[1]: "discarded",
        ids[2]: "discarded",
        ids[3]: "untriaged",  # incomplete: no rule may keep it
        ids[4]: "kept",
        ids[5]: "untriaged",  # other namespace
    }
    assert store.get_capture("acme", ids[0]).triaged_by.startswith("rule:")
    assert store.apply_rules("acme", "support") == {"kept": 0, "discarded": 0}


def test_feedback_and_kept_pairs(store: CaptureStore) -> None:
    first, second, failed, untriaged = store.insert_captures(
        [capture(1, tags=["x"]), capture(2), capture(3, status="error"), capture(4)]
    )
    store.set_triage("acme", [second, first, failed], "kept", "alice")
    store.set_feedback("acme", second, "corrected answer", "bob")
    with pytest.raises(LookupError):
        store.set_feedback("acme", 999_999, "x", "bob")
    with pytest.raises(LookupError):
        store.set_feedback("other", first, "x", "mallory")
    pairs = store.kept_pairs("acme", "support")
    assert [p.id for p in pairs] == [first, second]
    assert pairs[0].output == "answer 1" and pairs[0].tags == ["x"]
    assert pairs[1].output == "corrected answer"
    store.set_feedback("acme", first, None, "bob", rating=5)
    assert store.get_capture("acme", first).feedback_rating == 5
    assert store.kept_pairs("acme", "support")[0].output == "answer 1"
    for output, rating in [(None, None), (None, 0), (None, 6), (None, True)]:
        with pytest.raises(ValueError):
            store.set_feedback("acme", first, output, "bob", rating=rating)
    assert pairs[0].messages == [{"role": "user", "content": "question 1"}]
    assert (pairs[0].prompt_tokens, pairs[0].completion_tokens, pairs[0].latency_us) == (3, 2, 1001)
    assert store.get_capture("acme", second).output_text == "answer 2"
    assert untriaged not in [p.id for p in pairs]


def test_counters_and_namespaces(store: CaptureStore) -> None:
    zero = {"captured": 0, "kept": 0, "discarded": 0, "untriaged": 0, "distilled": 0, "merged": 0}
    assert store.counters("acme", "support") == zero
    ids = store.insert_captures([capture(i) for i in range(5)] + [capture(9, namespace="ops", tenant="shop")])
    store.set_triage("acme", ids[:3], "kept", "alice")
    store.set_triage("acme", ids[3:4], "discarded", "alice")
    # Only kept pairs of the named tenant and namespace are marked; marking twice counts once.
    assert store.mark_distilled("acme", "support", [*ids[:3], ids[3], ids[5]]) == 3
    assert store.mark_distilled("acme", "support", ids[:3]) == 0
    assert store.mark_merged("acme", "support", ids[:1]) == 1
    assert store.mark_merged("shop", "ops", ids[:1]) == 0
    assert store.counters("acme", "support") == {
        "captured": 5,
        "kept": 3,
        "discarded": 1,
        "untriaged": 1,
        "distilled": 3,
        "merged": 0,  # distill runs published (registry rows of the deployment stage), not pairs: none here
    }
    assert store.counters("shop", "ops")["captured"] == 1
    assert store.namespaces() == [("acme", "support"), ("shop", "ops")]
    assert store.namespaces("shop") == [("shop", "ops")]
    assert [row.action for row in store.audit_rows("acme", "support")][:2] == ["artifact.merged", "corpus.distilled"]


def test_registry_and_audit(store: CaptureStore) -> None:
    first = store.add_registry_row("support", None, "bafkreia", None, 0.71, "swap", "kolm", {"delta": 0.71})
    second = store.add_registry_row("support", "bafkreia", "bafkreib", 0.71, 0.70, "refuse", "kolm", {})
    store.add_registry_row("other", None, "bafkreic", None, 0.5, "swap", "kolm", {})
    rows = store.registry_rows("support")
    assert [r.id for r in rows] == [second, first]
    assert rows[1].details == {"delta": 0.71} and rows[1].from_cid is None and rows[0].k_before == 0.71
    assert len(store.registry_rows()) == 3
    store.audit("acme", "support", "switch.distill", {"enabled": True}, "alice")
    with store.engine.connect() as conn:
        actions = conn.execute(select(audit_log.c.action).where(audit_log.c.tenant == "acme")).scalars().all()
    assert actions == ["switch.distill"]
    assert store.audit_rows("acme")[0].detail == {"enabled": True}


def test_rotate_key_and_delete_namespace(store: CaptureStore) -> None:
    first = store.create_tenant_key("acme")
    second = store.create_tenant_key("acme")
    assert store.tenant_for_key(first) is None
    assert store.tenant_for_key(second).name == "acme"
    ids = store.insert_captures([capture(1), capture(2), capture(3, namespace="ops")])
    store.add_rule("acme", "support", "keep", {}, "alice")
    assert store.delete_namespace("acme", "support", "alice") == 2
    assert store.rules("acme", "support") == []
    assert [c.id for c in store.list_captures("acme")] == [ids[2]]
    assert store.audit_rows("acme", "support")[0].action == "namespace.delete"


class Clock:
    """A controlled clock: the store reads it for every timestamp it writes."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clocked(store: CaptureStore) -> tuple[CaptureStore, Clock]:
    clock = Clock()
    store.clock = clock
    return store, clock


def test_retention_replaces_bodies_by_hmac(clocked: tuple[CaptureStore, Clock]) -> None:
    store, clock = clocked
    secret_text = "my card is 4111 and my cat is Mittens"
    old = store.insert_captures(
        [capture(1, messages=[{"role": "user", "content": secret_text}], output_text="Mittens reply")]
    )[0]
    store.set_triage("acme", [old], "kept", "alice")
    store.set_feedback("acme", old, "Mittens corrected", "alice")
    store.set_switches("acme", "short", "alice", retention_days=1)
    clock.advance(days=2)
    short = store.insert_captures([capture(2, namespace="short")])[0]
    fresh = store.insert_captures([capture(3)])[0]
    before = store.counters("acme", "support")
    digest = store.get_capture("acme", old).input_hmac

    clock.advance(days=29)  # `old` is 31 days old, `fresh` 29, `short` 29 in a 1-day namespace
    assert store.apply_retention() == {"acme.support": 1, "acme.short": 1}
    assert store.apply_retention() == {}
    expired = store.get_capture("acme", old)
    assert expired.expired_at == clock.now and expired.messages == [] and expired.output_text == ""
    assert expired.input_hmac == digest == store.input_digest("acme", [{"role": "user", "content": secret_text}])
    assert len(expired.output_hmac) == 64 and expired.output_hmac != digest
    assert expired.feedback_output.startswith("hmac-sha256:") and "Mittens" not in expired.feedback_output
    assert store.get_capture("acme", short).expired_at is not None
    assert store.get_capture("acme", fresh).expired_at is None
    # Counters keep counting; an expired pair no longer feeds a corpus and cannot be kept again.
    assert store.counters("acme", "support") == before
    assert [p.id for p in store.kept_pairs("acme", "support")] == []
    store.set_triage("acme", [old], "untriaged", "alice")
    assert store.set_triage("acme", [old], "kept", "alice") == 0
    with pytest.raises(ValueError):
        store.set_feedback("acme", old, "new text", "alice")
    # Dedup still recognises the input; whitespace and case do not matter, the tenant does.
    assert store.seen_input("acme", "support", [{"role": "user", "content": "  MY card is 4111 and my cat is mittens"}])
    assert not store.seen_input("shop", "support", [{"role": "user", "content": secret_text}])
    # The text is gone from every table.
    with store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                assert "Mittens" not in repr(tuple(row)), table.name
    assert "retention.expire" in [row.action for row in store.audit_rows("acme", "support")]


def test_retention_text_gone_from_sqlite_file(tmp_path) -> None:
    clock = Clock()
    path = tmp_path / "captures.db"
    store = CaptureStore(f"sqlite:///{path}", clock=clock, default_retention_days=1)
    store.insert_captures([capture(1, output_text="Xylophone-Quartz-Secret " * 20)])
    clock.advance(days=2)
    assert store.apply_retention() == {"acme.support": 1}
    with store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    for file in tmp_path.iterdir():
        assert b"Xylophone-Quartz-Secret" not in file.read_bytes(), file.name


def test_switches_are_audited(store: CaptureStore) -> None:
    settings = store.namespace_settings("acme", "support")
    assert settings.switches() == {"retention_days": 30, "implicit_signals": False, "distill_ready": False,
                                   "routing": "teacher", "routing_target": 0.98, "canary_share": 0.05,
                                   "shadow_min": 200, "image_bytes_limit": 1 << 30}
    assert settings.redact_entities is None
    store.set_switches("acme", "support", "alice", implicit_signals=True, retention_days=30)
    store.set_switches("acme", "support", "bob", distill_ready=True, redact_entities=["EMAIL"])
    store.set_switches("acme", "support", "bob", distill_ready=True)  # no change, no audit row
    after = store.namespace_settings("acme", "support")
    assert after.switches() == {"retention_days": 30, "implicit_signals": True, "distill_ready": True,
                                "routing": "teacher", "routing_target": 0.98, "canary_share": 0.05,
                                "shadow_min": 200, "image_bytes_limit": 1 << 30}
    assert after.redact_entities == ("EMAIL",)
    assert store.namespace_settings("shop", "support").implicit_signals is False
    audit = [(r.action, r.detail, r.actor) for r in store.audit_rows("acme", "support")][::-1]
    assert audit == [
        ("switch.implicit_signals", {"from": False, "to": True}, "alice"),
        ("switch.distill_ready", {"from": False, "to": True}, "bob"),
        ("switch.redact_entities", {"from": None, "to": ["EMAIL"]}, "bob"),
    ]
    for bad in [{"retention_days": 0}, {"retention_days": True}, {"distill_ready": "on"}, {"colour": 1}]:
        with pytest.raises(ValueError):
            store.set_switches("acme", "support", "alice", **bad)


def test_implicit_signals_only_when_opted_in(clocked: tuple[CaptureStore, Clock]) -> None:
    store, clock = clocked
    question = [{"role": "user", "content": "same question"}]
    first = store.insert_captures([capture(1, messages=question)])[0]
    clock.advance(minutes=1)
    store.insert_captures([capture(2, messages=question)])
    assert store.get_capture("acme", first).implicit_signal is None  # off by default
    store.set_switches("acme", "support", "alice", implicit_signals=True)
    clock.advance(minutes=1)
    again = store.insert_captures([capture(3, messages=question)])[0]
    assert store.get_capture("acme", first).implicit_signal == "retried"
    clock.advance(hours=1)
    store.insert_captures([capture(4, messages=question)])
    assert store.get_capture("acme", again).implicit_signal is None  # too long after: no signal
    store.add_rule("acme", "support", "discard", {"signal": "retried"}, "alice")
    assert store.apply_rules("acme", "support") == {"kept": 0, "discarded": 2}


def test_writer_batch_mixing_empty_columns_is_stored_whole_and_finds_retries(
    clocked: tuple[CaptureStore, Clock],
) -> None:
    """The writer inserts a batch as one INSERT per pattern of empty token counts and retry digests:
    every row of a mixed batch is stored as given, and with implicit signals on a retry in it is found."""
    store, clock = clocked
    question = [{"role": "user", "content": "same question"}]
    first = store.insert_captures([capture(0, messages=question)])[0]
    store.set_switches("acme", "support", "alice", implicit_signals=True)
    clock.advance(minutes=1)
    tokens = [(3, 2), (None, 2), (3, None), (None, None), (7, 1)]
    batch = [capture(n, prompt_tokens=p, completion_tokens=c) for n, (p, c) in enumerate(tokens, start=1)]
    batch.append(capture(9, messages=question, prompt_tokens=None, completion_tokens=None))
    batch.append(capture(10, namespace="sales", prompt_tokens=None))  # signals off there: no retry digest
    store.insert_captures_once(batch)
    stored = {c.request_id: c for ns in ("support", "sales") for c in store.list_captures("acme", ns)}
    assert len(stored) == 8
    for record in batch:
        row = stored[record.request_id]
        assert (row.prompt_tokens, row.completion_tokens, row.output_text) == (
            record.prompt_tokens, record.completion_tokens, record.output_text,
        )  # fmt: skip
    assert store.get_capture("acme", first).implicit_signal == "retried"
    with store.engine.connect() as conn:
        in_order = conn.exec_driver_sql("SELECT request_id FROM captures ORDER BY id").scalars().all()
        digests = dict(conn.exec_driver_sql("SELECT request_id, retry_digest FROM captures").all())
    assert in_order[1:] == [record.request_id for record in batch]  # ids follow the batch's order
    assert all(digests[record.request_id] is not None for record in batch[:-1])
    assert digests[batch[-1].request_id] is None


def test_retries_of_captures_written_while_signals_were_switched_on_are_found(
    clocked: tuple[CaptureStore, Clock],
) -> None:
    """A writer that read the switch as off just before it was turned on commits its rows without a retry
    digest, after the switch's backfill ran; once it sees the switch on it backfills the window itself."""
    store, clock = clocked
    question = [{"role": "user", "content": "is my refund through"}]
    writer = CaptureStore(store.engine.url.render_as_string(hide_password=False), clock=clock)
    writer.insert_captures([capture(1, messages=[{"role": "user", "content": "warm-up"}])])  # sees off
    first = writer.insert_captures([capture(2, messages=question)])[0]
    store.set_switches("acme", "support", "alice", implicit_signals=True)
    with store.engine.begin() as conn:  # the race's outcome: the row committed after the switch's backfill
        conn.execute(update(captures).where(captures.c.id == first).values(retry_digest=None))
    clock.advance(minutes=1)
    writer.insert_captures([capture(3, messages=question)])
    assert store.get_capture("acme", first).implicit_signal == "retried"
    writer.close()


def test_a_rolled_back_write_does_not_count_as_having_backfilled(clocked: tuple[CaptureStore, Clock]) -> None:
    """The first write that sees signals on backfills the window in its own transaction; when that write
    fails and rolls back, so does the backfill, and the next write runs it again."""
    store, clock = clocked
    question = [{"role": "user", "content": "is my refund through"}]
    writer = CaptureStore(store.engine.url.render_as_string(hide_password=False), clock=clock)
    first = writer.insert_captures([capture(1, messages=question)])[0]  # sees off
    store.set_switches("acme", "support", "alice", implicit_signals=True)
    with store.engine.begin() as conn:  # committed after the switch's own backfill, as in the race above
        conn.execute(update(captures).where(captures.c.id == first).values(retry_digest=None))
    with pytest.raises(ValueError, match="commas"):  # backfills, then refuses the batch: all rolled back
        writer.insert_captures_once([capture(2), capture(3, tags=["a,b"])])
    clock.advance(minutes=1)
    writer.insert_captures_once([capture(4, messages=question)])
    assert store.get_capture("acme", first).implicit_signal == "retried"
    writer.close()


def test_insert_once_is_idempotent(store: CaptureStore) -> None:
    records = [capture(1), capture(2)]
    store.insert_captures_once(records)
    store.insert_captures_once([*records, capture(3)])
    assert store.counters("acme", "support")["captured"] == 3


@settings(max_examples=300, deadline=None)
@given(st.datetimes(timezones=st.one_of(st.none(), st.timezones())))
def test_writer_formats_sqlite_times_as_sqlalchemy_does(moment: datetime) -> None:
    """The writer's driver-level INSERT writes times with its own formatter; SQLite compares them as
    text, so it must give exactly what SQLAlchemy's DATETIME processor gives, zone or none."""
    from sqlalchemy import DateTime
    from sqlalchemy.dialects import sqlite

    from kolm_pipeline.store.capture_store import sqlite_datetime_text

    dialect = sqlite.dialect()
    expected = DateTime().dialect_impl(dialect).bind_processor(dialect)(moment)
    assert sqlite_datetime_text(moment) == expected


def test_insert_once_stores_what_insert_stores(store: CaptureStore) -> None:
    """The writer's driver-level INSERT converts every column as SQLAlchemy's (the import path) does: a capture
    reads back the same whichever path wrote it (times, booleans, nulls, non-ASCII text, tags)."""
    shared = {
        "messages": [{"role": "system", "content": "Tu es utile ✓"}, {"role": "user", "content": [{"t": 1}]}],
        "output_text": "réponse — ok",
        "tags": ["a", "b-2"],
        "streamed": True,
        "prompt_tokens": None,
        "created_at": datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
    }
    first = capture(1, **shared)
    second = capture(1, **{**shared, "request_id": uuid.uuid4().hex})
    [by_insert] = store.import_captures([first], actor="test").ids
    store.insert_captures_once([second])
    by_writer = next(c.id for c in store.list_captures("acme", "support") if c.request_id == second.request_id)
    left, right = store.get_capture("acme", by_insert), store.get_capture("acme", by_writer)
    ignored = {"id", "request_id"}
    assert {k: v for k, v in vars(left).items() if k not in ignored} == {
        k: v for k, v in vars(right).items() if k not in ignored
    }
    assert right.created_at == shared["created_at"] and right.streamed is True and right.prompt_tokens is None
    assert right.messages == shared["messages"] and right.tags == ["a", "b-2"]
    with store.engine.connect() as conn:  # as the database holds them: SQL compares these, not Python
        raw = {row.id: row._asdict() for row in conn.exec_driver_sql("SELECT * FROM captures")}
    assert {k: v for k, v in raw[by_insert].items() if k not in ignored} == {
        k: v for k, v in raw[by_writer].items() if k not in ignored
    }


def test_migrations_upgrade_an_unversioned_database(tmp_path) -> None:
    """A database made before versioning (the colleague's first schema) is upgraded in place."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import create_engine, inspect

    from kolm_pipeline.store.migrations import LATEST, MIGRATIONS, applied_versions

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        MIGRATIONS[0][2](Operations(MigrationContext.configure(conn)), conn)
        _insert_old_capture(conn, input_json='[{"role":"user","content":"hi"}]')
    engine.dispose()
    store = CaptureStore(url)
    with store.engine.connect() as conn:
        assert applied_versions(conn) == set(range(1, LATEST + 1))
        inspector = inspect(conn)
        for table in metadata.sorted_tables:
            assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.columns.keys()), table.name
    assert store.counters("acme", "support")["kept"] == 1  # migration 6 counted the rows already there
    assert store.counters("acme", "support") == _recounted(store, "acme", "support")
    assert store.namespaces() == [("acme", "support")]
    assert store.apply_retention() == {"acme.support": 1}
    assert store.get_capture("acme", 1).input_hmac == store.input_digest("acme", [{"role": "user", "content": "hi"}])
    store.close()


def test_fresh_schema_matches_tables(store: CaptureStore) -> None:
    from sqlalchemy import inspect

    with store.engine.connect() as conn:
        inspector = inspect(conn)
        for table in metadata.sorted_tables:
            columns = {c["name"]: c for c in inspector.get_columns(table.name)}
            assert set(columns) == set(table.columns.keys()), table.name
            for column in table.columns:
                assert columns[column.name]["nullable"] == column.nullable, (table.name, column.name)
            indexes = {tuple(i["column_names"]) for i in inspector.get_indexes(table.name)}
            for index in table.indexes:
                assert tuple(c.name for c in index.columns) in indexes, (table.name, index.name)
    CaptureStore(store.engine.url.render_as_string(hide_password=False)).close()  # a second start is a no-op


def test_source_column_defaults_to_capture_and_is_checked(store: CaptureStore) -> None:
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from kolm_pipeline.store.tables import captures

    store.insert_captures([capture(1), capture(2, source="ai")])
    assert [c.source for c in store.list_captures("acme")[::-1]] == ["capture", "ai"]
    with pytest.raises(ValueError, match="invalid source 'robot'"):
        store.insert_captures([capture(3, source="robot")])
    row = {
        "request_id": "raw", "tenant": "acme", "namespace": "support", "provider": "openai", "model": "m",
        "input_json": "[]", "output_text": "", "latency_us": 0, "status": "ok", "http_status": 200, "tags": "",
        "streamed": False, "triage_state": "untriaged", "created_at": datetime.now(UTC),
    }
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(captures).values(**row, source="robot"))
    with store.engine.begin() as conn:
        conn.execute(insert(captures).values(**row))  # the database default, as for rows from before version 3
    assert store.get_capture("acme", max(c.id for c in store.list_captures("acme"))).source == "capture"


def _insert_old_capture(conn, **columns: object) -> None:
    """A capture row written straight into an older schema: the columns every version has, with `columns`
    added or overriding."""
    from sqlalchemy import text

    row = {
        "request_id": "r1", "tenant": "acme", "namespace": "support", "provider": "openai", "model": "m",
        "input_json": "[]", "output_text": "hello", "latency_us": 5, "status": "ok", "http_status": 200, "tags": "",
        "streamed": 0, "triage_state": "kept", "created_at": "2020-01-01 00:00:00", **columns,
    }  # fmt: skip
    names = ", ".join(row)
    conn.execute(text(f"INSERT INTO captures ({names}) VALUES ({', '.join(':' + name for name in row)})"), row)


def _migrate_to(conn, version: int) -> None:
    """Build the schema as the store's migrations left it at `version`."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from kolm_pipeline.store.migrations import MIGRATIONS, _record
    from kolm_pipeline.store.tables import schema_versions

    schema_versions.create(conn)
    for number, name, step in MIGRATIONS[:version]:
        step(Operations(MigrationContext.configure(conn)), conn)
        _record(conn, number, name)


def test_version_2_rows_become_captures(tmp_path) -> None:
    """Upgrading a store made at version 2 marks every existing row as proxy traffic (weight of `capture`)."""
    from sqlalchemy import create_engine


    url = f"sqlite:///{tmp_path / 'v2.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        _migrate_to(conn, 2)
        _insert_old_capture(conn, input_json='[{"role":"user","content":"hi"}]', created_at="2999-01-01 00:00:00")
    engine.dispose()
    upgraded = CaptureStore(url, source_weights={"capture": 0.75, "human": 1.0, "ai": 0.5, "import": 1.0})
    (pair,) = upgraded.kept_pairs("acme", "support")
    assert (pair.source, pair.weight) == ("capture", 0.75)
    upgraded.close()



@pytest.mark.parametrize("column", ["provider", "status", "triage_state", "source"])
def test_capture_checks_refuse_unknown_values(store: CaptureStore, column: str) -> None:
    """Migration 5 rewrote the captures table's CHECK constraints; they still refuse what they refused."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    row = {
        "request_id": uuid.uuid4().hex, "tenant": "acme", "namespace": "support", "provider": "openai",
        "model": "m", "input_json": "[]", "output_text": "", "latency_us": 1, "status": "ok", "http_status": 200,
        "tags": "", "streamed": False, "triage_state": "untriaged", "created_at": datetime.now(UTC),
        "source": "capture",
    }  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(captures).values(row))
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(captures).values({**row, "request_id": uuid.uuid4().hex, column: "bogus"}))


def test_sqlite_capture_checks_build_no_temporary_tables(tmp_path) -> None:
    """SQLite ran an IN-list CHECK of three or more values through a temporary b-tree for every row the
    writer inserted. Neither a fresh store's INSERT nor that of a store upgraded from version 4 opens one
    any more, and the upgrade keeps every row with its id."""
    from sqlalchemy import create_engine

    url = f"sqlite:///{tmp_path / 'v4.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        _migrate_to(conn, 4)
        for number in (1, 7):
            _insert_old_capture(conn, id=number, request_id=f"r{number}", output_text=f"answer {number}")
    engine.dispose()
    upgraded = CaptureStore(url)
    fresh = CaptureStore(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert [(c.id, c.output_text) for c in upgraded.list_captures("acme")] == [(7, "answer 7"), (1, "answer 1")]
    for store in (fresh, upgraded):
        statement = store._capture_insert_sql
        assert statement is not None
        with store.engine.connect() as conn:
            program = conn.exec_driver_sql("EXPLAIN " + statement.sql, (None,) * statement.sql.count("?")).all()
        opcodes = {row[1] for row in program}
        assert "Insert" in opcodes and "OpenEphemeral" not in opcodes
        store.insert_captures_once([capture(2)])
        store.close()
    reopened = CaptureStore(url)
    assert len(reopened.list_captures("acme")) == 3
    reopened.close()


def test_upgrade_to_5_survives_a_cut_off_attempt_and_keeps_views_and_triggers(tmp_path) -> None:
    """An attempt cut off after its CREATE TABLE (committed at once by Python's sqlite3) leaves an empty
    `captures_v5`; the next start still upgrades. A view and a trigger an operator added on `captures`
    work on the rebuilt table."""
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'v4.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        _migrate_to(conn, 4)
        conn.execute(text("CREATE TABLE captures_v5 (id INTEGER)"))  # what a cut-off attempt leaves
        conn.execute(text("CREATE VIEW kept_pairs AS SELECT id, output_text FROM captures WHERE triage_state = 'kept'"))
        conn.execute(text("CREATE TABLE deletions (request_id TEXT)"))
        conn.execute(
            text(
                "CREATE TRIGGER log_deletions AFTER DELETE ON captures"
                " BEGIN INSERT INTO deletions VALUES (old.request_id); END"
            )
        )
        _insert_old_capture(conn, output_text="kept answer")
    engine.dispose()
    upgraded = CaptureStore(url)
    with upgraded.engine.begin() as conn:
        assert conn.execute(text("SELECT output_text FROM kept_pairs")).scalars().all() == ["kept answer"]
        conn.execute(text("DELETE FROM captures WHERE request_id = 'r1'"))
        assert conn.execute(text("SELECT request_id FROM deletions")).scalars().all() == ["r1"]
        tables = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars().all()
    assert "captures_v5" not in tables
    upgraded.close()


def test_version_3_store_keeps_finding_retries(tmp_path) -> None:
    """Upgrading to version 4 gives the captures of namespaces with implicit signals on their retry digest
    (a retry after the upgrade still marks them) and leaves every other capture out of the retry index."""
    from sqlalchemy import create_engine, inspect, text

    from kolm_pipeline.store.capture_store import canonical_messages
    from kolm_pipeline.store.tables import captures

    question = [{"role": "user", "content": "where is my parcel"}]
    secret = "ab" * 32
    digest = hmac.new(bytes.fromhex(secret), canonical_messages(question).encode(), "sha256").hexdigest()
    now = datetime.now(UTC).replace(tzinfo=None)
    url = f"sqlite:///{tmp_path / 'v3.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        _migrate_to(conn, 3)
        conn.execute(
            text("INSERT INTO tenant_secrets (tenant, hmac_secret, created_at) VALUES ('acme', :secret, :at)"),
            {"secret": secret, "at": now},
        )
        conn.execute(
            text(
                "INSERT INTO namespace_settings (tenant, namespace, implicit_signals, distill_ready, updated_at)"
                " VALUES ('acme', 'support', 1, 0, :at)"
            ),
            {"at": now},
        )
        for request_id, namespace in (("r1", "support"), ("r2", "billing")):
            _insert_old_capture(
                conn,
                request_id=request_id,
                namespace=namespace,
                input_json=json.dumps(question),
                output_text="x",
                triage_state="untriaged",
                created_at=now,
                input_hmac=digest,
            )
    engine.dispose()
    upgraded = CaptureStore(url)
    with upgraded.engine.connect() as conn:
        names = {index["name"] for index in inspect(conn).get_indexes("captures")}
        kept = dict(conn.execute(select(captures.c.request_id, captures.c.retry_digest)).all())
    assert "ix_captures_tenant_namespace_input_hmac" not in names and "ix_captures_retry_digest" in names
    assert kept == {"r1": digest, "r2": None}
    upgraded.insert_captures([capture(1, messages=question), capture(2, messages=question, namespace="billing")])
    signals = {c.request_id: c.implicit_signal for c in upgraded.list_captures("acme")}
    assert (signals["r1"], signals["r2"]) == ("retried", None)
    upgraded.close()


def test_stores_started_together_on_a_new_sqlite_file_migrate_it_once(tmp_path) -> None:
    """Processes that open the same new SQLite store at the same moment (a proxy, its writer, Dagster)
    take turns: every one starts, and each migration is applied exactly once."""
    import subprocess
    import sys
    import time

    from sqlalchemy import create_engine, func, select

    from kolm_pipeline.store.migrations import MIGRATIONS
    from kolm_pipeline.store.tables import schema_versions

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    start_at = time.time() + 3.0  # after every interpreter has imported the store
    opener = (
        "import sys, time\n"
        "from kolm_pipeline.store import CaptureStore\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "CaptureStore(sys.argv[1]).close()\n"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", opener, url, str(start_at)], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, errors
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(schema_versions.c.version, func.count()).group_by(schema_versions.c.version)).all()
    engine.dispose()
    assert {version: count for version, count in rows} == {version: 1 for version, _, _ in MIGRATIONS}


def _recounted(store: CaptureStore, tenant: str, namespace: str) -> dict[str, int]:
    """The counters as the captures themselves give them, counted row by row (merged: the registry's published
    distill runs)."""
    from sqlalchemy import func, select

    from kolm_pipeline.store.counters import published_distills

    c = captures.c
    stmt = select(c.triage_state, func.count(c.id), func.count(c.distilled_at)).where(
        c.tenant == tenant, c.namespace == namespace
    )
    with store.engine.connect() as conn:
        rows = conn.execute(stmt.group_by(c.triage_state)).all()
        merged = published_distills(conn, tenant, namespace)
    by_state = {state: int(count) for state, count, _ in rows}
    return {
        "captured": sum(by_state.values()),
        "kept": by_state.get("kept", 0),
        "discarded": by_state.get("discarded", 0),
        "untriaged": by_state.get("untriaged", 0),
        "distilled": sum(int(row[2]) for row in rows),
        "merged": merged,
    }


_COUNTED_NAMESPACES = ("support", "ops")
_counter_steps = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(_COUNTED_NAMESPACES), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("write"), st.lists(st.sampled_from(_COUNTED_NAMESPACES), min_size=1, max_size=6), st.booleans()),
    st.tuples(st.just("import"), st.sampled_from(_COUNTED_NAMESPACES), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("triage"), st.lists(st.integers(0, 40), max_size=6), st.sampled_from(TRIAGE_STATES)),
    st.tuples(st.just("rule"), st.sampled_from(_COUNTED_NAMESPACES), st.sampled_from(["keep", "discard"])),
    st.tuples(st.just("distill"), st.sampled_from(_COUNTED_NAMESPACES), st.lists(st.integers(0, 40), max_size=6)),
    st.tuples(st.just("merge"), st.sampled_from(_COUNTED_NAMESPACES), st.lists(st.integers(0, 40), max_size=6)),
    st.tuples(st.just("delete"), st.sampled_from(_COUNTED_NAMESPACES)),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_counter_steps, min_size=1, max_size=14))
def test_stored_counters_always_equal_the_captures_counted(store: CaptureStore, steps: list[tuple]) -> None:
    """Whatever inserts (the writer's replays of a batch included), imports, triage, rules, marks and
    deletions a namespace sees, its stored counters equal its captures counted one by one."""
    tenant = f"t{uuid.uuid4().hex[:10]}"
    made: list[NewCapture] = []
    serial = iter(range(10_000))

    def fresh(namespace: str, status: str = "ok", **kw: object) -> NewCapture:
        record = capture(next(serial), namespace=namespace, tenant=tenant, status=status, **kw)
        made.append(record)
        return record

    def ids() -> list[int]:
        return sorted(c.id for c in store.list_captures(tenant, limit=10_000))

    for step in steps:
        kind = step[0]
        if kind == "insert":
            _, namespace, count, failed = step
            store.insert_captures([fresh(namespace, "error" if failed else "ok") for _ in range(count)])
        elif kind == "write":  # the capture writer's batch, mixed namespaces; optionally a replay of earlier ones
            _, namespaces, replay = step
            batch = [fresh(ns, prompt_tokens=None if i % 2 else 3) for i, ns in enumerate(namespaces)]
            store.insert_captures_once(batch + (made[: len(made) // 2] if replay else []))
        elif kind == "import":
            _, namespace, count, approved = step
            again = [r for r in made if r.namespace == namespace][:1]
            records = [*again, *(fresh(namespace) for _ in range(count))]
            store.import_captures(records, "test", kept_by="import:human" if approved else None)
        elif kind == "triage":
            _, picks, state = step
            known = ids()
            store.set_triage(tenant, [known[i % len(known)] for i in picks] if known else [], state, "alice")
        elif kind == "rule":
            _, namespace, action = step
            store.add_rule(tenant, namespace, action, {"status": "ok"}, "alice")
            store.apply_rules(tenant, namespace)
        elif kind in ("distill", "merge"):
            _, namespace, picks = step
            known = ids()
            chosen = [known[i % len(known)] for i in picks] if known else []
            (store.mark_distilled if kind == "distill" else store.mark_merged)(tenant, namespace, chosen)
        else:
            store.delete_namespace(tenant, step[1])
        for namespace in _COUNTED_NAMESPACES:
            assert store.counters(tenant, namespace) == _recounted(store, tenant, namespace), (step, namespace)
    holding = [(tenant, ns) for ns in sorted(_COUNTED_NAMESPACES) if _recounted(store, tenant, ns)["captured"]]
    assert store.namespaces(tenant) == holding


def test_triage_waiting_on_a_concurrent_change_applies_to_the_state_that_change_left(store: CaptureStore) -> None:
    """Two triages of one capture at once on PostgreSQL: the second waits for the first and then moves the
    capture from the state the first left, whatever that state is, and counts the move."""
    import threading

    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: its triages never wait on each other's rows")
    [capture_id] = store.insert_captures([capture(1)])
    store.set_triage("acme", [capture_id], "kept", "alice")
    with store.engine.connect() as other:  # the first triage, still open: kept → untriaged, the same way
        other.execute(
            update(captures).where(captures.c.id == capture_id).values(triage_state="untriaged", triaged_by=None)
        )
        other.execute(text("UPDATE namespace_counters SET kept = kept - 1 WHERE tenant = 'acme'"))
        moved: list[int] = []
        second = threading.Thread(
            target=lambda: moved.append(store.set_triage("acme", [capture_id], "discarded", "bob"))
        )
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive()  # waiting for the first triage's row lock
        other.commit()
        second.join(timeout=30)
    assert moved == [1]
    assert store.get_capture("acme", capture_id).triage_state == "discarded"
    assert store.counters("acme", "support") == _recounted(store, "acme", "support")


def test_deleting_a_namespace_while_a_writer_commits_leaves_counters_that_match(store: CaptureStore) -> None:
    """A namespace deleted on PostgreSQL while a writer's batch is still open: whichever way the two
    interleave, the captures left and the counters agree."""
    import threading

    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: a delete never overlaps a batch")
    store.insert_captures([capture(1)])
    with store.engine.connect() as writer:  # a batch written and counted, not yet committed
        _insert_old_capture(writer, request_id="late", triage_state="untriaged", streamed=False)
        writer.execute(
            text(
                "INSERT INTO namespace_counters VALUES ('acme', 'support', 1, 0, 0, 0, 0) ON CONFLICT (tenant, "
                "namespace) DO UPDATE SET captured = namespace_counters.captured + 1"
            )
        )
        deleted: list[int] = []
        deleter = threading.Thread(target=lambda: deleted.append(store.delete_namespace("acme", "support")))
        deleter.start()
        deleter.join(timeout=1.0)
        assert deleter.is_alive()  # waiting for the batch's counters row
        writer.commit()
        deleter.join(timeout=30)
    left = _recounted(store, "acme", "support")
    assert deleted and store.counters("acme", "support") == left
    assert store.namespaces("acme") == ([("acme", "support")] if left["captured"] else [])


def test_recount_repairs_counters_a_writer_left_behind(store: CaptureStore) -> None:
    """Captures inserted without counting them (a process of a version from before stored counters) are
    counted by `recount`, which audits the change; a recount that changes nothing is not audited."""
    ids = store.insert_captures([capture(1), capture(2)])
    store.set_triage("acme", ids[:1], "kept", "alice")
    with store.engine.begin() as conn:
        _insert_old_capture(conn, request_id="uncounted", triage_state="kept", streamed=False)
    assert store.counters("acme", "support")["captured"] == 2
    assert store.recount("acme", "support", "cli:alice")["kept"] == 1  # the counters as they were
    assert store.counters("acme", "support") == _recounted(store, "acme", "support")
    assert store.counters("acme", "support")["kept"] == 2
    [audit] = [row for row in store.audit_rows("acme", "support") if row.action == "counters.recount"]
    assert audit.actor == "cli:alice" and audit.detail["after"]["captured"] == 3
    store.recount("acme", "support", "cli:alice")
    assert [row.action for row in store.audit_rows("acme", "support")].count("counters.recount") == 1
