"""Each record stands alone (issue 19, item 2). A prompt with a lone surrogate failed the whole writer batch
and lost another tenant's acknowledged captures; on PostgreSQL a data error was taken for "store down", so the
poisoned batch was retried first for ever while every tenant's captures piled up behind it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from kolm_pipeline.capture.batch import BatchWriter, Pending, Quarantine
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_capture import Proxy, proxy, start_proxy, teacher  # noqa: F401 - fixtures
from kolm_pipeline_tests.test_store import store  # noqa: F401 - fixture: SQLite and PostgreSQL


def _call(target: Proxy, content: bytes, model: bytes = b"gpt-4o") -> httpx.Response:
    body = b'{"model": "' + model + b'", "messages": [{"role": "user", "content": "' + content + b'"}]}'
    return httpx.post(f"{target.url}/v1/capture/openai/chat/completions", content=body, timeout=30,
                      headers={"authorization": f"Bearer {target.key}", "content-type": "application/json",
                               **target.headers()})


def test_unstorable_text_is_refused_at_the_door_and_its_neighbours_are_recorded(proxy: Proxy) -> None:  # noqa: F811
    assert _call(proxy, b"I was charged twice").status_code == 200
    for content, model, problem in [(b"bad \\ud800 text", b"gpt-4o", "a lone surrogate"),
                                    (b"nul \\u0000 here", b"gpt-4o", "a NUL character"),
                                    (b"fine", b"gpt\\u0000-4o", "a NUL character")]:
        refused = _call(proxy, content, model)
        assert refused.status_code == 400
        assert refused.json()["error"]["message"].startswith(f"request body holds {problem}")
    too_long = _call(proxy, b"fine", b"m" * 129)  # the store holds 255, and redaction can lengthen a name
    assert too_long.status_code == 400 and "longer than 128" in too_long.json()["error"]["message"]
    emoji = _call(proxy, b"ok \\ud83d\\ude00")  # a surrogate pair is a character, not a problem
    assert emoji.status_code == 200
    assert _call(proxy, b"The app crashes on start").status_code == 200
    stored = [row.messages[-1]["content"] for row in proxy.captures()]
    assert stored == ["I was charged twice", "ok \U0001f600", "The app crashes on start"]


def _pending(request_id: str, tenant: str, reply: dict) -> tuple:
    request = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": f"hi {request_id}"}]})
    return Pending(request_id, tenant, "support", "openai", "gpt-4o", request.encode(), (), False, "reply",
                   200, json.dumps(reply).encode(), 1000, 1_700_000_000.0)


def _reply(text: str, prompt_tokens: int = 3) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1}}


def test_a_record_the_store_refuses_is_quarantined_alone(store: CaptureStore, tmp_path: Path) -> None:  # noqa: F811
    for tenant in ("acme", "other"):
        store.create_tenant(tenant)
    writer = BatchWriter(store, Quarantine(tmp_path / "quarantine"))
    assert writer.write([
        _pending("a1", "acme", _reply("fin-ops")),
        _pending("bad", "acme", _reply("iam", prompt_tokens=2**63 + 5)),  # a number no integer column holds
        _pending("o1", "other", _reply("bad \ud800 reply \x00 text")),  # stored safely, as U+FFFD
        _pending("o2", "other", _reply("logistics")),
    ]), "a data error is not an outage: the batch is done with, not tried again"
    stored = {row.request_id: row.output_text for tenant in ("acme", "other") for row in store.list_captures(tenant)}
    assert stored == {"a1": "fin-ops", "o1": "bad \ufffd reply \ufffd text", "o2": "logistics"}
    assert (writer.stats["written"], writer.stats["quarantined"]) == (3, 1)
    failed = sorted((tmp_path / "quarantine").iterdir())
    assert [path.suffix for path in failed] == [".jsonl", ".reason"]
    assert "bad" in failed[0].read_text() and "iam" not in failed[1].read_text()  # the reason names no text
    writer.write([_pending("a2", "acme", _reply("growth"))])  # the store was never taken for down
    assert any(row.request_id == "a2" for row in store.list_captures("acme"))


def test_quarantined_records_expire_with_the_retention_sweep(store: CaptureStore, tmp_path: Path) -> None:  # noqa: F811
    """A quarantined record keeps its text only until retention's cutoff passes it."""
    from datetime import UTC, datetime, timedelta

    store.create_tenant("acme")
    quarantine = Quarantine(tmp_path / "quarantine")
    writer = BatchWriter(store, quarantine)
    assert writer.write([_pending("bad", "acme", _reply("iam", prompt_tokens=2**63 + 5))])
    assert len(quarantine.files()) == 1
    assert quarantine.expire(datetime.now(UTC) - timedelta(days=1)) == 0  # quarantined after the cutoff: kept
    assert quarantine.expire(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert not list((tmp_path / "quarantine").iterdir())
