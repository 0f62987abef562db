"""Evaluate candidate and current champion side by side: same base, same eval split, same run.

The base model is loaded once; every adapter is attached to it under its own name, and the bare base
is evaluated with the adapters disabled, so the comparison differs in nothing but the adapter. One exception
to "same run": the bare base's answers are reused from earlier evaluations of the namespace for cases it has
answered before with the same weights and decoding (`BaseAnswers`), since they cannot differ; its latency is
still measured in this run, interleaved with the other models'.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kolm_pipeline.capture.images import ImageStore
from kolm_pipeline.corpus.build import input_key
from kolm_pipeline.corpus.recipe import Recipe, answer, prompt_text
from kolm_pipeline.evaluate.inference import DECODING_VERSION, Prediction, predict
from kolm_pipeline.evaluate.judge import Judge, judged
from kolm_pipeline.evaluate.kscore import KScore, compute_kscore, teacher_cost_per_call
from kolm_pipeline.evaluate.verifiers import VERIFIERS
from kolm_pipeline.provenance.atomic import write_json_atomic
from kolm_pipeline.train.base_model import BaseModel, load_causal_lm, load_tokenizer
from kolm_pipeline.train.vision import generate_answers, load_vision

LATENCY_PROBE_CASES = 8
# Generation stops at ANSWER_ROOM times the teacher's longest answer (counted in the base's tokens) plus
# ANSWER_SLACK tokens: an answer that much longer than any the teacher wrote is wrong anyway, and a model that does
# not stop (the bare base on a JSON task writes until it is cut off) costs the evaluation its whole budget a case.
ANSWER_ROOM = 1.25
ANSWER_SLACK = 8
# A case passes when its answer is in format and scores at least this; the same rule for every verifier,
# so a version diff can say which cases flipped between two evaluations.
CASE_PASS_SCORE = 0.5
# Texts shown for a case are previews, so case_previews.json stays small whatever the answers' length.
CASE_PREVIEW_CHARS = 120


@dataclass
class SplitScore:
    """Verifier results on one split."""

    accuracy: float
    coverage: float
    outputs: list[str]
    scores: list[float]
    in_format: list[bool] = field(default_factory=list)


@dataclass
class ModelReport:
    """Everything measured for one model in an evaluation run."""

    name: str
    kscore: KScore
    eval: SplitScore
    holdout: SplitScore
    eval_seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {
            **{key: round(value, 4) for key, value in self.kscore.as_dict().items()},
            "holdout_accuracy": round(self.holdout.accuracy, 4),
            "eval_seconds": round(self.eval_seconds, 2),
            **self.extra,
        }


@dataclass(frozen=True)
class TeacherStats:
    p50_seconds: float
    cost_per_call: float


def teacher_stats(rows: list[dict], price_table: dict[str, tuple[float, float]]) -> TeacherStats:
    """Teacher latency and cost from what the proxy measured at capture (kept in each row's meta)."""
    metas = [row.get("meta") or {} for row in rows]
    latencies = [m["latency_us"] / 1e6 for m in metas if m.get("latency_us")]
    usages = [
        (m.get("model", "default"), int(m.get("prompt_tokens", 0)), int(m.get("completion_tokens", 0)))
        for m in metas
        if m.get("prompt_tokens") or m.get("completion_tokens")
    ]
    return TeacherStats(
        p50_seconds=statistics.median(latencies) if latencies else 0.0,
        cost_per_call=teacher_cost_per_call(usages, price_table),
    )


def adapter_bytes(adapter_dir: Path | None) -> int:
    if adapter_dir is None:
        return 0
    return sum(path.stat().st_size for path in adapter_dir.iterdir() if path.is_file())


def score_split(recipe: Recipe, rows: list[dict], outputs: list[str], judge: Judge | None = None) -> SplitScore:
    """Each answer scored by the recipe's verifier; a free-text answer by `judge` instead, when given (1 when it
    says the answer is equivalent to the reference, in format when not empty)."""
    if judge is not None and judged(recipe.spec):
        verdicts = judge.verdicts([(prompt_text(row), answer(row), output)
                                   for row, output in zip(rows, outputs, strict=True)])
        results = [(1.0 if verdict else 0.0, bool(output.strip()))
                   for verdict, output in zip(verdicts, outputs, strict=True)]
    else:
        verify = VERIFIERS[recipe.spec["verifier"]]
        results = [
            verify(output, answer(row), labels=recipe.labels or [], schema=recipe.spec.get("json_schema", {}),
                   source=prompt_text(row))
            for row, output in zip(rows, outputs, strict=True)
        ]
    count = max(1, len(results))
    return SplitScore(
        accuracy=sum(score for score, _ in results) / count,
        coverage=sum(1 for _, ok in results if ok) / count,
        outputs=outputs,
        scores=[score for score, _ in results],
        in_format=[ok for _, ok in results],
    )


def case_key(messages: list[dict]) -> str:
    """A short, stable id of an eval case: a digest of its input key (`corpus.build.input_key`), so two
    evaluations on different splits are matched on the same conversation, without keeping its text."""
    return hashlib.sha256(input_key(messages).encode()).hexdigest()[:16]


def preview(text: str, limit: int = CASE_PREVIEW_CHARS) -> str:
    """One line of at most `limit` characters, for tables of cases."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _last_user_text(messages: list[dict]) -> str:
    """What a reader recognises a case by: its last user message (system prompts are shared by all)."""
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def case_verdicts(rows: list[dict], sides: dict[str, SplitScore]) -> dict:
    """Per-case verdicts of every side on one split (the `case_verdicts` block of evaluation.json).

    Each case: `key` (see `case_key`) and per side the verifier score, in-format flag and pass (score ≥
    CASE_PASS_SCORE and in format). No text: evaluation.json ships inside the `.kolm` as evals.json, which
    outlives every capture's retention window; the texts are in `case_previews`, kept in the work dir."""
    cases = []
    for index, row in enumerate(rows):
        case: dict = {"key": case_key(row["messages"][:-1])}
        for name, split in sides.items():
            score, ok = float(split.scores[index]), bool(split.in_format[index])
            case[name] = {"score": round(score, 4), "in_format": ok, "pass": ok and score >= CASE_PASS_SCORE}
        cases.append(case)
    return {"pass_score": CASE_PASS_SCORE, "key": "sha256(corpus.build.input_key)[:16]", "cases": cases}


def case_previews(rows: list[dict], sides: dict[str, SplitScore]) -> list[dict]:
    """The texts behind `case_verdicts`, case by case in the same order: `key`, the capture the case came from
    (retention removes the previews once it expires), previews of the input and expected answer, and each
    side's output preview."""
    previews = []
    for index, row in enumerate(rows):
        conversation = row["messages"][:-1]
        previews.append({
            "key": case_key(conversation),
            "capture_id": (row.get("meta") or {}).get("capture_id"),
            "input": preview(_last_user_text(conversation)),
            "expected": preview(answer(row)),
            "outputs": {name: preview(split.outputs[index]) for name, split in sides.items()},
        })
    return previews


BASE_ANSWERS_FORMAT = "kolm-base-answers/1"


@dataclass
class BaseAnswers:
    """The bare base's answers from earlier evaluations of this namespace, by case (`case_key`).

    The base is deterministic: the same weights (digest), decoding settings and input give the same answer, so
    each distill evaluates the base only on the cases it has not answered before (the frozen hold-out and most of
    the eval split recur). Kept in the work directory beside `case_previews.json`, with the capture each case came
    from, so retention removes the file with its captures like the previews."""

    path: Path | None
    key: str
    outputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None, key: str) -> BaseAnswers:
        answers = cls(path=path, key=key)
        if path is None or not path.is_file():
            return answers
        try:
            document = json.loads(path.read_bytes())
            if document.get("format") == BASE_ANSWERS_FORMAT and document.get("key") == key:
                answers.outputs = {str(case["key"]): str(case["output"]) for case in document["cases"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable file is a cache miss: the base is evaluated again and the file rewritten
        return answers

    def save(self, rows: list[dict], outputs: list[str]) -> None:
        if self.path is None:
            return
        cases = [{"key": case_key(row["messages"][:-1]), "capture_id": (row.get("meta") or {}).get("capture_id"),
                  "output": output} for row, output in zip(rows, outputs, strict=True)]
        write_json_atomic(self.path, {"format": BASE_ANSWERS_FORMAT, "key": self.key, "cases": cases})


def generation_budget(tokenizer, recipe: Recipe) -> int:
    """Most new tokens an answer gets in evaluation: the recipe's ``max_new_tokens`` (estimated from characters,
    the recipe knows no tokenizer), tightened to ANSWER_ROOM times the longest train or eval answer as this base's
    tokenizer counts it, plus ANSWER_SLACK. The hold-out's answers are not read."""
    limit = int(recipe.spec.get("max_new_tokens", 128))
    texts = [answer(row) for row in recipe.train + recipe.eval]
    if not texts:
        return limit
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)
    return max(1, min(limit, math.ceil(ANSWER_ROOM * longest) + ANSWER_SLACK))


def base_answers_key(base: BaseModel, recipe: Recipe, budget: int, dtype: str = "float32") -> str:
    """What the base's answers depend on besides the input: its weights, the dtype they run in and how it decodes
    (``budget``: the generation budget of this evaluation, see ``generation_budget``)."""
    spec = recipe.spec
    return hashlib.sha256(json.dumps({
        "base": base.digest, "labels": recipe.labels, "max_new_tokens": budget,
        "output_kind": spec.get("output_kind"), "json_schema": spec.get("json_schema"),
        "decoding": DECODING_VERSION, "dtype": dtype,
    }, sort_keys=True).encode()).hexdigest()


def evaluate_models(
    base: BaseModel,
    adapters: dict[str, Path | None],
    recipe: Recipe,
    *,
    size_budget_bytes: int,
    price_table: dict[str, tuple[float, float]],
    student_dollars_per_hour: float,
    teacher_rows: list[dict] | None = None,
    base_answers: Path | None = None,
    images: ImageStore | None = None,
    judge: Judge | None = None,
    inference_dtype: str = "auto",
) -> dict[str, ModelReport]:
    """Evaluate each named adapter (None = the bare base) on the recipe's eval and hold-out splits. A
    vision-language base answers by greedy generation, reading the rows' images from `images`. With `judge`, a
    free-text task's answers are scored by it (``score_split``) and each model's report counts what that cost.

    With `base_answers` (a file), the bare base answers only the cases that file does not hold yet
    (`BaseAnswers`). The latency probe is measured live for every model, in interleaved rounds so that load
    on the machine falls on all of them alike (a probe run model after model flipped the gate under load)."""
    from kolm_pipeline.evaluate.lora_slots import LoraSlots  # imports torch: only when evaluating

    if base.vision:
        model, tokenizer = load_vision(base)  # the processor stands where the tokenizer does
    else:
        tokenizer = load_tokenizer(base)
        model = load_causal_lm(base, inference_dtype)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    # The adapters sit in LoRA slots, as `kolm serve` holds them: each is evaluated with the arithmetic it is
    # served with (on a CPU, merged into a copy of each layer's weight).
    slots = LoraSlots(model)
    for name, path in adapters.items():
        if path is not None:
            slots.load(name, path)
    teacher = teacher_stats(teacher_rows or recipe.train + recipe.eval, price_table)
    rows = recipe.eval + recipe.holdout
    budget = generation_budget(getattr(tokenizer, "tokenizer", tokenizer), recipe)  # a processor holds one

    def select(name: str) -> None:
        """Make the model `name`: the bare base (no adapter), or that adapter."""
        slots.select(None if adapters[name] is None else name)

    def predicted(conversations: list[list[dict]]) -> list[Prediction]:
        if base.vision:
            answers = generate_answers(model, tokenizer, conversations, images, budget)
            return [Prediction(output=text, seconds=seconds) for text, seconds in answers]
        return _predict(model, tokenizer, recipe, conversations, budget)

    def answer_all(conversations: list[list[dict]]) -> list[str]:
        return [p.output for p in predicted(conversations)] if conversations else []

    outputs: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    reused: dict[str, int] = {}
    for name, path in adapters.items():
        began = time.perf_counter()
        select(name)
        if path is None:
            cache = BaseAnswers.load(base_answers, base_answers_key(base, recipe, budget, dtype))
            keys = [case_key(row["messages"][:-1]) for row in rows]
            missing = [index for index, key in enumerate(keys) if key not in cache.outputs]
            fresh = dict(zip(missing, answer_all([rows[index]["messages"][:-1] for index in missing]),
                             strict=True))
            outputs[name] = [fresh[index] if index in fresh else cache.outputs[key]
                             for index, key in enumerate(keys)]
            reused[name] = len(rows) - len(missing)
            cache.save(rows, outputs[name])
        else:
            outputs[name] = answer_all([row["messages"][:-1] for row in rows])
        seconds[name] = time.perf_counter() - began

    probes: dict[str, list[float]] = {name: [] for name in adapters}
    order = list(adapters)
    for round_index, row in enumerate(recipe.eval[:LATENCY_PROBE_CASES]):
        for name in order if round_index % 2 == 0 else order[::-1]:
            began = time.perf_counter()
            select(name)
            probes[name].append(predicted([row["messages"][:-1]])[0].seconds)
            seconds[name] += time.perf_counter() - began

    reports: dict[str, ModelReport] = {}
    split = len(recipe.eval)
    for name, path in adapters.items():
        judged_before = replace(judge.usage) if judge is not None and judged(recipe.spec) else None
        eval_score = score_split(recipe, recipe.eval, outputs[name][:split], judge)
        holdout_score = score_split(recipe, recipe.holdout, outputs[name][split:], judge)
        student_p50 = statistics.median(probes[name]) if probes[name] else 0.0
        kscore = compute_kscore(
            accuracy=eval_score.accuracy,
            coverage=eval_score.coverage,
            artifact_bytes=adapter_bytes(path),
            size_budget_bytes=size_budget_bytes,
            teacher_p50_seconds=teacher.p50_seconds,
            student_p50_seconds=student_p50,
            teacher_cost_per_call=teacher.cost_per_call,
            student_cost_per_call=student_p50 * student_dollars_per_hour / 3600,
        )
        extra = {"reused_cases": reused[name]} if name in reused else {}
        if not recipe.labels:
            extra["generation_budget"] = budget
        if judged_before is not None:
            extra.update(judge.usage.since(judged_before))
        reports[name] = ModelReport(name=name, kscore=kscore, eval=eval_score, holdout=holdout_score,
                                    eval_seconds=seconds[name], extra=extra)
    return reports


def _predict(model, tokenizer, recipe: Recipe, conversations: list[list[dict]], budget: int):
    """The model's answers as the recipe's task decodes them (label set, or free generation of at most
    ``budget`` new tokens)."""
    return predict(model, tokenizer, conversations, recipe.labels, budget,
                   json_schema=recipe.spec.get("json_schema") if recipe.spec.get("output_kind") == "json" else None)
