"""The K-score formula, the gate table row by row, the verifiers and the collapse tripwire."""

from __future__ import annotations

import json

import pytest

from kolm_pipeline.evaluate.gate import decide
from kolm_pipeline.evaluate.kscore import compute_kscore, teacher_cost_per_call
from kolm_pipeline.evaluate.tripwire import check_collapse
from kolm_pipeline.evaluate.verifiers import byte_grounded, closed_vocab, json_schema, text_match, token_f1


def test_kscore_weights_and_clamps():
    score = compute_kscore(
        accuracy=0.9, coverage=1.0, artifact_bytes=128 * 1024 * 1024, size_budget_bytes=64 * 1024 * 1024,
        teacher_p50_seconds=0.5, student_p50_seconds=0.25, teacher_cost_per_call=0.001,
        student_cost_per_call=0.0002,
    )
    assert score.size == pytest.approx(0.5)
    assert score.latency == 1.0  # faster than the teacher clamps to 1
    assert score.cost == pytest.approx(0.8)
    assert score.total == pytest.approx(0.40 * 0.9 + 0.15 * 0.5 + 0.15 * 1.0 + 0.15 * 0.8 + 0.15 * 1.0)


def test_kscore_slow_expensive_student():
    score = compute_kscore(
        accuracy=0.5, coverage=0.5, artifact_bytes=1, size_budget_bytes=10,
        teacher_p50_seconds=0.1, student_p50_seconds=0.4, teacher_cost_per_call=0.001,
        student_cost_per_call=0.002,
    )
    assert score.latency == pytest.approx(0.25)
    assert score.cost == 0.0
    assert score.total == pytest.approx(0.40 * 0.5 + 0.15 * 1 + 0.15 * 0.25 + 0 + 0.15 * 0.5)


def test_teacher_cost_uses_price_table():
    table = {"gpt-4o-mini": (0.15, 0.60), "default": (2.5, 10.0)}
    cost = teacher_cost_per_call([("gpt-4o-mini-2024", 1_000_000, 0), ("other", 0, 1_000_000)], table)
    assert cost == pytest.approx((0.15 + 10.0) / 2)


def test_a_model_is_priced_by_the_longest_name_it_starts_with():
    """gpt-4o-mini was priced as gpt-4o: the first prefix in the table's order won, not the most specific."""
    from kolm_pipeline.settings import DEFAULT_PRICE_TABLE, price_of_call

    assert price_of_call("gpt-4o-mini-2024-07-18", 1_000_000, 0, DEFAULT_PRICE_TABLE) == pytest.approx(0.15)
    assert price_of_call("gpt-4o-2024-08-06", 1_000_000, 0, DEFAULT_PRICE_TABLE) == pytest.approx(2.50)
    assert price_of_call("mistral-large", 0, 1_000_000, DEFAULT_PRICE_TABLE) == pytest.approx(10.0)  # default


@pytest.mark.parametrize(
    ("k_new", "k_current", "swap", "alert", "reason"),
    [
        (0.80, 0.70, True, False, "swap"),
        (0.711, 0.70, True, False, "swap"),
        (0.705, 0.70, False, False, "within noise"),
        (0.70, 0.70, False, False, "within noise"),
        (0.68, 0.70, False, False, "regression"),
        (0.671, 0.70, False, False, "regression"),
        (0.67, 0.70, False, True, "alerted"),
        (0.50, 0.70, False, True, "alerted"),
    ],
)
def test_gate_table(k_new, k_current, swap, alert, reason):
    decision = decide(k_new=k_new, k_current=k_current, k_floor=0.5, tripwire_clear=True)
    assert (decision.swap, decision.alert) == (swap, alert)
    assert reason in decision.reason


def test_gate_refuses_below_floor_and_on_tripwire():
    assert "K-floor" in decide(k_new=0.6, k_current=0.3, k_floor=0.7, tripwire_clear=True).reason
    tripped = decide(k_new=0.9, k_current=0.3, k_floor=0.5, tripwire_clear=False)
    assert not tripped.swap and "tripwire" in tripped.reason


def test_verifiers():
    assert closed_vocab("billing", "billing", labels=["billing", "iam"]) == (1.0, True)
    assert closed_vocab("nonsense", "billing", labels=["billing", "iam"]) == (0.0, False)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}, "required": ["a"]}
    assert json_schema('{"a": 1, "b": "x"}', json.dumps({"a": 1, "b": "y"}), schema=schema) == (0.5, True)
    assert json_schema('{"b": "x"}', '{"a": 1}', schema=schema) == (0.0, False)
    assert json_schema("not json", '{"a": 1}', schema=schema) == (0.0, False)
    assert byte_grounded("order 42", "order 42", source="where is order 42 now") == (1.0, True)
    assert byte_grounded("order 43", "order 42", source="where is order 42 now") == (0.0, False)
    expected = token_f1("the cat sat", "the cat sat down")
    assert text_match("the cat sat", "the cat sat down")[0] == pytest.approx(expected)
    assert text_match("", "x") == (0.0, False)


def test_tripwire_catches_collapsed_answers_and_holdout_drop():
    references = ["a", "b", "c", "d"] * 5
    assert check_collapse(references, references, 1.0, None).clear
    collapsed = check_collapse(["a"] * 20, references, 0.25, None)
    assert not collapsed.clear and "diversity" in collapsed.reasons[0]
    dropped = check_collapse(references, references, 0.80, {"last_good": {"holdout_score": 0.95}})
    assert not dropped.clear and "hold-out" in dropped.reasons[0]
