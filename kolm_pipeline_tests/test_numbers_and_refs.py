"""Issue 22, "the numbers and identifiers make sense": accuracy beside K, what each counter counts (with the
migration that changed `merged`), friendly version names wherever a CID is taken, and the data checks."""

from __future__ import annotations

import base64
import json
import re

import pytest

from kolm_pipeline.cli import main
from kolm_pipeline.corpus.health import corpus_health, decontamination_share, label_balance
from kolm_pipeline.corpus.recipe import Recipe
from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.evaluate.gate import decide
from kolm_pipeline.registry import cid_for_file, read_pointer
from kolm_pipeline.registry.manage import describe_cid, log_lines
from kolm_pipeline.registry.refs import RefError, resolve_ref
from kolm_pipeline.settings import load_settings
from kolm_pipeline.stages.diff import registry_diff
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.train.loss_plot import loss_curve_markdown
from kolm_pipeline_tests.conftest import capture_tickets
from kolm_pipeline_tests.test_registry_diff import SPEC, _artifact, _case, _evaluation
from kolm_pipeline_tests.test_registry_support import clean_env, shared_mlflow_uri
from kolm_pipeline_tests.test_store import _insert_old_capture, _migrate_to

# --- accuracy beside K ------------------------------------------------------------------------------------


def test_the_gate_decision_reads_accuracy_beside_k():
    """The bare base of the demo: 18 % accuracy, K 0.60. Every reason ends with both sides' accuracy and K."""
    decision = decide(k_new=0.85, k_current=0.6012, k_floor=0.5, tripwire_clear=True, accuracy_new=0.925,
                      accuracy_current=0.181)
    assert decision.reason == "swap: K improves by +0.2488; accuracy 18.1% → 92.5%, K 0.6012 → 0.8500"
    assert (decision.accuracy_new, decision.accuracy_current) == (0.925, 0.181)
    refused = decide(k_new=0.6, k_current=0.6012, k_floor=0.5, tripwire_clear=True, accuracy_new=0.2,
                     accuracy_current=0.181)
    assert refused.reason.startswith("refused: regression") and "accuracy 18.1% → 20.0%" in refused.reason
    # Decisions recorded before accuracy rode along still read (and say K alone).
    assert decide(k_new=0.7, k_current=0.6, k_floor=0.5, tripwire_clear=True).reason.endswith("K 0.6000 → 0.7000")


# --- counters ---------------------------------------------------------------------------------------------


def _deployment_row(store: CaptureStore, task: str, to_cid: str) -> int:
    """A registry row as the deployment stage writes it (its details name the evaluation's `current` side)."""
    return store.add_registry_row(task=task, from_cid=None, to_cid=to_cid, k_before=0.6, k_after=0.85,
                                  decision="swap", actor="dagster:run", details={"reason": "swap", "current": "base"})


def test_merged_counts_published_distill_runs_not_pairs(kolm_settings):
    """Issue 22: `merged` showed 275 (the pairs of the deployed corpus) where it means distill runs that cleared
    the gate and were published. `kolm swap`, rollbacks and refusals are not such runs."""
    store = CaptureStore(kolm_settings.store_url)
    capture_tickets(store, "acme", "support", generate_tickets(6, seed=3))
    ids = [c.id for c in store.list_captures("acme")]
    store.set_triage("acme", ids, "kept", "alice")
    assert store.mark_distilled("acme", "support", ids) == 6
    _deployment_row(store, "acme.support", "bafkreiaaa")
    assert store.mark_merged("acme", "support", ids[:4]) == 4
    counters = store.counters("acme", "support")
    assert (counters["distilled"], counters["merged"]) == (6, 1)
    # A hand swap, a rollback and a refusal of the same task, and a deployment of another namespace: not counted.
    store.add_registry_row("acme.support", "bafkreiaaa", "bafkreibbb", 0.8, 0.9, "swap", "cli", {"strategy": "force"})
    store.add_registry_row("acme.support", "bafkreibbb", "bafkreiaaa", 0.9, 0.8, "rollback", "cli", {})
    store.add_registry_row("acme.support", "bafkreiaaa", None, 0.8, 0.7, "refuse", "gate", {"reason": "noise"})
    _deployment_row(store, "acme.other", "bafkreiccc")
    _deployment_row(store, "acme.support", "bafkreiddd")
    assert store.mark_merged("acme", "support", ids) == 2
    assert store.counters("acme", "support")["merged"] == 2
    assert store.recount("acme", "support", "test") == store.counters("acme", "support")  # nothing to repair


