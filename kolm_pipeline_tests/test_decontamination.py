"""Decontamination: no training pair overlaps an input the student is judged on (the frozen hold-out, the
eval split, every eval candidate) exactly after normalisation, by a shared 13-gram, or as a MiniLM
near-duplicate. Planted duplicates of each kind never reach train.jsonl, the file the trainer reads, and the
recipe asset reports how many it removed and why."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np

from kolm_pipeline.corpus.build import EVAL_CANDIDATE_TAG, build_corpus, corpus_cid, read_corpus
from kolm_pipeline.corpus.decontaminate import EMBEDDING_COSINE, NGRAM, Decontaminator, word_tokens
from kolm_pipeline.corpus.embeddings import embed
from kolm_pipeline.corpus.recipe import synthesize_recipe
from kolm_pipeline.corpus.text import normalise
from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.demo.tickets import SYSTEM_PROMPT, generate_tickets
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import CaptureStore, KeptPair, NewCapture
from kolm_pipeline.train.distill import read_chat_jsonl
from kolm_pipeline_tests.conftest import capture_tickets

LONG_CANDIDATE = ("Our nightly export of the billing ledger to the finance warehouse has failed three nights in a row "
                  "with a timeout error.")
NGRAM_PLANT = ("URGENT from the Berlin office: our nightly export of the billing ledger to the finance warehouse has "
               "failed three nights in a row")  # another start, 17 tokens in common: cosine 0.77, a 13-gram catch
EXACT_CANDIDATE = "Please close my account and delete all of my personal data today."
EXACT_PLANT = "please close my  account and DELETE all of my personal data today."
HELD = "The office coffee machine has been leaking water onto the floor since Monday."
EMBEDDING_PLANT = "Since Monday the office coffee machine has been leaking water onto the floor."  # cosine 0.987
BADGE = "The badge reader at the north entrance rejects every visitor card since the update."


def _pair(capture_id: int, text: str, output: str, tags: list[str] | None = None) -> KeptPair:
    return KeptPair(id=capture_id, messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                             {"role": "user", "content": text}],
                    output=output, model="m", latency_us=1000, prompt_tokens=5, completion_tokens=1,
                    created_at=datetime.now(UTC), tags=tags or [])


def _user_text(row: dict) -> str:
    return row["messages"][-2]["content"]


def test_each_test_says_why_and_short_common_phrases_do_not_count():
    protected = ["Where is my  Order?",
                 "one two three four five six seven eight nine ten eleven twelve thirteen fourteen",
                 "my order a 1043 has not arrived after 3 days",  # 10 tokens: a short text, matched whole
                 "where is my parcel"]  # under 8 tokens: only an exact match counts
    rows = ["where is my order?",  # exact after normalisation
            "zero, one two three four five six seven eight nine ten eleven twelve thirteen",  # 13-gram
            "one two three four five six seven eight nine ten eleven twelve, and more words after it",  # 12 only
            "Hi! My order A-1043 has not arrived after 3 days. Thanks.",  # the short protected text inside
            "three four five six seven eight nine ten eleven",  # a short row inside a protected text
            "hello, where is my parcel please"]  # a sub-8-token phrase inside: not contamination
    texts = protected + rows
    vectors = np.eye(len(texts), dtype=np.float32)  # orthogonal: isolates the token tests
    decontaminator = Decontaminator(texts, vectors, embed)
    sources = {0: "eval", 1: "holdout", 2: "eval_candidate", 3: "eval"}
    kept = decontaminator.clean(list(range(4, 10)), sources)
    assert kept == [6, 9]
    assert [(r.row, r.reason, r.protected, r.source) for r in decontaminator.removals] == [
        (4, "exact", 0, "eval"), (5, "ngram13", 1, "holdout"), (7, "ngram13", 2, "eval_candidate"),
        (8, "ngram13", 1, "holdout")]
    assert decontaminator.counts() == {"decontaminated_exact": 1, "decontaminated_ngram13": 3,
                                       "decontaminated_embedding": 0, "decontaminated": 4}
    assert decontaminator.by_source() == {"holdout": 2, "eval": 1, "eval_candidate": 1}
    assert word_tokens("Hi! My order A-1043") == ("hi", "my", "order", "a", "1043")


def test_embedding_near_duplicates_are_removed_and_look_alikes_are_not():
    texts = [HELD, EMBEDDING_PLANT, "The office printer has been jamming on every page since Monday.",
             "My order A-1043 has not arrived after 3 days.", "My order B-2291 has not arrived after 7 days."]
    decontaminator = Decontaminator(texts, embed(texts), embed)
    assert decontaminator.clean([1, 2, 4], {0: "holdout", 3: "eval"}) == [2, 4]  # other facts: kept
    assert [(r.row, r.reason) for r in decontaminator.removals] == [(1, "embedding")]


def test_an_instruction_inside_the_user_message_is_template_not_overlap():
    """Apps often put their instruction in the user message; every request then shares its 13-grams and,
    to MiniLM, looks alike. Left out as template, the same requests are removed as without it."""
    instruction = ("You are the routing assistant of Acme support. Read the customer ticket below and answer with "
                   "exactly one queue name from fin-ops, iam, l2-platform, logistics, rma or growth. Ticket: ")
    bare = list(dict.fromkeys(t.text for t in generate_tickets(60, seed=2)))

    def removed(texts: list[str]) -> set[tuple[int, str]]:
        decontaminator = Decontaminator(texts, embed(texts), embed)
        decontaminator.clean(list(range(15, len(texts))), dict.fromkeys(range(15), "eval"))
        return {(removal.row, removal.reason) for removal in decontaminator.removals}

    plain = removed(bare)
    assert 1 <= len(plain) <= 10
    assert removed([instruction + text for text in bare]) == plain


def _freeze_holdout(path: Path) -> list[dict]:
    """A namespace's frozen hold-out, written as the first recipe would have: HELD and one other request."""
    held = [{"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                          {"role": "assistant", "content": label}]}
            for text, label in ((HELD, "rma"), ("Our VPN drops every ten minutes on the guest network.",
                                                "l2-platform"))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in held))
    return held


