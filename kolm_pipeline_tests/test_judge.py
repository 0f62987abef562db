"""The free-text judge (evaluate/judge.py), asked over real HTTP with the official `openai` SDK.

A STAND-IN JUDGE stands where a frontier model would (it is not part of kolm): an OpenAI-compatible server that says
YES when the student's answer has the same words as the reference in any order or is a paraphrase it knows, NO
otherwise, "Perhaps" when the answer says "maybe"; it records what it was asked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.corpus.recipe import Recipe
from kolm_pipeline.evaluate.evaluation import score_split
from kolm_pipeline.evaluate.judge import Judge, JudgeError
from kolm_pipeline.settings import DEFAULT_PRICE_TABLE, Settings, price_of_call

JUDGE_MODEL = "gpt-4o-mini-judge"
KEY = "sk-judge-secret-123"
PARAPHRASES = {("We open at nine.", "Our doors open at 9 am.")}
_BLOCK = re.compile(r"Reference answer:\n<<<\n(.*?)\n>>>\n\nStudent answer:\n<<<\n(.*?)\n>>>", re.S)


def stand_in_judge_app(seen: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}},
                                status_code=401)
        body = await request.json()
        reference, answer = _BLOCK.search(body["messages"][-1]["content"]).groups()
        seen.append({"model": body["model"], "reference": reference, "answer": answer})
        same = sorted(re.findall(r"\w+", reference.lower())) == sorted(re.findall(r"\w+", answer.lower())) \
            or (reference, answer) in PARAPHRASES
        verdict = "Perhaps" if "maybe" in answer.lower() else "YES." if same else "NO"
        return {"id": "judge-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 120, "completion_tokens": 1, "total_tokens": 121}}

    return app


@pytest.fixture
def judge_server():
    seen: list[dict] = []
    with BackgroundServer(stand_in_judge_app(seen)) as server:
        yield server.url + "/v1", seen


def _judge(url: str, cache: Path | None, key: str = KEY) -> Judge:
    return Judge(JUDGE_MODEL, url, key, cache, dict(DEFAULT_PRICE_TABLE))


def test_verdicts_are_asked_once_cached_without_text_and_priced(judge_server, tmp_path):
    url, seen = judge_server
    cache = tmp_path / "judge_verdicts.json"
    cases = [("When do you open?", "We open at nine.", "At nine we open."),   # the same words: YES
             ("When do you open?", "We open at nine.", "We open at ten."),    # NO
             ("When do you open?", "We open at nine.", "We open at nine."),   # equal to the reference: no call
             ("When do you open?", "We open at nine.", "   "),                # empty: not equivalent, no call
             ("When do you open?", "We open at nine.", "At nine we open."),   # asked once for both
             ("Refund?", "Yes, within 30 days.", "maybe")]                    # neither YES nor NO: counted as NO
    judge = _judge(url, cache)
    assert judge.verdicts(cases) == [True, False, True, False, True, False]
    assert len(seen) == 3 and {call["model"] for call in seen} == {JUDGE_MODEL}
    assert (judge.usage.calls, judge.usage.cached, judge.usage.unclear) == (3, 0, 1)
    assert judge.usage.dollars == pytest.approx(3 * price_of_call(JUDGE_MODEL, 120, 1, DEFAULT_PRICE_TABLE))

    stored = cache.read_text()
    assert "nine" not in stored and "Refund" not in stored and KEY not in stored  # digests and verdicts only
    again = _judge(url, cache)
    assert again.verdicts(cases) == [True, False, True, False, True, False]
    assert (again.usage.calls, again.usage.cached, len(seen)) == (0, 4, 3)  # the next evaluation asks nothing


def test_the_verdict_cache_keeps_the_most_recently_used_verdicts_up_to_its_bound(judge_server, tmp_path,
                                                                              monkeypatch):
    """Every distill judges a new adapter's answers; the cache file keeps the verdicts used most recently, at most
    JUDGE_CACHE_LIMIT of them, so it does not grow with every run."""
    import kolm_pipeline.evaluate.judge as judge_module

    monkeypatch.setattr(judge_module, "JUDGE_CACHE_LIMIT", 3)
    url, seen = judge_server
    cache = tmp_path / "judge_verdicts.json"
    case = [("When do you open?", "We open at nine.", f"We open at {hour}.") for hour in range(1, 6)]
    judge = _judge(url, cache)
    judge.verdicts(case[:3])  # 1, 2, 3
    judge.verdicts(case[:1])  # 1 used again: now the most recent
    judge.verdicts(case[3:5])  # 4 and 5 push out the least recently used: 2 and 3
    assert len(seen) == 5
    again = _judge(url, cache)
    assert again.verdicts([case[0], case[3], case[4]]) == [False, False, False]
    assert (again.usage.calls, again.usage.cached) == (0, 3)
    assert again.verdicts([case[1]]) == [False] and again.usage.calls == 1  # 2 was dropped: asked again


def test_an_unreachable_or_refusing_judge_is_one_clear_error_without_the_key(judge_server, tmp_path):
    url, _ = judge_server
    with pytest.raises(JudgeError) as refused:
        _judge(url, tmp_path / "v.json", key="sk-wrong-key-456").verdicts([("q", "a b", "b c")])
    message = str(refused.value)
    assert JUDGE_MODEL in message and url in message and "HTTP 401" in message and "Incorrect API key" in message
    assert "sk-wrong" not in message and "KOLM_JUDGE_MODEL" in message

    closed = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    with pytest.raises(JudgeError, match=r"the judge gpt-4o-mini-judge at http://127\.0\.0\.1:9/v1 could not be"):
        _judge(closed, None).verdicts([("q", "a b", "b c")])


def test_free_text_scored_by_the_judge_instead_of_token_f1(judge_server, tmp_path):
    url, _ = judge_server
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reference}]}
            for question, reference in [("When do you open?", "We open at nine."), ("Where are you?", "On Main St.")]]
    recipe = Recipe(path=tmp_path, spec={"verifier": "text_match"}, train=[], eval=rows, holdout=[])
    answers = ["Our doors open at 9 am.", "On Elm St."]  # a paraphrase (right) and a near miss (wrong)
    by_f1 = score_split(recipe, rows, answers)
    by_judge = score_split(recipe, rows, answers, _judge(url, None))
    assert by_judge.scores == [1.0, 0.0] and by_judge.accuracy == 0.5 and by_judge.coverage == 1.0
    assert by_f1.scores[0] < 1.0 and by_f1.scores[1] > 0.0  # what token F1 gets wrong both ways

    labels = Recipe(path=tmp_path, spec={"verifier": "closed_vocab", "labels": ["a", "b"]}, train=[], eval=[],
                    holdout=[])
    label_rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}]}]
    assert score_split(labels, label_rows, ["b"], _judge("http://127.0.0.1:9/v1", None)).scores == [0.0]  # not asked


def test_judge_settings_default_to_the_proxy_upstream_and_hide_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("KOLM_HOME", str(tmp_path))
    assert Judge.from_settings(Settings(), None) is None  # unset: free text is scored by token F1
    monkeypatch.setenv("KOLM_JUDGE_MODEL", JUDGE_MODEL)
    monkeypatch.setenv("KOLM_UPSTREAM_OPENAI", "http://upstream.example/v1")
    monkeypatch.setenv("KOLM_JUDGE_API_KEY", KEY)
    settings = Settings()
    judge = Judge.from_settings(settings, None)
    assert (judge.model, judge.base_url) == (JUDGE_MODEL, "http://upstream.example/v1")
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    monkeypatch.setenv("KOLM_JUDGE_URL", "http://judge.example/v1")
    assert Judge.from_settings(Settings(), None).base_url == "http://judge.example/v1"
