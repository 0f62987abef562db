"""`kolm capture import`: both line formats, every bad line named and nothing written, redaction, idempotent
re-import, triage rules, provenance weights on kept pairs; and eval-candidate tagging at triage (store, CLI,
inbox route)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture.importer import ImportFileError, import_file
from kolm_pipeline.capture_server import create_app
from kolm_pipeline.cli import main
from kolm_pipeline.settings import CaptureConfig, load_settings, parse_source_weights
from kolm_pipeline.store import CAPTURE_SOURCES, EVAL_CANDIDATE_TAG, CaptureStore, NewCapture

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"

CHAT = {
    "messages": [
        {"role": "system", "content": "Route the ticket."},
        {"role": "user", "content": "I was charged twice"},
        {"role": "assistant", "content": "billing"},
    ],
    "model": "gpt-4o",
}
COMPLETION = {"prompt": "Where is my parcel?", "completion": "logistics", "tags": ["gold"]}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CaptureStore]:
    """A fresh store on SQLite, or on a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
        yield store
        store.close()
        return
    db = f"kolm_import_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        store = CaptureStore(PG_URL.format(db=db))
        try:
            yield store
        finally:
            store.close()
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CaptureStore]:
    store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
    yield store
    store.close()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def captured(n: int, tenant: str = "acme", namespace: str = "support") -> NewCapture:
    return NewCapture(
        request_id=uuid.uuid4().hex,
        tenant=tenant,
        namespace=namespace,
        provider="openai",
        model="gpt-4o",
        messages=[{"role": "user", "content": f"captured question {n}"}],
        output_text=f"captured answer {n}",
        latency_us=1000,
        status="ok",
        http_status=200,
        tags=[],
    )


def test_import_both_formats(any_store: CaptureStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [CHAT, "", COMPLETION])
    summary = import_file(any_store, path, "acme", "support", "ai", tags=["batch-1"])
    assert (summary.pairs, summary.outcome.imported, summary.skipped) == (2, 2, 0)
    chat, completion = sorted(any_store.list_captures("acme", "support"), key=lambda c: c.id)
    assert chat.messages == CHAT["messages"][:-1] and chat.output_text == "billing" and chat.model == "gpt-4o"
    assert completion.messages == [{"role": "user", "content": "Where is my parcel?"}]
    assert completion.output_text == "logistics" and completion.model == "imported"
    assert chat.tags == ["source:ai", "batch-1"] and completion.tags == ["source:ai", "batch-1", "gold"]
    for row in (chat, completion):
        assert (row.source, row.status, row.provider, row.triage_state) == ("ai", "ok", "openai", "untriaged")
        assert row.latency_us == 0 and row.prompt_tokens is None
    audit = [row for row in any_store.audit_rows("acme", "support") if row.action == "captures.import"]
    assert audit[0].detail == {"source": ["ai"], "imported": 2, "skipped": 0, "kept": 0, "discarded": 0}


def test_bad_lines_are_all_named_and_nothing_is_written(store: CaptureStore, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(CHAT),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no answer"}, {"role": "user", "content": "?"}]}),
        json.dumps({"prompt": "only a prompt"}),
        json.dumps([1, 2]),
        json.dumps({**COMPLETION, "tags": ["a,b"]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({**COMPLETION, "messages": CHAT["messages"]}),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n" + json.dumps(COMPLETION).encode() + b"\n")
    with pytest.raises(ImportFileError) as error:
        import_file(store, path, "acme", "support", "human")
    problems = error.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9)]
    assert "not valid JSON" in problems[0] and "last message must be the assistant" in problems[1]
    assert "'completion' must be" in problems[2] and "expected a JSON object" in problems[3]
    assert "invalid tag 'a,b'" in problems[4] and "'wizard'" in problems[5] and "not both" in problems[6]
    assert "not UTF-8" in problems[7]
    assert store.counters("acme", "support")["captured"] == 0
    assert store.namespaces() == []

    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ImportFileError, match="no pairs to import"):
        import_file(store, empty, "acme", "support", "ai")
    with pytest.raises(ImportFileError, match="cannot read"):
        import_file(store, tmp_path / "missing.jsonl", "acme", "support", "ai")


