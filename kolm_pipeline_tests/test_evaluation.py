"""Evaluation behaviour end to end on a tiny model: the regression alert reaches a real webhook, a failed
gate keeps `deployment` from running in the same run and from automation later, a passing evaluation is
deployed by automation, and a collapsed candidate trips the tripwire and halts the namespace."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from fastapi import FastAPI, Request

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.cli import main
from kolm_pipeline.definitions import defs
from kolm_pipeline.defs.launch import STAGES, ensure_instance, materialize_namespace
from kolm_pipeline.demo.tickets import generate_tickets
from kolm_pipeline.evaluate.tripwire import read_state
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.settings import load_settings
from kolm_pipeline.stages.adapter import record_adapter
from kolm_pipeline.stages.corpus import run_corpus_stage, run_recipe_stage
from kolm_pipeline.stages.evaluation import run_evaluation_stage
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.train.base_model import resolve_base_model
from kolm_pipeline.train.distill import TrainConfig, train_adapter

from .conftest import capture_tickets

PARTITION = "acme.support"


def _run_config(epochs: float) -> dict:
    return {"ops": {"corpus": {"config": {"min_pairs": 100}},
                    "adapter": {"config": {"epochs": epochs, "learning_rate": 0.02}}}}


def _automation_tick(instance: dg.DagsterInstance, cursor=None):
    """One evaluation of the automation conditions, as the (stopped by default) sensor would run it."""
    return dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=dg.AssetSelection.assets("deployment"), cursor=cursor
    )


def _deployment_requested(tick) -> bool:
    return PARTITION in tick.get_requested_partitions(dg.AssetKey("deployment"))


def _kept_tickets_with_recipe(kolm_settings, count: int, seed: int):
    """`count` ticket captures kept by a rule, their corpus and recipe: (store, settings, workdir)."""
    store = CaptureStore(kolm_settings.store_url)
    capture_tickets(store, "acme", "support", generate_tickets(count, seed=seed))
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")
    store.apply_rules("acme", "support")
    settings = load_settings(kolm_settings.home)
    workdir = NamespaceWorkdir(settings, PARTITION)
    run_corpus_stage(workdir, store, min_pairs=50)
    run_recipe_stage(workdir)
    return store, settings, workdir


@pytest.fixture
def webhook():
    received: list[dict] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> dict:
        received.append(await request.json())
        return {"ok": True}

    with BackgroundServer(app) as server:
        yield f"{server.url}/hook", received


def test_regression_alerts_webhook_and_blocks_deployment(kolm_settings, autoreply_store, tiny_base, webhook,
                                                           monkeypatch):
    url, received = webhook
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    monkeypatch.setenv("KOLM_ALERT_WEBHOOK", url)
    instance = ensure_instance(kolm_settings)
    first, _ = materialize_namespace(instance, PARTITION, _run_config(3))
    assert first.success
    champion = read_pointer(kolm_settings.adapters_dir, PARTITION)
    baseline = _automation_tick(instance)

    # A barely trained candidate against a good champion: Δ far below −0.03.
    second, outcomes = materialize_namespace(instance, PARTITION, _run_config(0.05))
    statuses = {o.stage: o.status for o in outcomes}
    assert statuses["evaluation"] == "success" and statuses["deployment"] == "skipped"
    evaluation = json.loads(NamespaceWorkdir(kolm_settings, PARTITION).evaluation.read_text())
    assert evaluation["decision"]["alert"] and evaluation["decision"]["delta"] <= -0.03
    assert evaluation["alert"].startswith("delivered")
    assert len(received) == 1 and received[0]["task"] == PARTITION and received[0]["delta"] <= -0.03
    assert instance.get_run_by_id(second.run_id).tags.get("kolm/alert") == "regression"
    assert read_pointer(kolm_settings.adapters_dir, PARTITION) == champion
    rows = CaptureStore(kolm_settings.store_url).registry_rows(PARTITION)
    assert rows[0].decision == "alert" and rows[0].to_cid is None

    # The next automation tick sees the new evaluation but must not deploy what the gate refused.
    assert not _deployment_requested(_automation_tick(instance, baseline.cursor))


def test_automation_deploys_only_a_passing_evaluation(kolm_settings, autoreply_store, tiny_base, monkeypatch):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    instance = ensure_instance(kolm_settings)
    baseline = _automation_tick(instance)
    result, outcomes = materialize_namespace(instance, PARTITION, _run_config(3), stages=list(STAGES[:-1]))
    assert result.success and {o.stage: o.status for o in outcomes}["deployment"] == "skipped"
    gate = {c.asset_check_key.name: c.passed for c in result.get_asset_check_evaluations()
            if c.asset_check_key.name in ("k_gate", "collapse_tripwire")}
    assert gate == {"k_gate": True, "collapse_tripwire": True}
    assert _deployment_requested(_automation_tick(instance, baseline.cursor))


def test_collapsed_candidate_trips_and_halts_until_cleared(kolm_settings, tiny_base, capsys):
    """A candidate trained on its own collapsed outputs (one label for everything) is refused; the
    namespace stays halted for later candidates until an operator clears it."""
    store, settings, workdir = _kept_tickets_with_recipe(kolm_settings, count=120, seed=5)
    train = workdir.recipe / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for row in rows:
        row["messages"][-1]["content"] = "fin-ops"
    collapsed = workdir.root / "collapsed.jsonl"
    collapsed.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = resolve_base_model(str(tiny_base), settings.models_dir)
    train_adapter(collapsed, base, workdir.adapter, TrainConfig(epochs=2, learning_rate=0.02), show_progress=False)
    record_adapter(workdir, base, "recipe", {})

    first = run_evaluation_stage(workdir, settings, base, champion=None, store=store).document()
    assert not first["tripwire"]["clear"] and "diversity" in first["tripwire"]["reasons"][0]
    assert not first["decision"]["swap"]
    assert read_state(store, workdir.task)["halted"]  # in the store: every run on every host sees the halt

    again = run_evaluation_stage(workdir, settings, base, champion=None, store=store).document()
    assert any("halted" in reason for reason in again["tripwire"]["reasons"])

    assert main(["tripwire", "clear", "--namespace", PARTITION]) == 0
    assert "halt cleared" in capsys.readouterr().out
    assert not read_state(store, workdir.task)["halted"]
    assert store.audit_rows("acme", "support")[0].action == "tripwire.clear"


def test_bare_base_answers_are_reused_by_the_next_evaluation(kolm_settings, tiny_base):
    """The bare base answers each case once per (weights, decoding): the next evaluation reads its answers back
    from base_answers.json (a planted answer shows it was not recomputed), and a changed key recomputes."""
    store, settings, workdir = _kept_tickets_with_recipe(kolm_settings, count=90, seed=8)
    base = resolve_base_model(str(tiny_base), settings.models_dir)
    train_adapter(workdir.recipe / "train.jsonl", base, workdir.adapter, TrainConfig(epochs=1), show_progress=False)
    record_adapter(workdir, base, "recipe", {})

    first = run_evaluation_stage(workdir, settings, base, champion=None, store=store).document()
    cached = json.loads(workdir.base_answers.read_text())
    cases = first["eval_cases"] + first["holdout_cases"]
    assert first["current"]["reused_cases"] == 0 and len(cached["cases"]) == cases
    assert all(case["capture_id"] for case in cached["cases"])  # so retention can remove the file with them

    again = run_evaluation_stage(workdir, settings, base, champion=None, store=store).document()
    assert again["current"]["reused_cases"] == cases
    assert again["current"]["accuracy"] == first["current"]["accuracy"]
    assert "reused_cases" not in again["candidate"]

    labels = json.loads((workdir.recipe / "spec.json").read_text())["labels"]
    expected = {case["key"]: case for case in again["case_verdicts"]["cases"]}
    for case in cached["cases"][: first["eval_cases"]]:  # plant right answers for the eval split
        row = next(json.loads(line) for line in (workdir.recipe / "eval.jsonl").read_text().splitlines()
                   if json.loads(line)["meta"]["capture_id"] == case["capture_id"])
        case["output"] = row["messages"][-1]["content"]
        assert case["output"] in labels and case["key"] in expected
    workdir.base_answers.write_text(json.dumps(cached))
    planted = run_evaluation_stage(workdir, settings, base, champion=None, store=store).document()
    assert planted["current"]["accuracy"] == 1.0 != first["current"]["accuracy"]

    cached["key"] = "another base or decoding"
    workdir.base_answers.write_text(json.dumps(cached))
    recomputed = run_evaluation_stage(workdir, settings, base, champion=None, store=store).document()
    assert recomputed["current"]["reused_cases"] == 0
    assert recomputed["current"]["accuracy"] == first["current"]["accuracy"]