def _shares_ngram(a: str, b: str) -> bool:
    """Independent of the index: some run of min(13, len a, len b) >= 8 tokens occurs in both."""
    left, right = word_tokens(a), word_tokens(b)
    size = min(NGRAM, len(left), len(right))
    if size < 8:
        return False
    grams = {left[i : i + size] for i in range(len(left) - size + 1)}
    return any(right[i : i + size] in grams for i in range(len(right) - size + 1))


def _assert_uncontaminated(train: list[dict], protected: list[dict]) -> None:
    train_texts, protected_texts = [_user_text(r) for r in train], [_user_text(r) for r in protected]
    keys = {normalise(text) for text in protected_texts}
    for text in train_texts:
        assert normalise(text) not in keys, text
        assert not any(_shares_ngram(text, other) for other in protected_texts), text
    similarity = embed(train_texts) @ embed(protected_texts).T
    assert similarity.max() < EMBEDDING_COSINE


def test_planted_duplicates_never_reach_the_trainer(tmp_path: Path):
    tickets = generate_tickets(90, seed=3)
    pairs = [_pair(i, t.text, t.queue) for i, t in enumerate(tickets, start=1)]
    pairs += [_pair(91, LONG_CANDIDATE, "fin-ops", [EVAL_CANDIDATE_TAG]),
              _pair(92, EXACT_CANDIDATE, "iam", [EVAL_CANDIDATE_TAG]),
              _pair(93, NGRAM_PLANT, "fin-ops"), _pair(94, EXACT_PLANT, "iam"), _pair(95, EMBEDDING_PLANT, "rma")]
    data, stats = build_corpus(pairs)
    assert stats.eval_candidates == 2
    rows = read_corpus(data)
    assert {93, 94, 95} <= {row["meta"]["capture_id"] for row in rows}  # the corpus keeps them; training won't
    frozen = tmp_path / "holdout.frozen.jsonl"
    held = _freeze_holdout(frozen)

    recipe = synthesize_recipe(rows, tmp_path / "recipe", task="t.n", tenant="t", namespace="n",
                               corpus_cid=corpus_cid(data), frozen_holdout=frozen, eval_rotation_share=0.0)

    trained = read_chat_jsonl(recipe.path / "train.jsonl")  # exactly what the adapter's trainer reads
    assert trained == recipe.train and len(trained) >= 10
    assert not {91, 92, 93, 94, 95} & {row["meta"]["capture_id"] for row in trained}
    raw = (recipe.path / "train.jsonl").read_text().lower()
    assert "billing ledger" not in raw and "personal data" not in raw and "coffee machine" not in raw
    removed = {r["capture_id"]: (r["reason"], r["source"], r["overlaps_capture_id"])
               for r in recipe.diagnostics["decontamination"]["removed"]}
    assert removed[93] == ("ngram13", "eval_candidate", 91)
    assert removed[94] == ("exact", "eval_candidate", 92)
    assert removed[95][:2] == ("embedding", "holdout")
    report = recipe.diagnostics["decontamination"]
    assert report["decontaminated"] == sum(report[f"decontaminated_{r}"] for r in ("exact", "ngram13", "embedding"))
    assert report["decontaminated"] == sum(report["by_source"].values()) == recipe.diagnostics["dropped"][
        "decontaminated"]
    # Templated tickets repeat themselves with other greetings: some overlap the eval split drawn here too.
    assert report["by_source"]["eval"] >= 1
    assert sum(recipe.spec["counts"].values()) - len(held) + report["decontaminated"] + stats.eval_candidates \
        == len(rows)
    candidates = [row for row in rows if row["meta"].get("eval_candidate")]
    _assert_uncontaminated(trained, recipe.eval + recipe.holdout + candidates)