def test_a_failing_write_leaves_nothing_behind(store: CaptureStore, tmp_path: Path) -> None:
    """The rows are written in one transaction: a refusal in the middle of a large file keeps none."""
    rows = [{"prompt": f"question {n}", "completion": f"answer {n}"} for n in range(1_200)]
    rows[1_100]["completion"] = "x" * 10  # fine for the parser ...
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(ValueError, match="invalid source"):
        store.import_captures(
            [NewCapture("r1", "acme", "support", "openai", "m", [{"role": "user", "content": "q"}], "a", 0, "ok",
                        200),
             NewCapture("r2", "acme", "support", "openai", "m", [{"role": "user", "content": "q"}], "a", 0, "ok",
                        200, source="robot")],
            actor="test",
        )
    assert store.counters("acme", "support")["captured"] == 0
    # ... and a database refusal after the first chunks were sent (a trigger here) rolls them back too.
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_late BEFORE INSERT ON captures WHEN NEW.output_text = 'xxxxxxxxxx' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(Exception, match="refused"):
        import_file(store, path, "acme", "support", "ai")
    assert store.counters("acme", "support")["captured"] == 0
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER refuse_late")
    assert import_file(store, path, "acme", "support", "ai").outcome.imported == 1_200


def test_redaction_is_the_proxys(store: CaptureStore, tmp_path: Path) -> None:
    email = f"jane.{secrets.token_hex(3)}@example.com"
    key = "sk-proj-" + secrets.token_urlsafe(24)
    row = {"prompt": f"My email is {email}, my key {key}", "completion": f"Reply to {email} and rotate {key}"}
    path = write_jsonl(tmp_path / "pii.jsonl", [row])
    import_file(store, path, "acme", "support", "human")
    (stored,) = store.list_captures("acme", "support")
    text = json.dumps(stored.messages) + stored.output_text
    assert email not in text and key not in text
    assert stored.output_text == "Reply to <EMAIL> and rotate <API_KEY>"

    store.set_switches("acme", "keys-only", "test", redact_entities=["API_KEY"])
    import_file(store, path, "acme", "keys-only", "human")
    (partial,) = store.list_captures("acme", "keys-only")
    assert partial.output_text == f"Reply to {email} and rotate <API_KEY>"
    # The pair's identity is taken before redaction, under the tenant's secret: not the plain content hash.
    assert partial.request_id.startswith("import-") and partial.request_id != stored.request_id


def test_reimport_skips_what_is_stored(any_store: CaptureStore, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [CHAT, COMPLETION, CHAT])
    first = import_file(any_store, path, "acme", "support", "ai")
    assert (first.outcome.imported, first.skipped) == (2, 1)
    again = import_file(any_store, path, "acme", "support", "human")
    assert (again.outcome.imported, again.skipped, again.outcome.kept) == (0, 3, 0)
    assert "imported 0 of 3 pairs (kept 0, discarded 0, untriaged 0); skipped 3" in again.line()
    write_jsonl(path, [CHAT, COMPLETION, {"prompt": "new one", "completion": "general"}])
    more = import_file(any_store, path, "acme", "support", "ai")
    assert (more.outcome.imported, more.skipped) == (1, 2)
    assert any_store.counters("acme", "support")["captured"] == 3
    # The store refuses a stored request id on its own too (the importer's early skip is an optimisation).
    stored = any_store.list_captures("acme", "support")[0]
    replay = NewCapture(stored.request_id, "acme", "support", "openai", "m", stored.messages, "other", 0, "ok", 200)
    outcome = any_store.import_captures([replay, replay], actor="test")
    assert (outcome.imported, outcome.skipped) == (0, 2)
    # The same pairs in another namespace are other captures.
    assert import_file(any_store, path, "acme", "other", "ai").outcome.imported == 3


