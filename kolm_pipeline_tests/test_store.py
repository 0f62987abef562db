"""The capture store on SQLite and PostgreSQL: tenants, captures, triage, rules, feedback, registry."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import select

from kolm_pipeline.store import (
    CaptureStore,
    NewCapture,
    partition_key,
    split_partition_key,
    validate_namespace,
)
from kolm_pipeline.store.tables import audit_log, tenants

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


def capture(
    n: int, *, namespace: str = "support", status: str = "ok", tenant: str = "acme", **kw
) -> NewCapture:
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
    ids = store.insert_captures(
        [capture(1, tags=["a", "b"]), capture(2, streamed=True), capture(3, namespace="ops")]
    )
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
    assert pairs[0].messages == [{"role": "user", "content": "question 1"}]
    assert (pairs[0].prompt_tokens, pairs[0].completion_tokens, pairs[0].latency_us) == (3, 2, 1001)
    assert store.get_capture("acme", second).output_text == "answer 2"
    assert untriaged not in [p.id for p in pairs]


def test_counters_and_namespaces(store: CaptureStore) -> None:
    assert store.counters("acme", "support") == {"captured": 0, "kept": 0, "discarded": 0, "untriaged": 0}
    ids = store.insert_captures([capture(i) for i in range(5)] + [capture(9, namespace="ops", tenant="shop")])
    store.set_triage("acme", ids[:2], "kept", "alice")
    store.set_triage("acme", ids[2:3], "discarded", "alice")
    assert store.counters("acme", "support") == {"captured": 5, "kept": 2, "discarded": 1, "untriaged": 2}
    assert store.namespaces() == [("acme", "support"), ("shop", "ops")]


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
