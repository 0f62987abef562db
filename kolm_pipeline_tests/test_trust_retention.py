"""Retention is total (issue 19, item 4). After the retention sweep the captures table was clean, but the text
survived in the work directory (corpus, recipe, diagnostics, frozen hold-out, evaluation), in `evals.json` inside
every `.kolm` and its MLflow copy, in Dagster's event storage, in the SQLite write-ahead file, and in the `model`
and `tags` columns, which never expired.

A canary goes into a prompt, an output, a tag, the model name and a feedback correction; the whole loop runs
(real Dagster materialization, Pipes training on the tiny base, a signed deployment logged to MLflow) well inside
the namespace's window; the clock moves past the window, the sweep runs, and then every byte under KOLM_HOME
(Dagster instance, MLflow database and artifacts, capture store with its -wal and -shm) is searched for the
canary: raw, inside archives, inside DSSE payloads (base64), inside compressed SQLite cells."""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update

from kolm_pipeline.capture.batch import Quarantine
from kolm_pipeline.cli import main
from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.provenance.atomic import write_atomic, write_json_atomic
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.stages.corpus import run_corpus_stage, run_recipe_stage
from kolm_pipeline.stages.retention import sweep_retention
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import EVAL_CANDIDATE_TAG, CaptureStore, NewCapture
from kolm_pipeline.store.tables import captures
from kolm_pipeline_tests.conftest import AUTO_REPLY
from kolm_pipeline_tests.test_assets import TINY_RUN
from kolm_pipeline_tests.test_store import store  # noqa: F401 - fixture: SQLite and PostgreSQL

TENANT, NAMESPACE, PARTITION = "acme", "support", "acme.support"
WINDOW_DAYS = 7
# Paths under KOLM_HOME that belong to the capture path and its own retention (kolm_pipeline/capture/): the journal
# of captures not stored yet (capture-log), the quarantine of records the store refused (Quarantine.expire, which
# sweep_retention calls) and the spool of older versions. The captures here go straight into the store, so nothing
# is ever written there; their tests are the capture path's.
CAPTURE_PATH_DIRS = ("capture-log", "quarantine", "spool")
SQLITE_MAGIC = b"SQLite format 3\x00"
_PAYLOAD = re.compile(rb'"payload"\s*:\s*"([A-Za-z0-9+/=_-]+)"')


def _canary() -> str:
    """Unique per run; the ü makes its UTF-8 and JSON-escaped (\\u00fc) forms differ, and both are searched."""
    return "kolmcanary\u00fc" + uuid.uuid4().hex[:12]


def _find(data: bytes, needle: bytes, where: str, depth: int = 0) -> list[str]:
    """Where `needle` occurs in `data`: the bytes themselves, tar members, DSSE payloads (base64), gzip and
    zlib streams. `where` names the place; nested places are joined with `!`."""
    hits = [where] if needle in data else []
    if depth > 3:
        return hits
    if len(data) > 512 and data[257:262] == b"ustar":
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        hits += _find(handle.read(), needle, f"{where}!{member.name}", depth + 1)
        except tarfile.TarError:
            pass
    for payload in _PAYLOAD.findall(data):
        try:
            decoded = base64.b64decode(payload.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(payload) % 4))
        except ValueError:
            continue
        hits += _find(decoded, needle, f"{where}!dsse-payload", depth + 1)
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            hits += _find(gzip.decompress(data), needle, f"{where}!gzip", depth + 1)
    elif data[:1] == b"\x78":
        with contextlib.suppress(zlib.error):
            hits += _find(zlib.decompress(data), needle, f"{where}!zlib", depth + 1)
    return hits


def _sqlite_cells(path: Path, needle: bytes, where: str, scratch: Path) -> list[str]:
    """Every cell of a SQLite database (a copy, with its -wal, so nothing is checkpointed here), searched as
    `_find` does: Dagster keeps some blobs zlib-compressed, where a byte search sees nothing."""
    copy = scratch / uuid.uuid4().hex
    copy.mkdir()
    shutil.copy(path, copy / "db")
    if path.with_name(path.name + "-wal").is_file():
        shutil.copy(path.with_name(path.name + "-wal"), copy / "db-wal")
    hits: list[str] = []
    conn = sqlite3.connect(copy / "db")
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [column[0] for column in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, str):
                        value = value.encode()
                    if isinstance(value, bytes):
                        found = _find(value, needle, f"{where}:{table}.{column}")
                        hits += [h for h in found if h not in hits]
    except sqlite3.DatabaseError:
        pass
    finally:
        conn.close()
    return hits


