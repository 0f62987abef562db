"""Eval-set rotation: captures tagged eval-candidate are never trained on; on each compile a share of them,
newest first, joins the eval split, the diagnostics say which, and the frozen hold-out does not move."""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kolm_pipeline.corpus.build import EVAL_CANDIDATE_TAG, build_corpus, corpus_cid, read_corpus
from kolm_pipeline.corpus.recipe import RecipeError, dry_run, dry_run_report, synthesize_recipe
from kolm_pipeline.corpus.rotation import rotate
from kolm_pipeline.demo.tickets import SYSTEM_PROMPT, generate_tickets
from kolm_pipeline.stages.corpus import NotEnoughPairs, run_corpus_stage
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import CaptureStore, KeptPair, NewCapture

EXAMPLE = Path(__file__).resolve().parents[1] / "recipes" / "support-tickets"
# What users newly ask, each a different request (the demo's queues, other wording).
NEW_QUESTIONS = [
    ("The invoice PDF for March shows a currency we never chose.", "fin-ops"),
    ("Our SAML certificate expires tomorrow, how do we rotate it?", "iam"),
    ("The Gantt view in projects renders empty for archived boards.", "l2-platform"),
    ("A pallet of our bulk order went to the neighbouring warehouse.", "logistics"),
    ("The replacement dock you sent has the same faulty USB-C port.", "rma"),
    ("Could a university lab of sixty researchers get academic pricing?", "growth"),
    ("Refund the unused months after we downgraded mid-cycle.", "fin-ops"),
    ("Audit log exports omit the actor for API token events.", "iam"),
]


def _pair(capture_id: int, text: str, output: str, tags: list[str] | None = None) -> KeptPair:
    return KeptPair(id=capture_id, messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": text}],
                    output=output, model="m", latency_us=1000, prompt_tokens=5, completion_tokens=1,
                    created_at=datetime.now(UTC), tags=tags or [])


def _ids(rows: list[dict]) -> list[int]:
    return [row["meta"]["capture_id"] for row in rows]


def test_rotation_takes_the_newest_share():
    candidates = [{"meta": {"capture_id": capture_id}} for capture_id in (10, 3, 7, 12, 5)]
    assert rotate(candidates, 0.5) == ([0, 2, 3], [1, 4])  # ceil(2.5) = 3 newest: 12, 10, 7
    assert rotate(candidates, 0.0) == ([], [0, 1, 2, 3, 4])
    assert rotate(candidates, 1) == ([0, 1, 2, 3, 4], [])
    assert len(rotate([{"meta": {"capture_id": i}} for i in range(10)], 0.3)[0]) == 3  # not 4 (float error)
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="eval rotation share must be a number from 0 to 1"):
            rotate(candidates, bad)


def _compile(pairs: list[KeptPair], where: Path, name: str, share: float = 0.5):
    data, _ = build_corpus(pairs)
    return synthesize_recipe(read_corpus(data), where / name, task="t.n", tenant="t", namespace="n",
                             corpus_cid=corpus_cid(data), frozen_holdout=where / "holdout.frozen.jsonl",
                             eval_rotation_share=share)