def test_migration_8_recounts_merged_as_runs(tmp_path):
    """A store of version 7 counted the pairs of deployed corpora in `merged`; upgrading recounts it as the
    published distill runs the registry holds."""
    from sqlalchemy import create_engine, text

    from kolm_pipeline.store.migrations import MIGRATIONS

    version = next(number for number, name, _ in MIGRATIONS if name == "merged counts published distill runs")
    url = f"sqlite:///{tmp_path / 'v7.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        _migrate_to(conn, version - 1)
        for number in range(1, 4):
            _insert_old_capture(conn, id=number, request_id=f"r{number}", distilled_at="2999-01-01 00:00:00",
                                merged_at="2999-01-01 00:00:00")
        conn.execute(text("INSERT INTO namespace_counters VALUES ('acme', 'support', 3, 3, 0, 3, 3)"))
        for to_cid, decision, details in [("bafkreia", "swap", {"reason": "swap", "current": "base"}),
                                          ("bafkreib", "swap", {"strategy": "force"}),
                                          ("bafkreia", "rollback", {}),
                                          ("bafkreic", "swap", {"reason": "swap", "current": "champion:bafkreia"})]:
            conn.execute(text("INSERT INTO registry (task, from_cid, to_cid, decision, actor, details_json, created_at)"
                              " VALUES ('acme.support', NULL, :to, :decision, 'x', :details, '2999-01-01 00:00:00')"),
                         {"to": to_cid, "decision": decision, "details": json.dumps(details, separators=(",", ":"))})
    engine.dispose()
    upgraded = CaptureStore(url)
    counters = upgraded.counters("acme", "support")
    assert (counters["distilled"], counters["merged"]) == (3, 2)  # was merged 3: the pairs
    assert upgraded.get_capture("acme", 1).merged_at is not None  # each pair still says it is deployed
    upgraded.close()


# --- friendly references ----------------------------------------------------------------------------------


@pytest.fixture
def versions(kolm_settings, monkeypatch, tmp_path_factory):
    """Three versions of acme.refs deployed in turn by `kolm swap`, with accuracy in their evaluations."""
    clean_env(monkeypatch, KOLM_MLFLOW_URI=shared_mlflow_uri(tmp_path_factory))
    settings = load_settings(kolm_settings.home)
    task = "acme.refs"
    paths = [_artifact(settings.home / "in" / f"v{index}.kolm", settings.keys_dir,
                       _evaluation(task, [_case("c1", index > 0)], SPEC, k))
             for index, k in enumerate((0.6, 0.7, 0.8))]
    for path in paths:
        assert main(["swap", "--artifact", str(path)]) == 0
    return settings, task, [cid_for_file(path) for path in paths]


def _unique_prefix(cid: str, others: list[str], shortest: int) -> str:
    """The shortest prefix of `cid` (at least `shortest` long) no other CID shares: CIDs differ per run, so a
    fixed length can clash (CI once drew two versions both starting `bafkreigp`)."""
    return next(cid[:n] for n in range(shortest, len(cid)) if not any(o.startswith(cid[:n]) for o in others))