def grep_home(home: Path, needle: str, scratch: Path) -> list[str]:
    """Every place under `home` that holds `needle` (UTF-8 and JSON-escaped forms), relative to `home`."""
    forms = {needle.encode(), json.dumps(needle).strip('"').encode()}
    hits: list[str] = []
    for path in sorted(home.rglob("*")):
        relative = path.relative_to(home)
        if path.is_symlink() or not path.is_file() or relative.parts[0] in CAPTURE_PATH_DIRS:
            continue  # a link's target is searched as itself
        data = path.read_bytes()
        for form in forms:
            hits += _find(data, form, str(relative))
            if data.startswith(SQLITE_MAGIC):
                hits += [f"{hit} (cell)" for hit in _sqlite_cells(path, form, str(relative), scratch)]
    return sorted(set(hits))


def _record(store: CaptureStore, canary: str) -> None:  # noqa: F811
    """160 auto-reply captures, every prompt opening with the canary, all tagged and from a model named with
    it; eight outputs open with it too, and one of those gets a correction that does (at the start, so that
    previews cut to a length still show it). Those eight are eval candidates: in the hold-out, answers unlike
    the rest would trip the collapse tripwire of the tiny model, and the loop must deploy."""
    records = []
    for index, ticket in enumerate(generate_tickets(160, seed=11)):
        messages = ticket.messages()
        messages[-1]["content"] = f"{canary}-prompt {messages[-1]['content']}"
        marked = index % 20 == 0
        records.append(NewCapture(
            request_id=uuid.uuid4().hex, tenant=TENANT, namespace=NAMESPACE, provider="openai",
            model=f"gpt-4o-mini-{canary}-model", messages=messages,
            output_text=f"{canary}-output {AUTO_REPLY}" if marked else AUTO_REPLY,
            latency_us=400_000, status="ok", http_status=200, prompt_tokens=40, completion_tokens=3,
            tags=["test", f"{canary}-tag", *([EVAL_CANDIDATE_TAG] if marked else [])],
        ))
    ids = store.insert_captures(records)
    store.set_feedback(TENANT, ids[20], f"{canary}-correction {AUTO_REPLY}", actor="test")
    store.add_rule(TENANT, NAMESPACE, "keep", {"status": "ok"}, actor="test")
    store.set_switches(TENANT, NAMESPACE, actor="test", retention_days=WINDOW_DAYS)


def test_after_the_window_the_canary_is_nowhere_under_kolm_home(
    kolm_settings, tiny_base, monkeypatch, tmp_path, capfd, caplog
):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    home = kolm_settings.home
    canary = _canary()
    capture_store = CaptureStore(kolm_settings.store_url)
    _record(capture_store, canary)

    # The whole loop, inside the window: every stage, the signed .kolm, MLflow runs, Dagster's event storage.
    result, outcomes = materialize_namespace(ensure_instance(kolm_settings), PARTITION, TINY_RUN)
    assert result.success, [o for o in outcomes if o.status != "success"]
    pointer = read_pointer(kolm_settings.adapters_dir, PARTITION)
    assert pointer is not None
    before = grep_home(home, canary, tmp_path)
    assert any(hit.startswith("captures.db") for hit in before) and any(hit.startswith("work/") for hit in before)
    counters = capture_store.counters(TENANT, NAMESPACE)

    # One day short of the window nothing expires; one day past it, everything.
    now = datetime.now(UTC)
    assert sweep_retention(kolm_settings, capture_store, now=now + timedelta(days=WINDOW_DAYS - 1)).expired == {}
    report = sweep_retention(kolm_settings, capture_store, now=now + timedelta(days=WINDOW_DAYS + 1))
    assert report.expired == {PARTITION: 160} and report.scrubbed
    capture_store.close()

    left = grep_home(home, canary, tmp_path)
    assert left == [], "the canary survived the retention window in:\n" + "\n".join(left) + \
        "\n(before the sweep it was in:\n" + "\n".join(before) + ")"
    out, err = capfd.readouterr()
    assert canary not in out + err + caplog.text, "a log line holds capture text"

    # The counters keep counting, and the deployed artifact is untouched.
    assert CaptureStore(kolm_settings.store_url).counters(TENANT, NAMESPACE) == counters
    assert read_pointer(kolm_settings.adapters_dir, PARTITION) == pointer