def test_candidates_rotate_into_eval_never_train_and_the_holdout_stays(tmp_path: Path):
    tickets = [_pair(i, t.text, t.queue) for i, t in enumerate(generate_tickets(60, seed=0), start=1)]
    first_candidates = [_pair(60 + i, text, queue, [EVAL_CANDIDATE_TAG])
                        for i, (text, queue) in enumerate(NEW_QUESTIONS[:4], start=1)]
    first = _compile(tickets + first_candidates, tmp_path, "first")
    rotation = first.diagnostics["eval_rotation"]
    assert rotation["candidates"] == 4 and rotation["rotated_in"] == 2 and rotation["share"] == 0.5
    assert rotation["rotated_in_capture_ids"] == [63, 64] and rotation["waiting_capture_ids"] == [61, 62]
    assert {63, 64} <= set(_ids(first.eval))
    assert not set(range(61, 65)) & set(_ids(first.train) + _ids(first.holdout))
    assert all(row["meta"]["eval_candidate"] for row in first.eval if row["meta"]["capture_id"] > 60)
    assert dry_run_report(first.path).problems == []
    holdout_bytes = (tmp_path / "holdout.frozen.jsonl").read_bytes()

    # The next compile: more traffic and newer candidates. The newest half rotates in; the hold-out stays.
    more = [_pair(64 + i, t.text, t.queue) for i, t in enumerate(generate_tickets(10, seed=5), start=1)]
    newer = [_pair(74 + i, text, queue, [EVAL_CANDIDATE_TAG])
             for i, (text, queue) in enumerate(NEW_QUESTIONS[4:], start=1)]
    second = _compile(tickets + first_candidates + more + newer, tmp_path, "second")
    rotation = second.diagnostics["eval_rotation"]
    assert rotation["rotated_in_capture_ids"] == [75, 76, 77, 78]
    assert rotation["waiting_capture_ids"] == [61, 62, 63, 64]
    candidates = {61, 62, 63, 64, 75, 76, 77, 78}
    assert set(_ids(second.eval)) & candidates == {75, 76, 77, 78}
    assert not candidates & set(_ids(second.train) + _ids(second.holdout))
    assert (tmp_path / "holdout.frozen.jsonl").read_bytes() == holdout_bytes
    assert second.holdout == first.holdout and second.spec["holdout_cid"] == first.spec["holdout_cid"]
    assert not second.diagnostics["holdout"]["made_now"]

    again = _compile(tickets + first_candidates + more + newer, tmp_path, "again")
    assert (again.path / "eval.jsonl").read_bytes() == (second.path / "eval.jsonl").read_bytes()
    none = _compile(tickets + first_candidates + more + newer, tmp_path, "none", share=0.0)
    assert not candidates & set(_ids(none.eval) + _ids(none.train))
    assert none.diagnostics["eval_rotation"]["waiting_capture_ids"] == sorted(candidates)
    with pytest.raises(RecipeError, match="eval rotation share must be a number from 0 to 1, got 2"):
        _compile(tickets, tmp_path, "bad", share=2)


def test_a_candidate_is_kept_beside_a_training_pair_asking_the_same():
    pairs = [_pair(1, "Where is my parcel A-1043?", "logistics"),
             _pair(2, "where is my parcel a-1043?", "logistics", [EVAL_CANDIDATE_TAG]),
             _pair(3, "Where is my parcel A-1043 ?", "logistics", [EVAL_CANDIDATE_TAG]),  # near-dup of 2
             _pair(4, "Reset my password", "iam")]
    data, stats = build_corpus(pairs)
    rows = read_corpus(data)
    # The training pair does not push the candidate out (the recipe removes the training pair instead);
    # candidates are deduped among themselves.
    assert [(row["meta"]["capture_id"], row["meta"].get("eval_candidate", False)) for row in rows] == [
        (1, False), (2, True), (4, False)]
    assert stats.eval_candidates == 1 and stats.near_duplicates_dropped == 1 and stats.written == 3


def test_candidates_do_not_count_towards_the_distill_threshold(kolm_settings):
    store = CaptureStore(kolm_settings.store_url)
    texts = [(t.text, t.queue, []) for t in generate_tickets(12, seed=1)]
    texts += [(text, queue, [EVAL_CANDIDATE_TAG]) for text, queue in NEW_QUESTIONS[:5]]
    store.insert_captures([NewCapture(
        request_id=uuid.uuid4().hex, tenant="acme", namespace="support", provider="openai", model="m",
        messages=[{"role": "user", "content": text}], output_text=queue, latency_us=1, status="ok",
        http_status=200, tags=tags) for text, queue, tags in texts])
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    store.apply_rules("acme", "support")
    workdir = NamespaceWorkdir(kolm_settings, "acme.support")
    with pytest.raises(NotEnoughPairs, match=r"12 usable kept pairs \(and 5 eval candidates\), the distill "
                                             r"threshold is 15; 3 more needed"):
        run_corpus_stage(workdir, store, min_pairs=15)
    assert run_corpus_stage(workdir, store, min_pairs=12).stats.eval_candidates == 5


def test_a_training_row_marked_as_eval_candidate_is_refused(tmp_path: Path):
    recipe = tmp_path / "recipe"
    shutil.copytree(EXAMPLE, recipe)
    lines = (recipe / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["meta"] = {"capture_id": 7, "eval_candidate": True}
    lines[1] = json.dumps(row)
    (recipe / "train.jsonl").write_text("\n".join(lines) + "\n")
    problems = dry_run(recipe)
    assert any(p.endswith("train.jsonl:2: an eval candidate (meta.eval_candidate) is never trained on")
               for p in problems), problems
