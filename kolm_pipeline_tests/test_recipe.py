"""Recipe synthesis: output kinds, schema inference, clusters, K-floor, the frozen hold-out, bad input."""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from kolm_pipeline.corpus import recipe as recipe_module
from kolm_pipeline.corpus.build import SERVED_TAG, build_corpus, corpus_cid, read_corpus
from kolm_pipeline.corpus.kfloor import FLOOR_MAX, FLOOR_MIN, k_floor
from kolm_pipeline.corpus.recipe import (
    RecipeError,
    detect_output_kind,
    dry_run,
    dry_run_report,
    infer_json_schema,
    load_recipe,
    synthesize_recipe,
)
from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.evaluate.verifiers import VERIFIERS
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.store import KeptPair
from kolm_pipeline_tests.fixtures.observations import FIXTURES, unique_rows

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "recipes" / "support-tickets"
CID = corpus_cid(b"test corpus")


def _pair(index: int, text: str, output: str, tags: list[str] | None = None) -> KeptPair:
    return KeptPair(id=index, messages=[{"role": "user", "content": text}], output=output, model="m",
                    latency_us=1000, prompt_tokens=5, completion_tokens=1, created_at=datetime.now(UTC),
                    tags=tags or [])


def _rows(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def _synth(rows: list[dict], where: Path, name: str = "r", frozen: Path | None = None, **kwargs):
    return synthesize_recipe(rows, where / name, task="t.n", tenant="t", namespace="n", corpus_cid=CID,
                             frozen_holdout=frozen or where / "holdout.frozen.jsonl", **kwargs)


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
    categorical = _rows([(t.text, t.queue) for t in generate_tickets(60)])
    assert detect_output_kind(categorical).kind == "categorical"
    json_rows = _rows([(f"q{i}", json.dumps({"id": i, "kind": ["a", "b"][i % 2]})) for i in range(30)])
    decision = detect_output_kind(json_rows)
    assert decision.kind == "json" and decision.json_schema["required"] == ["id", "kind"]
    assert decision.json_schema["properties"]["kind"]["enum"] == ["a", "b"]
    extractive = _rows([(f"my order number is X{i}{i}{i} please check", f"X{i}{i}{i}") for i in range(30)])
    assert detect_output_kind(extractive).kind == "extractive"
    free = _rows([(f"q{i}", f"a long and varied answer number {i} with words") for i in range(30)])
    assert detect_output_kind(free).kind == "free_text"
    # A large closed set (CLINC150's 150 intents, 4 answers each) is still categorical, not free text.
    intents = _rows([(f"message {i}", f"intent_{i % 150}") for i in range(600)])
    many = detect_output_kind(intents)
    assert many.kind == "categorical" and len(many.labels) == 150
    # Few distinct short answers copied out of inputs that name no other answer: names, not a closed set.
    names = _rows([(f"Ticket {i} from {n}: printer broken", n) for i, n in enumerate(["Ann", "Bo", "Cy"] * 10)])
    assert detect_output_kind(names).kind == "extractive"
    # ...but when the input lists the options, picking one is a classification.
    options = _rows([(f"Case {i}: is it billing or shipping?", ["billing", "shipping"][i % 2]) for i in range(30)])
    assert detect_output_kind(options).kind == "categorical"


def test_json_schema_inference():
    values = [
        {"carrier": "DHL", "items": [{"sku": "KB-1", "qty": 2}], "weight": 1, "note": None, "tag": f"t{i}"}
        for i in range(6)
    ] + [{"carrier": "UPS", "items": [{"sku": "MS-2", "qty": 1, "gift": True}], "weight": 2.5, "tag": "x"}] * 3
    schema = infer_json_schema(values)
    jsonschema.Draft202012Validator.check_schema(schema)
    for value in values:
        jsonschema.validate(value, schema)
    props = schema["properties"]
    assert schema["required"] == ["carrier", "items", "tag", "weight"]  # "note" is missing from some
    assert props["carrier"]["enum"] == ["DHL", "UPS"]
    assert props["weight"]["type"] == "number"  # integer and float seen: widened
    assert props["note"]["type"] == "null"
    assert props["items"]["items"]["required"] == ["qty", "sku"]
    assert props["items"]["items"]["properties"]["gift"]["type"] == "boolean"
    assert "enum" not in props["tag"]  # values seen once each: an open set, no enum
    # Free strings and lists are bounded (twice the longest seen) so a constrained decoder cannot run on.
    assert props["tag"]["maxLength"] == 32 and props["items"]["maxItems"] == 4
    long = infer_json_schema([{"q": "x" * 40, "l": list(range(5))}] * 2)["properties"]
    assert long["q"]["maxLength"] == 80 and long["l"]["maxItems"] == 10


@pytest.fixture(scope="module")
def fixture_recipes(tmp_path_factory) -> dict[str, tuple[list[dict], object]]:
    """One synthesized recipe per observation fixture (60 pairs each), shared by the tests below."""
    where = tmp_path_factory.mktemp("fixture-recipes")
    built = {}
    for name, (generate, _) in FIXTURES.items():
        rows = unique_rows(generate(60, 2))
        built[name] = rows, _synth(rows, where / name)
    return built


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_becomes_the_right_recipe(name, fixture_recipes):
    expected = FIXTURES[name][1]
    rows, recipe = fixture_recipes[name]
    spec = recipe.spec
    assert spec["output_kind"] == expected
    assert spec["verifier"] == {"categorical": "closed_vocab", "json": "json_schema", "extractive": "byte_grounded",
                                "free_text": "text_match"}[expected]
    assert FLOOR_MIN <= spec["k_floor"] <= FLOOR_MAX
    assert dry_run_report(recipe.path).problems == []
    dropped = recipe.diagnostics["dropped"]
    assert sum(spec["counts"].values()) + dropped["decontaminated"] == len(rows)
    assert not dropped["answers_not_fitting_the_kind"]
    # Every reference answer passes its own verifier: the teacher would score A = V = 1.
    verify = VERIFIERS[spec["verifier"]]
    for row in recipe.eval + recipe.holdout:
        source = "\n".join(m["content"] for m in row["messages"][:-1])
        reference = row["messages"][-1]["content"]
        assert verify(reference, reference, labels=spec.get("labels") or [], schema=spec.get("json_schema", {}),
                      source=source) == (1.0, True)
    diagnostics = json.loads((recipe.path / "diagnostics.json").read_text())
    assert diagnostics["k_floor"]["value"] == spec["k_floor"] and diagnostics["k_floor"]["reasoning"]
    assert diagnostics["clusters"]["k"] >= 2 and diagnostics["clusters"]["per_cluster"]
    if expected == "categorical":
        assert set(spec["labels"]) == {row["messages"][-1]["content"] for row in rows}
    if name == "order_intake":
        props = spec["json_schema"]["properties"]
        assert spec["json_schema"]["required"] == ["intent", "order_id", "urgent"]
        assert props["intent"]["enum"] == ["cancel", "refund", "track"]
        assert props["urgent"]["type"] == "boolean" and "enum" not in props["order_id"]
        # The order id is always copied out of the message: decoding writes it as text of the request.
        assert props["order_id"]["x-kolm-grounded"] is True and "x-kolm-grounded" not in props["intent"]
    if name == "shipment":
        assert spec["json_schema"]["properties"]["items"]["items"]["required"] == ["qty", "sku"]


def test_split_is_stratified_by_label_or_cluster(fixture_recipes):
    tickets = fixture_recipes["tickets"][1]
    for split in (tickets.eval, tickets.holdout):
        assert {row["messages"][-1]["content"] for row in split} == set(tickets.labels)
    assert tickets.diagnostics["split"]["strategy"] == "stratified by label"
    replies = fixture_recipes["refund_reply"][1]
    strata = replies.diagnostics["split"]["strata"]
    assert replies.diagnostics["split"]["strategy"] == "stratified by intent cluster"
    assert all(counts.get("eval", 0) >= 1 for counts in strata.values() if sum(counts.values()) >= 5)


def test_splits_do_not_depend_on_arrival_order(tmp_path):
    rows = unique_rows(FIXTURES["tickets"][0](90, 0))
    arrived = rows[:]
    random.Random(3).shuffle(arrived)  # the same pairs, captured by concurrent clients in another order
    first, second = _synth(rows, tmp_path, "first"), _synth(arrived, tmp_path, "second",
                                                           frozen=tmp_path / "second.frozen.jsonl")
    for split in ("train", "eval", "holdout"):
        assert [r["messages"] for r in getattr(first, split)] == [r["messages"] for r in getattr(second, split)]


def test_eval_and_holdout_stop_growing_at_what_the_gate_needs(tmp_path, monkeypatch):
    """Each split takes its share of a small corpus, but no more than SPLIT_MAX_CASES (scaled down here), so a
    large corpus trains on the rest; diagnostics say what K margin the eval split resolves."""
    rows = unique_rows(FIXTURES["tickets"][0](240, 0))
    shared = _synth(rows, tmp_path, "shared")
    monkeypatch.setattr(recipe_module, "SPLIT_MAX_CASES", 24)
    capped = _synth(rows, tmp_path, "capped", frozen=tmp_path / "capped.frozen.jsonl")
    assert len(shared.eval) > 30 and len(shared.holdout) > 30
    assert 20 <= len(capped.eval) <= 28 and 20 <= len(capped.holdout) <= 28
    # The cases the cap frees go to train, less the few that repeat a held-out request (decontamination).
    freed = len(shared.eval) + len(shared.holdout) - len(capped.eval) - len(capped.holdout)
    assert freed > 20 and len(capped.train) >= len(shared.train) + freed * 3 // 4
    resolution = capped.diagnostics["split"]["gate_resolution"]
    assert resolution["k_margin"] == recipe_module.gate_resolution(len(capped.eval)) > \
        shared.diagnostics["split"]["gate_resolution"]["k_margin"]
    assert f"{len(capped.eval)} eval cases" in resolution["why"]


def test_purity_separates_consistent_from_noisy_answers(tmp_path):
    rows = unique_rows(FIXTURES["tickets"][0](90, 0))
    consistent = _synth(rows, tmp_path, "consistent")
    answers = [row["messages"][-1]["content"] for row in rows]
    random.Random(0).shuffle(answers)  # the same requests with answers that no longer follow from them
    noisy_rows = [{**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": a}]}
                  for row, a in zip(rows, answers, strict=True)]
    noisy = _synth(noisy_rows, tmp_path, "noisy", frozen=tmp_path / "noisy.frozen.jsonl")
    assert consistent.diagnostics["clusters"]["purity"] > 0.9
    assert noisy.diagnostics["clusters"]["purity"] < 0.4
    assert noisy.spec["k_floor"] == FLOOR_MIN <= consistent.spec["k_floor"]
    terms = consistent.diagnostics["k_floor"]["terms"]
    assert terms["n_train"] == consistent.spec["counts"]["train"] and terms["n_eval"] == len(consistent.eval)


def test_k_floor_formula():
    def floor(**kwargs):
        base = {"kind": "categorical", "purity": 0.95, "train_pairs": 680, "eval_cases": 170,
                "teacher_latency_measured": True, "teacher_usage_measured": True}
        return k_floor(**{**base, **kwargs})

    assert FLOOR_MIN < floor().value < FLOOR_MAX
    assert floor(purity=0.6).value < floor().value
    assert floor(train_pairs=100).value < floor().value  # less data, less expected of the student
    assert floor(teacher_latency_measured=False, teacher_usage_measured=False).value < floor().value
    assert floor(eval_cases=20).value < floor().value  # a small eval split is noisier
    assert floor(purity=0.0).value == FLOOR_MIN
    # A student that reaches the expected accuracy with the expected other parts clears its floor.
    result = floor()
    k = 0.4 * result.expected_accuracy + 0.15 * (result.size + result.latency + result.cost + result.coverage)
    assert k >= result.value
    assert "clamp" in result.as_dict()["formula"] and len(result.reasoning) >= 5


def test_holdout_is_frozen_across_recipes(tmp_path):
    rows = _rows([(t.text, t.queue) for t in generate_tickets(60)])
    frozen = tmp_path / "holdout.frozen.jsonl"
    first = _synth(rows, tmp_path, "r1", frozen)
    assert first.diagnostics["holdout"]["made_now"]
    held_text = first.holdout[0]["messages"][0]["content"]
    more = rows + _rows([(t.text + " (again)", t.queue) for t in generate_tickets(20, seed=99)])
    more.append(_rows([(held_text + " thx", first.holdout[0]["messages"][-1]["content"])])[0])  # near-duplicate
    before = frozen.read_bytes()
    second = _synth(more, tmp_path, "r2", frozen)
    assert frozen.read_bytes() == before and not second.diagnostics["holdout"]["made_now"]
    assert first.holdout == second.holdout and first.spec["holdout_cid"] == second.spec["holdout_cid"]
    trained = {json.dumps(r["messages"][:-1]) for r in second.train + second.eval}
    assert not {json.dumps(r["messages"][:-1]) for r in second.holdout} & trained
    assert not any(r["messages"][0]["content"] == held_text + " thx" for r in second.train + second.eval)
    assert second.diagnostics["decontamination"]["by_source"]["holdout"] >= 1
    assert set(first.spec["labels"]) == {t.queue for t in generate_tickets(60)}


def test_synthesis_is_deterministic(fixture_recipes, tmp_path):
    rows, first = fixture_recipes["order_intake"]
    again = _synth(rows, tmp_path)
    assert directory_cid(again.path) == directory_cid(first.path)


def test_refused_synthesis_leaves_the_previous_recipe_untouched(tmp_path):
    rows = unique_rows(FIXTURES["tickets"][0](40, 0))
    recipe = _synth(rows, tmp_path)
    cid = directory_cid(recipe.path)
    with pytest.raises(RecipeError, match=r"corpus has 4 pairs; a recipe needs at least 10"):
        _synth(rows[:4], tmp_path, frozen=tmp_path / "fresh.jsonl")
    with pytest.raises(RecipeError, match=r"leaves \d+ train and \d+ eval pairs"):
        _synth(rows[:12], tmp_path, frozen=tmp_path / "fresh.jsonl")
    assert directory_cid(recipe.path) == cid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holdout.frozen.jsonl", "r"]


def test_handwritten_recipe_is_valid():
    report = dry_run_report(EXAMPLE)
    assert report.ok and report.problems == [] and "categorical" in report.summary()
    assert dry_run(EXAMPLE) == []


def _copy_example(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe"
    shutil.copytree(EXAMPLE, recipe)
    return recipe


def _edit_spec(recipe: Path, **changes) -> None:
    spec = json.loads((recipe / "spec.json").read_text())
    spec.update(changes)
    (recipe / "spec.json").write_text(json.dumps({k: v for k, v in spec.items() if v is not None}))


def test_bad_spec_names_the_failing_field(tmp_path):
    recipe = _copy_example(tmp_path)
    _edit_spec(recipe, labels=None)
    with pytest.raises(RecipeError, match="labels"):
        load_recipe(recipe)
    recipe = _copy_example(tmp_path / "2")
    _edit_spec(recipe, lables=["a", "b"])
    assert "'lables' was unexpected" in dry_run(recipe)[0]
    _edit_spec(recipe, lables=None, k_floor=1.5)
    assert dry_run(recipe)[0].endswith("spec.json: k_floor: 1.5 is greater than the maximum of 1")
    _edit_spec(recipe, k_floor=0.5, output_kind="json", verifier="json_schema", json_schema={"type": "objekt"})
    assert "json_schema/type" in dry_run(recipe)[0]
    _edit_spec(recipe, output_kind="categorical", verifier="closed_vocab", json_schema=None,
               training={"epoch": 2})
    assert "training: unknown setting(s) ['epoch']" in dry_run(recipe)[0]
    _edit_spec(recipe, training={"epochs": "two", "attention": "flash", "rank": 0, "packing": 1, "max_length": 512})
    assert [problem.split("training: ")[1] for problem in dry_run(recipe)] == [
        "epochs: 'two' is not a number > 0",
        "attention: 'flash' is not null or one of ['eager', 'sdpa', 'flash_attention_2', 'flex_attention']",
        "rank: 0 is not a whole number >= 1",
        "packing: 1 is not true or false",
    ]


def test_bad_jsonl_lines_are_named_with_file_and_line(tmp_path):
    recipe = _copy_example(tmp_path)
    good = (recipe / "train.jsonl").read_text().splitlines()
    (recipe / "train.jsonl").write_text("\n".join([good[0], "{oops", good[1], '{"messages": []}', *good[2:]]) + "\n")
    (recipe / "eval.jsonl").write_text((recipe / "eval.jsonl").read_text() + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(RecipeError, match=r"train\.jsonl:2: not valid JSON .*\(and 1 more bad line\)$"):
        load_recipe(recipe)
    problems = dry_run(recipe)
    assert [p.split(": ")[0].rsplit("/", 1)[-1] for p in problems] == ["train.jsonl:2", "train.jsonl:4",
                                                                       "eval.jsonl:31"]


def test_too_few_pairs_and_inapplicable_verifier_are_refused(tmp_path):
    recipe = _copy_example(tmp_path)
    _edit_spec(recipe, min_train_pairs=500)
    assert any(p.endswith("train.jsonl: 100 pairs, need at least 500") for p in dry_run(recipe))
    _edit_spec(recipe, min_train_pairs=None, labels=["fin-ops", "growth", "iam", "l2-platform", "logistics"])
    problems = dry_run(recipe)
    assert any("is not one of the labels" in p and "train.jsonl:" in p for p in problems)
    recipe = _copy_example(tmp_path / "2")
    _edit_spec(recipe, output_kind="extractive", verifier="byte_grounded")
    assert any("byte_grounded does not fit" in p for p in dry_run(recipe))
    recipe = _copy_example(tmp_path / "3")
    holdout_line = (recipe / "holdout.jsonl").read_text().splitlines()[0]
    (recipe / "train.jsonl").write_text((recipe / "train.jsonl").read_text() + holdout_line + "\n")
    assert any("same input as holdout.jsonl:1" in note for note in dry_run_report(recipe).notes)


def test_frozen_holdout_that_no_longer_fits_the_task_is_refused_not_changed(tmp_path):
    frozen = tmp_path / "holdout.frozen.jsonl"
    _synth(unique_rows(FIXTURES["tickets"][0](40, 0)), tmp_path, "tickets", frozen)
    before = frozen.read_bytes()
    with pytest.raises(RecipeError, match=r"holdout\.frozen\.jsonl:1: .* its task changed"):
        _synth(unique_rows(FIXTURES["order_intake"][0](40, 0)), tmp_path, "json", frozen)
    assert frozen.read_bytes() == before and not (tmp_path / "json").exists()


def test_provenance_weights_reach_train_jsonl_and_bad_ones_are_named(tmp_path):
    rows = unique_rows(FIXTURES["tickets"][0](40, 0))
    for index, row in enumerate(rows):
        if index % 2:
            row["weight"] = 0.5
    recipe = _synth(rows, tmp_path)
    weight_of = {json.dumps(row["messages"], sort_keys=True): row.get("weight", 1.0) for row in rows}
    trained = [json.loads(line) for line in (recipe.path / "train.jsonl").read_text().splitlines()]
    assert [row.get("weight", 1.0) for row in trained] == [weight_of[json.dumps(row["messages"], sort_keys=True)]
                                                           for row in trained]
    assert {row.get("weight", 1.0) for row in trained} == {0.5, 1.0}

    handwritten = _copy_example(tmp_path)
    lines = (handwritten / "train.jsonl").read_text().splitlines()
    for number, weight in ((1, 2.5), (2, -1), (3, "heavy"), (4, True)):
        lines[number - 1] = json.dumps({**json.loads(lines[number - 1]), "weight": weight})
    (handwritten / "train.jsonl").write_text("\n".join(lines) + "\n")
    problems = [p.rsplit("/", 1)[-1] for p in dry_run(handwritten)]
    assert problems == ["train.jsonl:2: 'weight' must be a non-negative number, got -1",
                        "train.jsonl:3: 'weight' must be a non-negative number, got 'heavy'",
                        "train.jsonl:4: 'weight' must be a non-negative number, got True"]


def test_the_shipped_spec_schema_embeds_the_training_settings_as_declared():
    """`training` in recipe_spec.schema.json is TrainConfig's own JSON Schema: editors and `kolm compile` see
    the same settings, defaults and bounds (regenerate with `python -m kolm_pipeline.corpus.train_config`)."""
    from kolm_pipeline.corpus.recipe import SPEC_SCHEMA
    from kolm_pipeline.corpus.train_config import TrainConfig

    shipped = {k: v for k, v in SPEC_SCHEMA["properties"]["training"].items() if k != "$comment"}
    assert shipped == TrainConfig.model_json_schema()
    assert shipped["additionalProperties"] is False and shipped["properties"]["rank"]["minimum"] == 1


def test_training_job_carries_the_label_set_only_for_the_label_loss(fixture_recipes, kolm_settings):
    from kolm_pipeline.corpus.train_config import TrainConfig
    from kolm_pipeline.stages.adapter import training_job
    from kolm_pipeline.train.base_model import BaseModel

    recipe = fixture_recipes["tickets"][1]
    base = BaseModel(model_id="tiny", path=recipe.path, digest="0" * 64)

    def job(config: TrainConfig):
        return training_job(kolm_settings, base, task="t.n", train_path=recipe.path / "train.jsonl",
                            output_dir=recipe.path / "adapter", recipe_cid=CID, config=config, tags={})

    assert job(TrainConfig(label_loss=True)).labels == recipe.spec["labels"]
    assert job(TrainConfig()).labels is None