def test_the_store_sweep_expires_model_tags_and_corrections(store: CaptureStore) -> None:  # noqa: F811
    """On SQLite and PostgreSQL alike: after the window a row keeps digests, never the text of its model,
    tags or correction (PostgreSQL's dead tuples are its own: see docs/security.md, item 4)."""
    canary = _canary()
    _record(store, canary)
    expired = store.apply_retention(now=datetime.now(UTC) + timedelta(days=WINDOW_DAYS + 1))
    assert expired == {PARTITION: 160}
    with store.engine.connect() as conn:
        rows = conn.execute(select(captures)).mappings().all()
    assert len(rows) == 160
    for row in rows:
        assert canary not in json.dumps({key: str(value) for key, value in row.items()})
        assert row["model"].startswith("hmac-sha256:") and row["tags"] == ""
    assert sum(1 for row in rows if (row["feedback_output"] or "").startswith("hmac-sha256:")) == 1


def _capture_ids(path: Path) -> set[int]:
    return {json.loads(line)["meta"]["capture_id"] for line in path.read_text().splitlines() if line.strip()}


def test_work_files_expire_with_their_captures_and_the_loop_goes_on(kolm_settings):
    """A cycle's text files go as soon as one of their captures expires, and the next distill writes them again;
    the frozen hold-out only loses its expired rows, and is drawn anew once fewer than half are left."""
    t0 = datetime.now(UTC) - timedelta(days=20)
    capture_store = CaptureStore(kolm_settings.store_url)
    capture_store.insert_captures([NewCapture(
        request_id=uuid.uuid4().hex, tenant=TENANT, namespace=NAMESPACE, provider="openai", model="gpt-4o-mini",
        messages=ticket.messages(), output_text=ticket.queue, latency_us=400_000, status="ok", http_status=200,
        created_at=t0 + timedelta(days=3)) for ticket in generate_tickets(160, seed=11)])
    capture_store.add_rule(TENANT, NAMESPACE, "keep", {"status": "ok"}, actor="test")
    capture_store.apply_rules(TENANT, NAMESPACE)
    capture_store.set_switches(TENANT, NAMESPACE, actor="test", retention_days=WINDOW_DAYS)
    workdir = NamespaceWorkdir(kolm_settings, PARTITION)
    run_corpus_stage(workdir, capture_store, min_pairs=50)
    run_recipe_stage(workdir)
    drawn = _capture_ids(workdir.frozen_holdout)
    # Three days older: three rows of the hold-out and ten of training.
    old = {*sorted(drawn)[:3], *sorted(_capture_ids(workdir.recipe / "train.jsonl"))[:10]}
    with capture_store.engine.begin() as conn:
        conn.execute(update(captures).where(captures.c.id.in_(old)).values(created_at=t0))
    write_json_atomic(workdir.case_previews, {"adapter_cid": "a", "current_name": "base", "cases": [
        {"key": "k", "capture_id": max(drawn - old), "input": "i", "expected": "e", "outputs": {}}]})
    write_json_atomic(workdir.base_answers, {"format": "kolm-base-answers/1", "key": "x", "cases": [
        {"key": "k", "capture_id": max(drawn - old), "output": "the base may quote its input"}]})
    # As a release before migration 11 left it: the first reader imports it into the store.
    write_json_atomic(workdir.legacy_tripwire_state, {"last_good": {"holdout_score": 0.9, "artifact_cid": "c"}})

    # Past the window of the first 20: the cycle goes, the hold-out keeps the rest, the previews their case.
    swept = sweep_retention(kolm_settings, capture_store, now=t0 + timedelta(days=WINDOW_DAYS + 1))
    assert swept.expired == {PARTITION: 13}
    assert swept.work_files == {PARTITION: ["corpus.jsonl", "recipe/", "holdout.frozen.jsonl"]}
    assert not workdir.corpus.exists() and not workdir.recipe.exists() and workdir.case_previews.is_file()
    assert workdir.base_answers.is_file()
    assert _capture_ids(workdir.frozen_holdout) == drawn - old

    # The next distill writes the cycle again from what is left, on the same (shrunk) hold-out.
    run_corpus_stage(workdir, capture_store, min_pairs=50)
    recipe = run_recipe_stage(workdir).recipe
    assert not _capture_ids(workdir.corpus) & old
    assert recipe.diagnostics["holdout"] == {**recipe.diagnostics["holdout"], "made_now": False,
                                             "size": len(drawn - old)}
    assert sweep_retention(kolm_settings, capture_store, now=t0 + timedelta(days=WINDOW_DAYS + 2)).work_files == {}

    # A recipe being written (its last line half there) is left alone; one whose corpus was replaced is not: its
    # diagnostics quote rows of a corpus that is gone.
    partial = workdir.root / "recipe.partial"
    shutil.copytree(workdir.recipe, partial)
    with open(partial / "train.jsonl", "ab") as handle:
        handle.write(b'{"messages": [{"role": "us')
    assert sweep_retention(kolm_settings, capture_store, now=t0 + timedelta(days=WINDOW_DAYS + 2)).work_files == {}
    write_atomic(workdir.corpus, b"".join(workdir.corpus.read_bytes().splitlines(keepends=True)[1:]))
    swept = sweep_retention(kolm_settings, capture_store, now=t0 + timedelta(days=WINDOW_DAYS + 2))
    assert swept.work_files == {PARTITION: ["recipe/"]} and partial.is_dir()

    # Past the window of the rest: nothing of the cycle is left, and the hold-out is drawn anew next time,
    # without the tripwire comparing against a score measured on rows that are gone.
    swept = sweep_retention(kolm_settings, capture_store, now=t0 + timedelta(days=WINDOW_DAYS + 4))
    assert swept.expired == {PARTITION: 147}
    assert sorted(swept.work_files[PARTITION]) == sorted(
        ["corpus.jsonl", "recipe.partial/", "case_previews.json", "base_answers.json", "holdout.frozen.jsonl"])
    assert not workdir.frozen_holdout.exists() and not any(workdir.root.glob("holdout.frozen*"))
    assert capture_store.tripwire_state(PARTITION)["last_good"] == {"holdout_score": None, "artifact_cid": "c"}
    assert sorted(path.name for path in workdir.root.iterdir()) == ["receipts"]

    # A hold-out written by hand names no capture: it is judged by its age.
    later = t0 + timedelta(days=WINDOW_DAYS + 5)
    workdir.frozen_holdout.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "iam"}]}\n')
    assert sweep_retention(kolm_settings, capture_store, now=later).work_files == {}
    written = (later - timedelta(days=WINDOW_DAYS + 1)).timestamp()
    os.utime(workdir.frozen_holdout, (written, written))
    assert sweep_retention(kolm_settings, capture_store, now=later).work_files == {PARTITION: ["holdout.frozen.jsonl"]}
    assert not workdir.frozen_holdout.exists()