def _capture(store: CaptureStore, text: str, output: str, tags: list[str]) -> None:
    store.insert_captures([NewCapture(
        request_id=uuid.uuid4().hex, tenant="acme", namespace="support", provider="openai", model="gpt-4o-mini",
        messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
        output_text=output, latency_us=400_000, status="ok", http_status=200, prompt_tokens=40,
        completion_tokens=3, tags=tags)])


def test_recipe_asset_reports_what_it_removed(kolm_settings):
    store = CaptureStore(kolm_settings.store_url)
    capture_tickets(store, "acme", "support", generate_tickets(80, seed=11))
    for text, output in ((LONG_CANDIDATE, "fin-ops"), (EXACT_CANDIDATE, "iam"), (BADGE, "iam")):
        _capture(store, text, output, ["test", EVAL_CANDIDATE_TAG])
    for text, output in ((NGRAM_PLANT, "fin-ops"), (EXACT_PLANT, "iam"), (EMBEDDING_PLANT, "rma")):
        _capture(store, text, output, ["test"])
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    workdir = NamespaceWorkdir(kolm_settings, "acme.support")
    _freeze_holdout(workdir.frozen_holdout)  # a known hold-out, so no plant is drawn into it
    instance = ensure_instance(kolm_settings)
    run_config = {"ops": {"corpus": {"config": {"min_pairs": 50}}, "recipe": {"config": {"eval_rotation_share": 0.5}}}}
    result, outcomes = materialize_namespace(instance, "acme.support", run_config,
                                             stages=["triaged_captures", "corpus", "recipe"])
    assert result.success, [o for o in outcomes if o.status != "success"]

    def metadata(asset: str) -> dict:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        return {key: value.value for key, value in event.asset_materialization.metadata.items()}

    corpus, recipe = metadata("corpus"), metadata("recipe")
    assert corpus["eval_candidates"] == 3
    assert recipe["eval_candidates"] == 3 and recipe["eval_rotated_in"] == 2
    assert recipe["eval_rotated_capture_ids"] == [82, 83]  # the newest two candidates
    assert recipe["decontaminated_exact"] >= 1 and recipe["decontaminated_ngram13"] >= 1
    assert recipe["decontaminated_embedding"] >= 1
    assert recipe["decontaminated"] == sum(recipe[f"decontaminated_{r}"] for r in ("exact", "ngram13", "embedding"))
    assert recipe["holdout_pairs"] == 2  # the frozen one, unchanged
    assert recipe["train_pairs"] + recipe["eval_pairs"] + recipe["decontaminated"] + recipe["eval_candidates"] \
        - recipe["eval_rotated_in"] == corpus["written"]
    trained = read_chat_jsonl(workdir.recipe / "train.jsonl")
    assert len(trained) == recipe["train_pairs"]
    assert not {81, 82, 83, 84, 85, 86} & {row["meta"]["capture_id"] for row in trained}
    diagnostics = json.loads((workdir.recipe / "diagnostics.json").read_text())
    assert {r["capture_id"] for r in diagnostics["decontamination"]["removed"]} >= {84, 85, 86}
