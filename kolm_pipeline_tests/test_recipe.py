"""Corpus building and recipe synthesis: source gate, dedup, output kinds, the frozen hold-out."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kolm_pipeline.corpus.build import SERVED_TAG, build_corpus, read_corpus
from kolm_pipeline.corpus.recipe import RecipeError, detect_output_kind, dry_run, load_recipe, synthesize_recipe
from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.store import KeptPair

REPO = Path(__file__).resolve().parents[1]


def _pair(index: int, text: str, output: str, tags: list[str] | None = None) -> KeptPair:
    return KeptPair(id=index, messages=[{"role": "user", "content": text}], output=output, model="m",
                    latency_us=1000, prompt_tokens=5, completion_tokens=1, created_at=datetime.now(UTC),
                    tags=tags or [])


def _rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def test_corpus_source_gate_and_exact_dedup():
    pairs = [
        _pair(1, "Where is my order?", "logistics"),
        _pair(2, "where is  my ORDER?", "logistics"),
        _pair(3, "Reset my password", "iam", tags=[SERVED_TAG]),
        _pair(4, "Refund please", ""),
        _pair(5, "Refund please!", "fin-ops"),
    ]
    data, stats = build_corpus(pairs)
    rows = read_corpus(data)
    assert stats.excluded_served == 1 and stats.duplicates_dropped == 1 and stats.empty_dropped == 1
    assert [row["meta"]["capture_id"] for row in rows] == [2, 5]
    assert build_corpus(pairs)[0] == data  # deterministic bytes, stable CID


def test_output_kinds():
    tickets = generate_tickets(60)
    categorical = _rows([(t.text, t.queue) for t in tickets])
    assert detect_output_kind(categorical)[0] == "categorical"
    json_rows = _rows([(f"q{i}", json.dumps({"id": i, "kind": ["a", "b"][i % 2]})) for i in range(30)])
    kind, extra = detect_output_kind(json_rows)
    assert kind == "json" and extra["json_schema"]["required"] == ["id", "kind"]
    assert extra["json_schema"]["properties"]["kind"]["enum"] == ["a", "b"]
    extractive = _rows([(f"my order number is X{i}{i}{i} please check", f"X{i}{i}{i}") for i in range(30)])
    assert detect_output_kind(extractive)[0] == "extractive"
    free = _rows([(f"q{i}", f"a long and varied answer number {i} with words") for i in range(30)])
    assert detect_output_kind(free)[0] == "free_text"


def test_holdout_is_frozen_across_recipes(tmp_path):
    rows = _rows([(t.text, t.queue) for t in generate_tickets(120)])
    frozen = tmp_path / "holdout.frozen.jsonl"
    first = synthesize_recipe(rows, tmp_path / "r1", task="t.n", tenant="t", namespace="n", corpus_cid="c",
                              frozen_holdout=frozen)
    more = rows + _rows([(t.text + " (again)", t.queue) for t in generate_tickets(40, seed=99)])
    second = synthesize_recipe(more, tmp_path / "r2", task="t.n", tenant="t", namespace="n", corpus_cid="c",
                               frozen_holdout=frozen)
    assert first.holdout == second.holdout
    held = {json.dumps(r["messages"][:-1]) for r in second.holdout}
    assert not held & {json.dumps(r["messages"][:-1]) for r in second.train + second.eval}
    assert set(first.spec["labels"]) == {t.queue for t in generate_tickets(120)}


def test_handwritten_recipe_is_valid():
    assert dry_run(REPO / "recipes" / "support-tickets") == []


def test_bad_recipe_names_file_and_line(tmp_path):
    recipe = tmp_path / "bad"
    recipe.mkdir()
    (recipe / "spec.json").write_text(json.dumps({"format": "kolm-recipe/1", "task": "x", "output_kind": "categorical",
                                                  "verifier": "closed_vocab", "k_floor": 0.5}))
    with pytest.raises(RecipeError, match="labels"):
        load_recipe(recipe)
    spec = json.loads((REPO / "recipes" / "support-tickets" / "spec.json").read_text())
    (recipe / "spec.json").write_text(json.dumps(spec))
    (recipe / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                        '{"role": "assistant", "content": "iam"}]}\n{oops\n')
    (recipe / "eval.jsonl").write_text("")
    with pytest.raises(RecipeError, match=r"train\.jsonl:2"):
        load_recipe(recipe)
