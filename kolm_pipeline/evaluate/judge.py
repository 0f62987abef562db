"""An optional judge of free-text answers: a model asked whether the student's answer says what the teacher's does.

Token F1 against the teacher's answer scores a correct paraphrase low and a wrong answer that reuses the reference's
words high. With `KOLM_JUDGE_MODEL` set, evaluation asks that model — over the OpenAI-compatible API at
`KOLM_JUDGE_URL` (default: the proxy's upstream, `KOLM_UPSTREAM_OPENAI`), with `KOLM_JUDGE_API_KEY` — for each
free-text case whether the answer is equivalent to the reference for the request; the case scores 1 on YES, 0
otherwise. The same judge scores every model of an evaluation, so candidate and current stay comparable.

Verdicts are cached in the namespace's work directory by a digest of (judge model, prompt version, request,
reference, answer) — no text is kept — so an answer is judged once: the bare base's answers, which evaluation
reuses, and an unchanged candidate's cost nothing the next time. Calls, cached verdicts, tokens and their price
(`KOLM_PRICE_TABLE`, the judge model's entry) are counted; they are the evaluation's cost, not the student's.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.provenance.atomic import write_json_atomic
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.settings import Settings, price_of_call

# Bump when the prompt changes: cached verdicts were given to another question.
JUDGE_PROMPT_VERSION = 1
# Requests in flight at once: a frontier API answers many in parallel; a few hundred cases stay a minute's work.
JUDGE_CONCURRENCY = 8
# Verdicts the cache file keeps, the most recently used: each distill judges a new adapter's answers, so without a
# bound the file would grow with every run.
JUDGE_CACHE_LIMIT = 20_000
JUDGE_SYSTEM_PROMPT = (
    "You compare a student's answer with a reference answer written for the same request. Reply YES if the "
    "student's answer gives the same information and would serve the person who asked as well as the reference "
    "does (wording may differ); reply NO otherwise. Reply with YES or NO only.")
_FIRST_WORD = re.compile(r"[A-Za-z]+")


class JudgeError(UserError, RuntimeError):
    """The judge could not be asked (unreachable, refused the key, no such model)."""


def judged(recipe_spec: dict) -> bool:
    """Whether a judge scores this recipe's answers: free text only (labels and JSON have exact verifiers)."""
    return recipe_spec.get("verifier") == "text_match"


def judge_question(request: str, reference: str, answer: str) -> str:
    """The user message the judge reads for one case."""
    return (f"Request:\n<<<\n{request}\n>>>\n\nReference answer:\n<<<\n{reference}\n>>>\n\n"
            f"Student answer:\n<<<\n{answer}\n>>>\n\nIs the student's answer equivalent to the reference? YES or NO.")


@dataclass
class JudgeUsage:
    """What judging cost so far: calls made, verdicts taken from the cache, and dollars (the calls' tokens priced);
    replies that were neither YES nor NO count as NO and are counted here too."""

    calls: int = 0
    cached: int = 0
    unclear: int = 0
    dollars: float = 0.0

    def since(self, earlier: JudgeUsage) -> dict[str, float]:
        """The usage between `earlier` (a copy taken before) and now, as metadata (`judge_*` names)."""
        return {"judge_calls": self.calls - earlier.calls, "judge_cached": self.cached - earlier.cached,
                "judge_unclear": self.unclear - earlier.unclear,
                "judge_dollars": round(self.dollars - earlier.dollars, 6)}