def test_rules_triage_imported_rows_and_people_approve_human_ones(any_store: CaptureStore, tmp_path: Path) -> None:
    any_store.insert_captures([captured(1)])
    any_store.add_rule("acme", "support", "discard", {"output_regex": "^spam"}, actor="test")
    keep_rule = any_store.add_rule("acme", "support", "keep", {"model": "gpt-4o", "tag": "source:ai"}, actor="test")
    any_store.set_triage("acme", [any_store.list_captures("acme", "support")[0].id], "untriaged", actor="test")
    rows = [CHAT, COMPLETION, {"prompt": "buy now", "completion": "spam spam", "model": "gpt-4o"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    outcome = import_file(any_store, path, "acme", "support", "ai").outcome
    assert (outcome.imported, outcome.kept, outcome.discarded) == (3, 1, 1)
    by_output = {c.output_text: c for c in any_store.list_captures("acme", "support")}
    assert by_output["billing"].triage_state == "kept" and by_output["billing"].triaged_by == f"rule:{keep_rule}"
    assert by_output["logistics"].triage_state == "untriaged"
    assert by_output["spam spam"].triage_state == "discarded"
    # The import triages its own rows only; the captured row waits for the triage stage as before.
    assert by_output["captured answer 1"].triage_state == "untriaged"

    human = write_jsonl(tmp_path / "human.jsonl", [{"prompt": "refund?", "completion": "spam-free answer"},
                                                   {"prompt": "buy", "completion": "spam"}])
    approved = import_file(any_store, human, "acme", "support", "human").outcome
    assert (approved.imported, approved.kept, approved.discarded) == (2, 2, 0)
    for capture in any_store.list_captures("acme", "support", tag="source:human"):
        assert (capture.triage_state, capture.triaged_by, capture.source) == ("kept", "import:human", "human")


def test_weights_follow_the_configured_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOLM_SOURCE_WEIGHTS", "ai=0.25, human=2")
    store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
    store.insert_captures([captured(1)])
    import_file(store, write_jsonl(tmp_path / "h.jsonl", [CHAT]), "acme", "support", "human")
    import_file(store, write_jsonl(tmp_path / "a.jsonl", [COMPLETION, {"prompt": "p", "completion": "c"}]),
                "acme", "support", "ai")
    import_file(store, write_jsonl(tmp_path / "i.jsonl", [{"prompt": "q", "completion": "r"}]),
                "acme", "support", "import")
    ids = [c.id for c in store.list_captures("acme", "support")]
    store.set_triage("acme", ids, "kept", actor="test")
    corrected = next(c.id for c in store.list_captures("acme", "support") if c.output_text == "c")
    store.set_feedback("acme", corrected, "corrected by a person", actor="test")
    weights = {pair.output: (pair.source, pair.weight) for pair in store.kept_pairs("acme", "support")}
    assert weights == {
        "captured answer 1": ("capture", 1.0),
        "billing": ("human", 2.0),
        "logistics": ("ai", 0.25),
        "corrected by a person": ("human", 2.0),
        "r": ("import", 1.0),
    }
    assert {pair.output: pair.tags for pair in store.kept_pairs("acme", "support")}["logistics"] == [
        "source:ai", "gold"
    ]
    store.close()
    explicit = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}", source_weights=parse_source_weights("ai=0"))
    assert {p.output: p.weight for p in explicit.kept_pairs("acme", "support")}["logistics"] == 0.0
    explicit.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("ai=half", "the weight of 'ai' must be a number >= 0, got 'half'"),
        ("ai=-1", "must be a number >= 0"),
        ("ai=nan", "must be a number >= 0"),
        ("robot=1", "unknown source 'robot'"),
        ("ai", "expected source=weight pairs"),
        ("ai=1,ai=2", "given twice"),
    ],
)
def test_bad_source_weights_are_refused_clearly(raw: str, message: str, monkeypatch, tmp_path) -> None:
    with pytest.raises(ValueError, match="KOLM_SOURCE_WEIGHTS: .*" + message.replace("(", r"\(")):
        parse_source_weights(raw)
    monkeypatch.setenv("KOLM_SOURCE_WEIGHTS", raw)
    with pytest.raises(ValueError, match="KOLM_SOURCE_WEIGHTS"):
        load_settings(tmp_path)