def test_kolm_retention_sweep(kolm_settings, capsys):
    """The CLI verb runs the same sweep: the store, the work directories and the capture path's quarantine."""
    capture_store = CaptureStore(kolm_settings.store_url)
    capture_store.insert_captures([NewCapture(
        request_id="old", tenant=TENANT, namespace=NAMESPACE, provider="openai", model="m",
        messages=[{"role": "user", "content": "hello"}], output_text="fin-ops", latency_us=1, status="ok",
        http_status=200, created_at=datetime.now(UTC) - timedelta(days=31))])
    quarantined = Quarantine(kolm_settings.quarantine_dir).put(b"{}\n", ".jsonl", "IntegrityError: IntegrityError")
    stale = (datetime.now(UTC) - timedelta(days=31)).timestamp()
    for path in kolm_settings.quarantine_dir.iterdir():
        os.utime(path, (stale, stale))
    assert main(["retention", "sweep"]) == 0
    out = capsys.readouterr().out
    assert f"{PARTITION}: 1 captures expired" in out and "quarantine: 1 refused records" in out
    assert not quarantined.exists() and not any(kolm_settings.quarantine_dir.iterdir())
    assert main(["retention", "sweep"]) == 0
    assert capsys.readouterr().out == "nothing past its retention window\n"