class Judge:
    """Asks `model` at `base_url` whether answers are equivalent to their references; verdicts cached in `cache`."""

    def __init__(self, model: str, base_url: str, api_key: str | None, cache: Path | None,
                 price_table: dict[str, tuple[float, float]]) -> None:
        import openai

        self.model, self.base_url, self._cache, self._prices = model, base_url, cache, price_table
        # The key is held by the client only: never written, logged or put in an error message.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=2, timeout=60.0)
        self._verdicts: dict[str, bool] = _read_cache(cache)
        self._lock = threading.Lock()
        self.usage = JudgeUsage()

    @classmethod
    def from_settings(cls, settings: Settings, cache: Path | None) -> Judge | None:
        """The judge `KOLM_JUDGE_*` name, or None when `KOLM_JUDGE_MODEL` is unset (free text scored by token F1)."""
        if not settings.judge_model:
            return None
        key = settings.judge_api_key.get_secret_value() if settings.judge_api_key is not None else None
        return cls(settings.judge_model, settings.judge_url or settings.upstream_openai, key, cache,
                   settings.price_table)

    def _key(self, request: str, reference: str, answer: str) -> str:
        payload = json.dumps([self.model, JUDGE_PROMPT_VERSION, request, reference, answer], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def verdicts(self, cases: list[tuple[str, str, str]]) -> list[bool]:
        """For each (request, reference, answer): whether the judge says the answer is equivalent. An empty answer
        is not and an answer equal to its reference is, without asking; the rest are asked concurrently, once."""
        found: list[bool | None] = []
        waiting: dict[int, str] = {}  # case index -> key of a verdict still to be asked
        asked: dict[str, tuple[str, str, str]] = {}
        for index, (request, reference, answer) in enumerate(cases):
            if not answer.strip() or answer.strip() == reference.strip():
                found.append(bool(answer.strip()))
                continue
            key = self._key(request, reference, answer)
            if key in self._verdicts:
                self.usage.cached += 1
                self._verdicts[key] = self._verdicts.pop(key)  # now the most recently used
                found.append(self._verdicts[key])
            else:
                waiting[index] = key
                asked.setdefault(key, (request, reference, answer))
                found.append(None)
        if asked:
            try:
                with ThreadPoolExecutor(max_workers=JUDGE_CONCURRENCY) as pool:
                    for key, verdict in zip(asked, pool.map(lambda case: self._ask(*case), asked.values()),
                                            strict=True):
                        self._verdicts[key] = verdict
            finally:
                self.save()  # what was judged before a failure is not asked again
        return [self._verdicts[waiting[index]] if verdict is None else verdict for index, verdict in enumerate(found)]

    def _ask(self, request: str, reference: str, answer: str) -> bool:
        import openai

        try:
            reply = self._client.chat.completions.create(
                model=self.model, temperature=0, max_tokens=3,
                messages=[{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                          {"role": "user", "content": judge_question(request, reference, answer)}])
        except openai.APIError as exc:
            raise JudgeError(f"the judge {self.model} at {self.base_url} could not be asked: {_reason(exc)} "
                             "(KOLM_JUDGE_MODEL, KOLM_JUDGE_URL, KOLM_JUDGE_API_KEY; unset KOLM_JUDGE_MODEL to score "
                             "free text by token F1)") from None
        text = (reply.choices[0].message.content or "") if reply.choices else ""
        word = _FIRST_WORD.search(text)
        verdict = word.group().upper() if word else ""
        usage = reply.usage
        with self._lock:
            self.usage.calls += 1
            self.usage.unclear += verdict not in ("YES", "NO")
            if usage is not None:
                self.usage.dollars += price_of_call(self.model, usage.prompt_tokens or 0,
                                                    usage.completion_tokens or 0, self._prices)
        return verdict == "YES"

    def save(self) -> None:
        """Write the verdicts to the cache file (atomically), when there is one: the ``JUDGE_CACHE_LIMIT`` most
        recently used."""
        for key in list(self._verdicts)[: max(0, len(self._verdicts) - JUDGE_CACHE_LIMIT)]:
            del self._verdicts[key]
        if self._cache is not None:
            write_json_atomic(self._cache, {"version": JUDGE_PROMPT_VERSION, "model": self.model,
                                            "verdicts": self._verdicts})


def _read_cache(cache: Path | None) -> dict[str, bool]:
    """The cached verdicts; none when the file is missing, unreadable or from another prompt version."""
    if cache is None or not cache.is_file():
        return {}
    try:
        document = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("version") != JUDGE_PROMPT_VERSION:
        return {}
    verdicts = document.get("verdicts")
    return {key: value for key, value in verdicts.items() if isinstance(value, bool)} \
        if isinstance(verdicts, dict) else {}


def _reason(exc: Exception) -> str:
    """An API error in one line: the status and the server's message, or the connection problem."""
    status = getattr(exc, "status_code", None)
    message = " ".join(str(getattr(exc, "message", exc)).split())[:200]
    return f"HTTP {status}: {message}" if status else message
