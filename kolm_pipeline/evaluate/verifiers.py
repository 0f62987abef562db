"""Verifiers: how one model answer is scored against the reference answer.

Each returns (score in [0, 1], in_format) so accuracy (A) and coverage (V) of the K-score come from
the same pass. The recipe names which verifier a task uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jsonschema

from kolm_pipeline.corpus.text import token_f1

VerifierResult = tuple[float, bool]

def closed_vocab(prediction: str, reference: str, *, labels: list[str], **_: object) -> VerifierResult:
    """Exact label match; in format when the answer is one of the labels."""
    answer = prediction.strip()
    return (1.0 if answer == reference.strip() else 0.0), answer in labels


def json_schema(prediction: str, reference: str, *, schema: dict, **_: object) -> VerifierResult:
    """Schema-valid JSON scores the share of the reference's top-level fields it matches."""
    try:
        value = json.loads(prediction)
        jsonschema.validate(value, schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return 0.0, False
    expected = json.loads(reference)
    if not isinstance(expected, dict) or not isinstance(value, dict):
        return (1.0 if value == expected else 0.0), True
    if not expected:
        return 1.0, True
    matched = sum(1 for key, wanted in expected.items() if value.get(key) == wanted)
    return matched / len(expected), True


def byte_grounded(prediction: str, reference: str, *, source: str, **_: object) -> VerifierResult:
    """Extractive answers must occur in the input; scored by token F1 against the reference."""
    answer = prediction.strip()
    if not answer or answer not in source:
        return 0.0, False
    return token_f1(answer, reference), True


def text_match(prediction: str, reference: str, **_: object) -> VerifierResult:
    """Free text: token F1 against the teacher's answer; in format when non-empty."""
    return token_f1(prediction, reference), bool(prediction.strip())


VERIFIERS: dict[str, Callable[..., VerifierResult]] = {
    "closed_vocab": closed_vocab,
    "json_schema": json_schema,
    "byte_grounded": byte_grounded,
    "text_match": text_match,
}


ANSWER_KINDS = ("label", "json", "text")


def agreement(kind: str, student: str, teacher: str) -> float:
    """How far the student's answer agrees with the teacher's on one live request, 0–1, the teacher's answer
    as reference: the same label (`label`), the share of the teacher's top-level JSON fields matched (`json`),
    token F1 (`text`). `kind` is what the serving runtime says the adapter answers."""
    if kind == "label":
        return 1.0 if student.strip() == teacher.strip() else 0.0
    if kind == "json":
        try:
            json.loads(teacher)
        except json.JSONDecodeError:
            return 0.0
        return json_schema(student, teacher, schema={})[0]
    return token_f1(student, teacher)