def test_friendly_names_resolve_the_same_for_every_verb(versions, capsys):
    settings, task, (first, second, third) = versions
    store = CaptureStore(settings.store_url)
    first_prefix = _unique_prefix(first, [second, third], 10)
    third_prefix = _unique_prefix(third, [first, second], 9)
    second_headless = _unique_prefix(second, [first, third], 15).removeprefix("bafkrei")
    assert resolve_ref(settings, store, "current", task).cid == third
    assert resolve_ref(settings, store, "previous", task).cid == second
    assert resolve_ref(settings, store, third_prefix, task).cid == third
    assert resolve_ref(settings, store, second_headless).cid == second  # head left out
    assert resolve_ref(settings, store, first, task).task == task
    assert resolve_ref(settings, store, "base", task).kind == "base"

    # An ambiguous prefix is refused, listing what it matches; so is a name that needs a task.
    with pytest.raises(RefError, match=r"'bafkrei' matches 3 CIDs of acme\.refs; write more of it") as raised:
        resolve_ref(settings, store, "bafkrei", task)
    assert all(cid in str(raised.value) for cid in (first, second, third))
    with pytest.raises(RefError, match="names a version of one task: give --task"):
        resolve_ref(settings, store, "current")
    with pytest.raises(RefError, match="no version of acme.refs has a CID starting with 'zzzzzzz'"):
        resolve_ref(settings, store, "zzzzzzz", task)
    with pytest.raises(RefError, match="malformed CID 'not-a-cid'"):
        resolve_ref(settings, store, "not-a-cid", task)
    with pytest.raises(RefError, match="the bare base is no artifact"):
        resolve_ref(settings, store, "base", task, allow=("artifact",))

    # `registry log --cid`, `verify` and `swap --cid` read the same names.
    capsys.readouterr()
    assert main(["registry", "log", "--cid", "previous", "--task", task, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cid"] == second
    assert main(["registry", "log", "--cid", first_prefix]) == 0
    assert capsys.readouterr().out.startswith(f"artifact {first} ({first_prefix})")
    assert main(["verify", "current", "--task", task]) == 0
    assert capsys.readouterr().out.startswith(f"OK {third}")
    assert main(["verify", "bafkrei"]) == 1
    assert "matches 3 CIDs" in capsys.readouterr().err
    assert main(["swap", "--task", task, "--cid", "previous", "--strategy", "force"]) == 0
    assert read_pointer(settings.adapters_dir, task).name == f"{second}.kolm"
    assert main(["swap", "--task", task, "--cid", "candidate"]) == 1
    assert "no CID until a deployment packages it" in capsys.readouterr().err
    assert main(["swap", "--task", task, "--cid", third_prefix, "--strategy", "force"]) == 0
    assert read_pointer(settings.adapters_dir, task).name == f"{third}.kolm"


def test_registry_diff_reads_old_to_new(versions, capsys):
    """Issue 22: `diff base` read backwards (current → base); `current` was a malformed CID."""
    settings, task, (first, second, third) = versions
    store = CaptureStore(settings.store_url)
    base = registry_diff(settings, store, task, ["base"])
    assert base.before.is_base and base.after.cid == third
    prefix = _unique_prefix(first, [second, third], 8)
    older = registry_diff(settings, store, task, [prefix])
    assert (older.before.cid, older.after.cid) == (first, third)
    default = registry_diff(settings, store, task)
    assert (default.before.cid, default.after.cid) == (second, third)
    assert main(["registry", "diff", "--task", task, "previous", "current", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["before"]["cid"], payload["after"]["cid"]) == (second, third)
    assert main(["registry", "diff", "--task", task, "base"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{task}: (bare base) → {third}\nold → new: before is base, after is current")


def test_registry_log_shows_accuracy_beside_k(versions, capsys):
    settings, task, (first, second, third) = versions
    store = CaptureStore(settings.store_url)
    lines = log_lines(store.registry_rows(task))
    assert re.search(r"accuracy before → after\s+K before → after", lines[0])
    newest = next(line for line in lines if line.startswith("20") and f"{second} → {third}" in line)
    # The crafted evaluations score accuracy = K; the replaced version's own accuracy comes from its manifest.
    assert re.search(r" 70\.0% → 80\.0%\s+0\.7000 → 0\.8000 ", newest), newest
    first_row = next(line for line in lines if line.startswith("20") and f"(base) → {first}" in line)
    assert re.search(r" 0\.0% → 60\.0%\s+0\.2000 → 0\.6000 ", first_row), first_row  # the bare base, then it
    assert any("score: accuracy 80.0%, K 0.8000" in line for line in lines)
    events = describe_cid(settings, store, "current", task=task)["events"]
    assert (events[0]["accuracy_before"], events[0]["accuracy_after"]) == pytest.approx((0.7, 0.8))


# --- data checks and the loss plot ------------------------------------------------------------------------


def _row(user: str, answer: str, capture_id: int, candidate: bool = False) -> dict:
    meta = {"capture_id": capture_id, **({"eval_candidate": True} if candidate else {})}
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "meta": meta}


def test_corpus_checks_count_pairs_and_placeholders_in_answers():
    rows = [_row(f"ticket {i}", "fin-ops", i) for i in range(200)]
    enough, pii = corpus_health(rows)
    assert (enough.outcome, pii.outcome) == ("pass", "pass")
    assert enough.metadata["expected_eval_cases"] == 40

    small = corpus_health([_row(f"ticket {i}", "fin-ops", i) for i in range(40)])[0]
    assert small.outcome == "warn" and "about 8 eval cases" in small.description
    assert corpus_health([_row("t", "a", 1)])[0].outcome == "fail"

    leaking = rows[:190] + [_row(f"mail {i}", "Write to <EMAIL> or call <PHONE>", 1000 + i) for i in range(10)]
    pii = corpus_health(leaking)[1]
    assert pii.outcome == "warn" and pii.metadata["by_entity"] == {"EMAIL": 10, "PHONE": 10}
    assert pii.metadata["capture_ids"][:2] == [1000, 1001] and "@" not in json.dumps(pii.metadata)
    assert corpus_health(rows[:50] + leaking[190:])[1].outcome == "fail"  # 10 of 60: above 10 %
    # A placeholder in the question is what redaction is for; only answers count.
    assert corpus_health([_row("I am <EMAIL>", "fin-ops", 1)] * 20)[1].outcome == "pass"


def _recipe(train: list[str], eval_: list[str], holdout: list[str], removed: int = 0) -> Recipe:
    rows = [[_row(f"q{i}", answer, i) for i, answer in enumerate(split)] for split in (train, eval_, holdout)]
    labels = sorted(set(train + eval_ + holdout))
    return Recipe(path=None, spec={"output_kind": "categorical", "labels": labels}, train=rows[0], eval=rows[1],
                  holdout=rows[2], diagnostics={"decontamination": {"decontaminated": removed,
                                                                    "decontaminated_exact": removed}})


def test_recipe_checks_label_balance_and_decontamination():
    balanced = _recipe(["a"] * 10 + ["b"] * 10, ["a", "b"], ["a", "b"], removed=5)
    assert label_balance(balanced).outcome == "pass" and decontamination_share(balanced).outcome == "pass"
    assert [row["label"] for row in label_balance(balanced).table] == ["a", "b"]

    skewed = _recipe(["a"] * 30 + ["b"] * 2, ["a", "c"], ["a"], removed=40)
    check = label_balance(skewed)
    assert check.outcome == "warn"
    assert "'a' is 94% of training" in check.description and "'b'" in check.description and "'c'" in check.description
    share = decontamination_share(skewed)
    assert share.outcome == "warn" and share.metadata["share"] == pytest.approx(40 / 72, abs=1e-3)
    assert decontamination_share(_recipe(["a"] * 10, ["a"], ["a"], removed=40)).outcome == "fail"
    free_text = Recipe(path=None, spec={"output_kind": "free_text"}, train=[], eval=[], holdout=[])
    assert label_balance(free_text).outcome == "pass"


def test_loss_curve_is_a_png_in_markdown():
    markdown = loss_curve_markdown([(1, 7.6), (2, 5.5), (10, 0.7), (36, 0.02)])
    assert markdown.startswith("Training loss 7.6000 at step 1 → 0.0200 at step 36 (4 logged points).")
    data = re.search(r"!\[training loss by step\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "No loss was logged" in loss_curve_markdown([])


def test_data_checks_are_scoped_to_the_partition_and_a_leaking_corpus_stops_the_run(kolm_settings):
    """Issue 22: check results showed "Partition —", so namespaces mixed. A corpus whose answers carry
    redaction placeholders fails its blocking check, and the recipe is never made from it."""
    import dagster as dg
    from dagster._core.event_api import PartitionKeyFilter

    from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace

    store = CaptureStore(kolm_settings.store_url)
    tickets = generate_tickets(120, seed=5)
    capture_tickets(store, "acme", "support", tickets)
    capture_tickets(store, "acme", "leaky", tickets, reply="Mail <EMAIL> for a refund")
    for namespace in ("support", "leaky"):
        store.add_rule("acme", namespace, "keep", {"status": "ok"}, actor="test")
    instance = ensure_instance(kolm_settings)
    stages = ["triaged_captures", "corpus", "recipe"]
    config = {"ops": {"corpus": {"config": {"min_pairs": 50}}}}

    good, _ = materialize_namespace(instance, "acme.support", config, stages=stages)
    assert good.success
    checks = {c.asset_check_key.name: c for c in good.get_asset_check_evaluations()}
    assert set(checks) == {"corpus_enough_pairs", "corpus_no_pii_in_answers", "recipe_label_balance",
                           "recipe_decontamination"}
    assert all(check.partition == "acme.support" for check in checks.values())
    assert checks["corpus_no_pii_in_answers"].passed and checks["recipe_label_balance"].passed
    assert checks["recipe_label_balance"].metadata["by_label"].records

    bad, outcomes = materialize_namespace(instance, "acme.leaky", config, stages=stages)
    leak = next(c for c in bad.get_asset_check_evaluations() if c.asset_check_key.name == "corpus_no_pii_in_answers")
    assert not leak.passed and leak.severity == dg.AssetCheckSeverity.ERROR and leak.partition == "acme.leaky"
    assert {o.stage: o.status for o in outcomes}["recipe"] == "skipped"
    for partition, status in (("acme.support", "SUCCEEDED"), ("acme.leaky", "FAILED")):  # each its own, not mixed
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [leak.asset_check_key], partition_filter=PartitionKeyFilter(key=partition))
        assert latest[leak.asset_check_key].status.value == status, partition


def test_demo_report_says_where_the_distilled_pairs_went(kolm_settings):
    """Issue 22: "distilled 275" while 138 pairs trained, and the counters printed as a dict."""
    from kolm_pipeline.demo.run import DemoReport, format_report

    report = DemoReport(requests=320, streamed=80, counters={"captured": 320, "kept": 320, "discarded": 0,
                                                             "untriaged": 0, "distilled": 275, "merged": 1},
                        splits={"train": 138, "eval": 39, "holdout": 42, "decontaminated": 56},
                        checks=[("corpus_enough_pairs", "pass", "275 usable pairs"),
                                ("recipe_decontamination", "warn", "56 of 194 removed")])
    text = format_report(report, kolm_settings)
    assert "distilled 275 pairs; merged 1 (distill runs published)" in text
    assert "train 138, eval 39, frozen hold-out 42; 56 training pairs removed" in text
    assert "Checks: corpus_enough_pairs pass, recipe_decontamination warn" in text
    assert "recipe_decontamination: 56 of 194 removed" in text and "{'captured'" not in text