def test_source_weights_cover_every_capture_source() -> None:
    defaults = parse_source_weights(None)
    assert set(defaults) == set(CAPTURE_SOURCES)
    assert defaults == {"capture": 1.0, "human": 1.0, "ai": 0.5, "import": 1.0}
    assert parse_source_weights("human=1.5,,")["human"] == 1.5


def test_cli_import(kolm_settings, tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [CHAT, COMPLETION])
    argv = ["capture", "import", str(path), "--namespace", "acme.support", "--source", "ai", "--tags", "x, y"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(source ai, weight 0.5)" in out
    assert "imported 2 of 2 pairs (kept 0, discarded 0, untriaged 2); skipped 0" in out
    assert main(["capture", "import", str(path), "--namespace", "support", "--tenant", "acme", "--source", "ai"]) == 0
    assert "imported 0 of 2 pairs" in capsys.readouterr().out
    store = CaptureStore(kolm_settings.store_url)
    assert {tuple(c.tags) for c in store.list_captures("acme")} == {("source:ai", "x", "y"),
                                                                    ("source:ai", "x", "y", "gold")}

    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT, "{oops", {"prompt": "p"}])
    assert main(["capture", "import", str(bad), "--namespace", "acme.support", "--source", "human"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err and f"{bad}:3: 'completion' must be" in err
    assert "nothing was imported" in err and "Traceback" not in err
    assert store.counters("acme", "support")["captured"] == 2
    assert main(["capture", "import", str(tmp_path / "nope.jsonl"), "--namespace", "acme.x", "--source", "ai"]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["capture", "import", str(path), "--namespace", "acme.support", "--source", "robot"])
    assert exit_info.value.code == 2
    store.close()


def test_cli_import_help_weights_and_entry_point(kolm_settings, tmp_path: Path, capsys, monkeypatch) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["capture", "import", "--help"])
    helped = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--source {human,ai,import}" in helped and "KOLM_SOURCE_WEIGHTS" in helped and "FILE:LINE" in helped
    path = write_jsonl(tmp_path / "pairs.jsonl", [CHAT])
    monkeypatch.setenv("KOLM_SOURCE_WEIGHTS", "ai=lots")
    assert main(["capture", "import", str(path), "--namespace", "acme.support", "--source", "ai"]) == 1
    err = capsys.readouterr().err
    assert "KOLM_SOURCE_WEIGHTS: the weight of 'ai' must be a number >= 0, got 'lots'" in err
    assert "Traceback" not in err
    monkeypatch.setenv("KOLM_SOURCE_WEIGHTS", "human=3")
    done = subprocess.run(
        [sys.executable, "-m", "kolm_pipeline.cli", "capture", "import", str(path), "--namespace", "acme.support",
         "--source", "human"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "weight 3" in done.stdout and "kept 1" in done.stdout and done.stderr == ""


def test_eval_candidate_tagging_at_triage(kolm_settings, capsys) -> None:
    store = CaptureStore(kolm_settings.store_url)
    store.insert_captures([captured(1), captured(2), captured(3, tenant="other")])
    first, second = sorted(c.id for c in store.list_captures("acme"))
    foreign = store.list_captures("other")[0].id

    assert main(["triage", "keep", "--namespace", "acme.support", "--eval-candidate", str(first), str(second)]) == 0
    assert "2 of 2 captures marked kept; tags +eval-candidate on 2" in capsys.readouterr().out
    assert [p.tags for p in store.kept_pairs("acme", "support")] == [[EVAL_CANDIDATE_TAG]] * 2
    assert main(["triage", "tag", "--namespace", "acme.support", "--untag", EVAL_CANDIDATE_TAG, "--tag", "gold",
                 str(second), str(foreign)]) == 0
    captured_out = capsys.readouterr()
    assert "tags of 1 of 2 captures changed (+gold -eval-candidate)" in captured_out.out
    assert f"no capture(s) [{foreign}]" in captured_out.err
    assert {p.id: p.tags for p in store.kept_pairs("acme", "support")} == {
        first: [EVAL_CANDIDATE_TAG], second: ["gold"]
    }
    assert store.get_capture("other", foreign).tags == []
    assert store.retag("other", [first], ["x"], [], actor="test") == 0  # tenant-scoped
    assert main(["triage", "tag", "--namespace", "acme.support", str(first)]) == 1
    assert "needs --tag" in capsys.readouterr().err
    assert main(["triage", "keep", "--namespace", "acme.support", "--tag", "a,b", str(first)]) == 1
    assert "invalid tag 'a,b'" in capsys.readouterr().err
    assert main(["triage", "rule", "--namespace", "acme.support", "--tag", "a", "--tag", "b"]) == 1
    audit = [row for row in store.audit_rows("acme", "support") if row.action == "tags.update"]
    assert [row.detail for row in audit] == [
        {"ids": [second], "added": ["gold"], "removed": [EVAL_CANDIDATE_TAG]},
        {"ids": [first, second], "added": [EVAL_CANDIDATE_TAG], "removed": []},
    ]
    store.close()


def test_triage_route_takes_tags(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "home")
    store = CaptureStore(settings.store_url)
    key = store.create_tenant("acme")
    other_key = store.create_tenant("other")
    store.insert_captures([captured(1)])
    capture_id = store.list_captures("acme")[0].id
    app = create_app(settings, store, CaptureConfig(retention_sweep_s=0))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        auth = {"authorization": f"Bearer {key}"}
        tagged = http.post(f"/v1/captures/{capture_id}/triage", headers=auth,
                           json={"state": "kept", "tags": [EVAL_CANDIDATE_TAG, "gold"]})
        assert tagged.status_code == 200
        assert tagged.json() == {"id": capture_id, "triage_state": "kept", "tags": [EVAL_CANDIDATE_TAG, "gold"]}
        assert store.kept_pairs("acme", "support")[0].tags == [EVAL_CANDIDATE_TAG, "gold"]
        untagged = http.post(f"/v1/captures/{capture_id}/triage", headers=auth,
                             json={"state": "kept", "remove_tags": ["gold"]})
        assert untagged.json()["tags"] == [EVAL_CANDIDATE_TAG]
        plain = http.post(f"/v1/captures/{capture_id}/triage", headers=auth, json={"state": "kept"})
        assert plain.json() == {"id": capture_id, "triage_state": "kept"}
        bad = http.post(f"/v1/captures/{capture_id}/triage", headers=auth, json={"state": "kept", "tags": ["a,b"]})
        assert bad.status_code == 400 and "invalid tag" in bad.json()["error"]["message"]
        not_a_list = http.post(f"/v1/captures/{capture_id}/triage", headers=auth, json={"state": "kept", "tags": 3})
        assert not_a_list.status_code == 400
        foreign = http.post(f"/v1/captures/{capture_id}/triage", headers={"authorization": f"Bearer {other_key}"},
                            json={"state": "kept", "tags": ["x"]})
        assert foreign.status_code == 404
    assert store.get_capture("acme", capture_id).tags == [EVAL_CANDIDATE_TAG]
    store.close()
