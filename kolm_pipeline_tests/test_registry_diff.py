"""`kolm registry diff`: what changed between two versions of a task.

The first test runs the real stages on the tiny model: a trained candidate against the bare base, deployed;
a barely trained candidate on a larger corpus against that champion; then that candidate packaged and
force-swapped, so the registry holds two real versions whose evaluations carry per-case verdicts. The
others build signed artifacts with crafted evaluations to pin the matching rules exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kolm_pipeline.corpus.build import input_key
from kolm_pipeline.corpus.recipe import read_jsonl
from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.evaluate.evaluation import CASE_PASS_SCORE
from kolm_pipeline.evaluate.result import EvaluationResult
from kolm_pipeline.provenance.atomic import write_json_atomic
from kolm_pipeline.provenance.errors import DeployRefused, RegistryError
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.provenance.receipts import receipt_cid
from kolm_pipeline.registry import build_kolm, cid_for_bytes, ensure_tenant_keys, load_private_key, make_receipt
from kolm_pipeline.registry.artifact import adapter_file_cids
from kolm_pipeline.registry.manage import publish, swap_artifact
from kolm_pipeline.settings import load_settings
from kolm_pipeline.stages.adapter import record_adapter
from kolm_pipeline.stages.corpus import run_corpus_stage, run_recipe_stage
from kolm_pipeline.stages.deployment import build_manifest, current_champion, deploy
from kolm_pipeline.stages.diff import (
    DiffError,
    candidate_diff,
    diff_markdown,
    diff_text,
    registry_diff,
)
from kolm_pipeline.stages.evaluation import run_evaluation_stage
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.train.base_model import resolve_base_model
from kolm_pipeline.train.distill import TrainConfig, train_adapter
from kolm_pipeline_tests.conftest import capture_tickets
from kolm_pipeline_tests.test_registry_support import clean_env, fake_adapter, shared_mlflow_uri, signed_artifact

EMPTY_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
# A short acknowledgement keeps max_new_tokens, and so every generation of the evaluations, small.
REPLY = "Thanks, an agent will reply soon."
K_PARTS = ("accuracy", "size", "latency", "cost", "coverage", "k")


@pytest.fixture
def home(kolm_settings, monkeypatch, tmp_path_factory, tiny_base):
    clean_env(monkeypatch, KOLM_MLFLOW_URI=shared_mlflow_uri(tmp_path_factory), KOLM_BASE_MODEL=str(tiny_base))
    return load_settings(kolm_settings.home)


def _key(messages: list[dict]) -> str:
    """The case key derived here, independently of the evaluation: sha256 of the input key, 16 hex."""
    return hashlib.sha256(input_key(messages).encode()).hexdigest()[:16]


def _flipped(evaluation: dict, before: str, after: str, passes_after: bool) -> set[str]:
    return {case["key"] for case in evaluation["case_verdicts"]["cases"]
            if case[before]["pass"] != case[after]["pass"] and case[after]["pass"] is passes_after}


# --- real versions on the tiny model ----------------------------------------------------------------------


def _cycle(settings, store, base, task: str, epochs: float, champion) -> tuple[dict, int]:
    """Corpus, recipe, adapter and evaluation for ``task``, as the assets run them; (evaluation, corpus pairs)."""
    workdir = NamespaceWorkdir(settings, task)
    tenant, namespace = task.split(".")
    store.apply_rules(tenant, namespace)
    corpus = run_corpus_stage(workdir, store, min_pairs=30)
    run_recipe_stage(workdir)
    result = train_adapter(workdir.recipe / "train.jsonl", base, workdir.adapter,
                           TrainConfig(epochs=epochs, learning_rate=0.02), show_progress=False)
    record_adapter(workdir, base, directory_cid(workdir.recipe), result.metrics())
    return (run_evaluation_stage(workdir, settings, base, champion=champion, store=store).document(),
            corpus.stats.written)


def test_diff_of_real_versions_candidate_and_registry(home, tiny_base):
    task = "diffco.support"
    store = CaptureStore(home.store_url)
    capture_tickets(store, "diffco", "support", generate_tickets(40, seed=21), reply=REPLY)
    store.add_rule("diffco", "support", "keep", {"status": "ok"}, actor="test")
    base = resolve_base_model(str(tiny_base), home.models_dir)
    workdir = NamespaceWorkdir(home, task)

    # Cycle 1: a trained candidate against the bare base, same run.
    first, first_pairs = _cycle(home, store, base, task, epochs=3, champion=None)
    eval_rows = read_jsonl(workdir.recipe / "eval.jsonl")
    cases = first["case_verdicts"]["cases"]
    assert [case["key"] for case in cases] == [_key(row["messages"][:-1]) for row in eval_rows]
    assert first["case_verdicts"]["pass_score"] == CASE_PASS_SCORE
    for side in ("candidate", "current"):
        mean = sum(case[side]["score"] for case in cases) / len(cases)
        assert mean == pytest.approx(first[side]["accuracy"], abs=1e-3)
        assert all(case[side]["pass"] == (case[side]["score"] >= 0.5 and case[side]["in_format"]) for case in cases)
    assert first["corpus"] == {"cid": first["recipe_spec"]["corpus_cid"], "pairs": first_pairs}

    against_base = candidate_diff(home, first)
    assert against_base.before.is_base and "same run" in against_base.basis
    improved = {flip.key for flip in against_base.improved}
    assert improved == _flipped(first, "current", "candidate", passes_after=True)
    assert len(improved) >= len(cases) // 2  # the trained adapter answers what the random base cannot
    assert against_base.compared == len(cases) and against_base.only_before == against_base.only_after == 0
    assert {p.label: (p.before, p.after) for p in against_base.kscore} == {
        part: (first["current"][part], first["candidate"][part]) for part in K_PARTS}
    assert "Improved (fail → pass)" in diff_markdown(against_base)

    with pytest.raises(DiffError, match="nothing is deployed"):
        registry_diff(home, store, task)
    first_cid = deploy(workdir, home, store, actor="test").artifact_cid
    only = registry_diff(home, store, task)  # `previous` of the first deployment is the bare base
    assert only.before.is_base and only.after.cid == first_cid and "same run" in only.basis
    # Read old → new whichever way it is asked: `diff base` is the bare base → the current version.
    assert (registry_diff(home, store, task, ["base"]).before.is_base,
            registry_diff(home, store, task, ["base"]).after.cid) == (True, first_cid)
    with pytest.raises(DiffError, match=r"nothing to diff: artifact \S+ \(current\) and the last evaluated "
                                        r"candidate \(not packaged\) hold the same adapter .*deployed already"):
        registry_diff(home, store, task, ["candidate"])

    # Cycle 2: more data, a barely trained candidate against the champion: it regresses case by case.
    capture_tickets(store, "diffco", "support", generate_tickets(10, seed=22), reply=REPLY)
    second, second_pairs = _cycle(home, store, base, task, epochs=0.05, champion=current_champion(home, task))
    assert second["current_cid"] == first_cid and not second["decision"]["swap"]
    assert second_pairs > first_pairs

    candidate = registry_diff(home, store, task, ["candidate"])
    assert (candidate.before.cid, candidate.after.cid) == (first_cid, None)
    assert (candidate.before.corpus_pairs, candidate.after.corpus_pairs) == (first_pairs, second_pairs)
    assert candidate.before.corpus_cid == first["recipe_spec"]["corpus_cid"]
    assert candidate.after.corpus_cid == second["recipe_spec"]["corpus_cid"] != candidate.before.corpus_cid
    assert (candidate.before.recipe_cid, candidate.after.recipe_cid) == (first["recipe_cid"], second["recipe_cid"])
    assert "same run" in candidate.basis
    regressed = {flip.key for flip in candidate.regressed}
    assert regressed == _flipped(second, "current", "candidate", passes_after=False) and regressed
    assert {p.label: (p.before, p.after) for p in candidate.kscore} == {
        part: (second["current"][part], second["candidate"][part]) for part in K_PARTS}
    counts = next(change for change in candidate.recipe_changes if change.name == "counts")
    assert counts.before == first["recipe_spec"]["counts"] and counts.after == second["recipe_spec"]["counts"]
    asset_view = candidate_diff(home, second)
    assert asset_view.before.corpus_pairs == first_pairs
    assert {flip.key for flip in asset_view.regressed} == regressed

    # Package the refused candidate and force it in: the registry now holds two versions.
    packaged = workdir.root / "forced.kolm"
    manifest = build_manifest(workdir, EvaluationResult.model_validate(second), {}, first_cid)
    build_kolm(packaged, manifest=manifest, adapter_dir=workdir.adapter, evals=second, receipts=workdir.chain(),
               signer=workdir.signer())
    second_cid = swap_artifact(home, store, packaged, strategy="force", actor="test").to_cid

    latest = registry_diff(home, store, task)
    assert (latest.before.cid, latest.after.cid) == (first_cid, second_cid)
    assert {flip.key for flip in latest.regressed} == regressed
    assert (latest.before.corpus_pairs, latest.after.corpus_pairs) == (first_pairs, second_pairs)
    text = diff_text(latest)
    assert f"{task}: {first_cid} → {second_cid}" in text
    assert f"{len(regressed)} regressed (pass → fail)" in text
    row = next(line for line in text.splitlines() if line.startswith("corpus pairs"))
    assert row.split() == ["corpus", "pairs", str(first_pairs), str(second_pairs), f"+{second_pairs - first_pairs}"]

    # One version given: it and the current one, old → new (the first deployment came first), by CID prefix.
    older = registry_diff(home, store, task, [first_cid[:10]])
    assert (older.before.cid, older.after.cid) == (first_cid, second_cid)
    assert (older.before.name, older.after.name) == (first_cid[:10], "current")
    assert registry_diff(home, store, task, ["previous"]).before.cid == first_cid
    back = registry_diff(home, store, task, ["current", first_cid.removeprefix("bafkrei")[:8]])  # as given
    assert (back.before.cid, back.after.cid) == (second_cid, first_cid)
    assert {flip.key for flip in back.improved} == regressed and not back.regressed
    assert json.loads(json.dumps(back.as_dict()))["cases"]["improved_count"] == len(regressed)

    with pytest.raises(DeployRefused, match="never published"):
        registry_diff(home, store, task, [EMPTY_CID])
    with pytest.raises(DeployRefused, match="malformed CID"):
        registry_diff(home, store, task, ["not-a-cid", second_cid])


# --- crafted versions -------------------------------------------------------------------------------------


def _case(key: str, passed: bool, score: float | None = None, text: str = "") -> dict:
    score = (1.0 if passed else 0.0) if score is None else score
    return {"key": key, "input": text or f"ticket {key}", "expected": "fin-ops",
            "candidate": {"output": "fin-ops" if passed else "iam", "score": score, "in_format": True,
                          "pass": passed},
            "current": {"output": "", "score": 0.0, "in_format": False, "pass": False}}


def _evaluation(task: str, cases: list[dict], spec: dict, k: float) -> dict:
    side = {"name": "candidate", "k": k, "accuracy": k, "size": 1.0, "latency": 0.5, "cost": 0.9,
            "coverage": 1.0}
    return {"task": task, "current_name": "base", "current_cid": None, "candidate": side,
            "current": {**side, "name": "base", "k": 0.2, "accuracy": 0.0},
            "decision": {"swap": True, "reason": "swap", "k_floor": spec["k_floor"]},
            "recipe_cid": cid_for_bytes(json.dumps(spec).encode()), "adapter_cid": cid_for_bytes(str(k).encode()),
            "case_verdicts": {"pass_score": 0.5, "cases": cases}, "recipe_spec": spec,
            "corpus": {"cid": spec["corpus_cid"], "pairs": spec["counts"]["train"] + 20}}


def _artifact(path: Path, keys_dir: Path, evaluation: dict) -> Path:
    """A signed .kolm carrying ``evaluation`` as its evals, with the chain the deployment stage ships."""
    task = evaluation["task"]
    keyid = ensure_tenant_keys(keys_dir, "acme")
    key = load_private_key(keys_dir, "acme")
    adapter_dir = fake_adapter(path.with_suffix(".adapter"))
    receipts: list[bytes] = []
    for stage in ("corpus", "recipe", "adapter", "evaluation"):
        files = {"files": adapter_file_cids(adapter_dir)} if stage == "adapter" else {}
        receipts.append(make_receipt(stage=stage, subject_name=stage, subject_cid=cid_for_bytes(path.name.encode()),
                                     predicate={"task": task, **files}, previous_cid=receipt_cid(receipts[-1])
                                     if receipts else None, private_key=key, keyid=keyid))
    spec = evaluation["recipe_spec"]
    manifest = {"task": task, "tenant": "acme", "corpus_cid": spec["corpus_cid"],
                "recipe_cid": evaluation["recipe_cid"], "adapter_cid": evaluation["adapter_cid"],
                "evals": {side: evaluation[side] for side in ("candidate", "current", "decision")}}
    build_kolm(path, manifest=manifest, adapter_dir=adapter_dir, evals=evaluation, receipts=receipts,
               signer=(key, keyid))
    return path


SPEC = {"output_kind": "categorical", "verifier": "closed_vocab", "labels": ["fin-ops", "logistics"],
        "k_floor": 0.5, "counts": {"train": 50, "eval": 7, "holdout": 9}, "corpus_cid": cid_for_bytes(b"corpus a"),
        "holdout_cid": cid_for_bytes(b"holdout")}


@pytest.fixture
def crafted(kolm_settings, tmp_path) -> tuple[Path, Path]:
    """Two versions evaluated in different runs, on eval splits that share six cases."""
    task = "acme.crafted"
    before = [_case("c1", True), _case("c2", True), _case("c3", False), _case("c4", False), _case("c5", True),
              _case("c6", False), _case("a1", True)]
    after = [_case("c1", True), _case("c2", False), _case("c3", True, text="refund | invoice"), _case("c4", False),
             _case("c5", False, score=0.4), _case("c6", True, score=0.7), _case("b1", True), _case("b2", False)]
    spec_after = {**SPEC, "labels": ["fin-ops", "iam"], "k_floor": 0.55, "counts": {"train": 60, "eval": 8,
                  "holdout": 9}, "corpus_cid": cid_for_bytes(b"corpus b"), "max_new_tokens": 16}
    return (_artifact(tmp_path / "a.kolm", kolm_settings.keys_dir, _evaluation(task, before, SPEC, 0.7)),
            _artifact(tmp_path / "b.kolm", kolm_settings.keys_dir, _evaluation(task, after, spec_after, 0.65)))


def test_diff_across_runs_matches_shared_cases_only(kolm_settings, crafted):
    store = CaptureStore(kolm_settings.store_url)
    first, second = crafted
    publish(kolm_settings, "acme.crafted", first)
    diff = registry_diff(kolm_settings, store, "acme.crafted", [str(first), str(second)])
    assert "own evaluation" in diff.basis
    assert (diff.compared, diff.only_before, diff.only_after) == (6, 1, 2)
    assert [flip.key for flip in diff.improved] == ["c3", "c6"]  # the larger score change first
    assert [flip.key for flip in diff.regressed] == ["c2", "c5"]
    c5 = diff.regressed[1]
    assert (c5.before_score, c5.after_score, c5.before_output, c5.after_output) == (1.0, 0.4, "fin-ops", "iam")
    assert {p.label: (p.before, p.after) for p in diff.kscore}["k"] == (0.7, 0.65)
    assert next(p for p in diff.kscore if p.name == "K").delta == pytest.approx(-0.05)
    assert (diff.before.corpus_pairs, diff.after.corpus_pairs) == (70, 80)
    changes = {change.name: change.summary for change in diff.recipe_changes}
    assert changes == {"labels": "labels +iam, −logistics", "k_floor": "k_floor 0.5 → 0.55",
                       "counts": "counts train 50 → 60, eval 7 → 8"}
    assert diff.notes == ["recipe fields recorded by one version only: max_new_tokens"]

    text = diff_text(diff, limit=1)
    assert "6 compared, 3 not comparable (only before 1, only after 2); 2 improved" in text
    assert "regressed (pass → fail), 1 of 2:" in text and "c2  score 1.00 → 0.00" in text
    assert "c5  score" not in text
    markdown = diff_markdown(diff)
    assert "| corpus pairs | 70 | 80 | +10 |" in markdown
    # Dagster's event log is never swept: the Markdown names cases by key and score, never by their texts.
    assert "| `c2` | 1.00 → 0.00 |" in markdown and "refund" not in markdown and "ticket c2" not in markdown
    payload = diff.as_dict(limit=1)
    assert payload["cases"]["regressed_count"] == 2 and len(payload["cases"]["regressed"]) == 1

    # Swapped the other way round, improved and regressed trade places.
    reverse = registry_diff(kolm_settings, store, "acme.crafted", [str(second), str(first)])
    assert [f.key for f in reverse.improved] == ["c2", "c5"] and [f.key for f in reverse.regressed] == ["c3", "c6"]


def test_diff_with_a_version_evaluated_before_verdicts_were_kept(kolm_settings, crafted, tmp_path):
    store = CaptureStore(kolm_settings.store_url)
    _, second = crafted
    old = signed_artifact(tmp_path / "old.kolm", adapter_dir=fake_adapter(tmp_path / "old-adapter"),
                          keys_dir=kolm_settings.keys_dir, task="acme.crafted", k=0.6, labels=["fin-ops", "iam"])
    publish(kolm_settings, "acme.crafted", old)
    diff = registry_diff(kolm_settings, store, "acme.crafted", [str(old), str(second)])
    assert diff.compared is None and not diff.improved and not diff.regressed
    assert any("records no per-case verdicts" in note for note in diff.notes)
    assert diff.before.corpus_pairs == 160  # from the corpus receipt's stats
    # The recipe as the manifest and the recipe receipt record it: k_floor compares, the rest is unrecorded.
    assert {change.name: change.summary for change in diff.recipe_changes} == {"k_floor": "k_floor 0.3 → 0.55"}
    assert "recipe fields recorded by one version only: counts, max_new_tokens, holdout_cid" in diff.notes
    assert "no per-case verdicts to compare" in diff_text(diff)


def test_diff_refusals(kolm_settings, crafted, tmp_path):
    store = CaptureStore(kolm_settings.store_url)
    first, second = crafted
    with pytest.raises(DiffError, match="unknown task 'acme.nosuch'"):
        registry_diff(kolm_settings, store, "acme.nosuch")
    with pytest.raises(RegistryError, match="invalid task name"):
        registry_diff(kolm_settings, store, "../etc")
    publish(kolm_settings, "acme.crafted", first)
    with pytest.raises(DiffError, match="nothing is deployed"):
        registry_diff(kolm_settings, store, "acme.crafted", [str(second)])
    with pytest.raises(DiffError, match="at most two versions"):
        registry_diff(kolm_settings, store, "acme.crafted", ["a", "b", "c"])
    with pytest.raises(DeployRefused, match="never published"):
        registry_diff(kolm_settings, store, "acme.crafted", [EMPTY_CID, str(second)])
    with pytest.raises(DiffError, match="no evaluated candidate"):
        registry_diff(kolm_settings, store, "acme.crafted", [str(first), "candidate"])
    with pytest.raises(DiffError, match="both versions are"):
        registry_diff(kolm_settings, store, "acme.crafted", [str(first), str(first)])
    other = signed_artifact(tmp_path / "other.kolm", adapter_dir=fake_adapter(tmp_path / "other-adapter"),
                            keys_dir=kolm_settings.keys_dir, task="acme.other")
    with pytest.raises(DiffError, match="artifact of task 'acme.other', not 'acme.crafted'"):
        registry_diff(kolm_settings, store, "acme.crafted", [str(first), str(other)])
    tampered = tmp_path / "tampered.kolm"
    data = bytearray(second.read_bytes())
    data[len(data) // 3] ^= 0x01
    tampered.write_bytes(bytes(data))
    with pytest.raises(DeployRefused, match="does not verify"):
        registry_diff(kolm_settings, store, "acme.crafted", [str(first), str(tampered)])


def test_case_texts_come_from_the_work_dir_while_retention_keeps_them(kolm_settings, tmp_path):
    """A new evaluation holds no text; `kolm registry diff` shows the texts of the namespace's case_previews.json
    when they belong to the evaluation measured, and keys and scores alone once retention removed them."""
    store = CaptureStore(kolm_settings.store_url)
    task = "acme.previews"
    cases = [{key: value for key, value in _case(key, passed).items() if key not in ("input", "expected")}
             for key, passed in (("p1", True), ("p2", False))]
    for case in cases:
        for side in ("candidate", "current"):
            case[side].pop("output")
    evaluation = _evaluation(task, cases, SPEC, 0.7)
    artifact = _artifact(tmp_path / "p.kolm", kolm_settings.keys_dir, evaluation)
    publish(kolm_settings, task, artifact)
    workdir = NamespaceWorkdir(kolm_settings, task)
    write_json_atomic(workdir.evaluation, evaluation)
    previews = {"adapter_cid": evaluation["adapter_cid"], "current_name": "base", "cases": [
        {"key": key, "capture_id": 7, "input": f"where is order {key}", "expected": "fin-ops",
         "outputs": {"candidate": "fin-ops", "current": "iam"}} for key in ("p1", "p2")]}
    write_json_atomic(workdir.case_previews, previews)

    diff = registry_diff(kolm_settings, store, task, ["base", "candidate"])
    assert [flip.key for flip in diff.improved] == ["p1"]
    assert (diff.improved[0].input, diff.improved[0].after_output) == ("where is order p1", "fin-ops")
    assert "where is order p1" in diff_text(diff) and "where is order" not in diff_markdown(diff)
    # Previews of another evaluation are not shown as this one's.
    write_json_atomic(workdir.case_previews, {**previews, "adapter_cid": "another"})
    assert registry_diff(kolm_settings, store, task, ["base", "candidate"]).improved[0].input == ""
    workdir.case_previews.unlink()  # as retention does
    text = diff_text(registry_diff(kolm_settings, store, task, ["base", "candidate"]))
    assert "p1  score 0.00 → 1.00  (texts not kept: past retention, or from another evaluation)" in text
