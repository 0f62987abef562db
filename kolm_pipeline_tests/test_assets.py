"""Every asset of the loop materializes in-process on a tiny random-weight model, in the real Dagster
instance of a temporary KOLM_HOME, with training out of process through Pipes."""

from __future__ import annotations

import json

import dagster as dg

from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.provenance.keys import load_public_keys
from kolm_pipeline.registry.artifact import verify_kolm
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.stages.workdir import NamespaceWorkdir

TINY_RUN = {
    "ops": {
        "corpus": {"config": {"min_pairs": 100}},
        "adapter": {"config": {"epochs": 3, "learning_rate": 0.02}},
    }
}


def _metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was not materialized"
    materialization = event.asset_materialization
    assert materialization.partition == partition
    return {key: value.value for key, value in materialization.metadata.items()}


def test_loop_materializes_every_asset(kolm_settings, autoreply_store, tiny_base, monkeypatch):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    instance = ensure_instance(kolm_settings)
    result, outcomes = materialize_namespace(instance, "acme.support", TINY_RUN)

    assert result.success, [o for o in outcomes if o.status != "success"]
    assert [o.status for o in outcomes] == ["success"] * 6

    triaged = _metadata(instance, "triaged_captures", "acme.support")
    assert triaged["counter_kept"] == 160 and triaged["counter_untriaged"] == 0

    corpus = _metadata(instance, "corpus", "acme.support")
    assert corpus["corpus_cid"].startswith("bafkrei")
    assert corpus["written"] + corpus["duplicates_dropped"] == 160 and corpus["written"] >= 100

    recipe = _metadata(instance, "recipe", "acme.support")
    assert recipe["output_kind"] == "free_text" and recipe["verifier"] == "text_match"
    assert (recipe["train_pairs"] + recipe["eval_pairs"] + recipe["holdout_pairs"] + recipe["decontaminated"]
            == corpus["written"])

    adapter = _metadata(instance, "adapter", "acme.support")
    assert adapter["tokens_per_second"] > 0 and adapter["steps"] > 0
    assert adapter["mlflow_run_id"]

    evaluation = _metadata(instance, "evaluation", "acme.support")
    assert evaluation["current"] == "base"
    table = evaluation["side_by_side"]
    assert [record.data["model"] for record in table.records] == ["base", "candidate"]
    # The version diff against the bare base: the trained candidate fixes cases, none regress.
    assert evaluation["cases_improved"] > 0 and evaluation["cases_regressed"] == 0
    assert evaluation["cases_compared"] == evaluation["eval_cases"]
    assert f"Improved (fail → pass), {min(20, evaluation['cases_improved'])} of {evaluation['cases_improved']}" \
        in evaluation["version_diff"]
    assert "Regressed (pass → fail)" not in evaluation["version_diff"]

    checks = {c.asset_check_key.name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"k_gate": True, "collapse_tripwire": True}

    deployment = _metadata(instance, "deployment", "acme.support")
    pointer = read_pointer(kolm_settings.adapters_dir, "acme.support")
    assert pointer is not None and pointer.name == f"{deployment['artifact_cid']}.kolm"
    report = verify_kolm(pointer, load_public_keys(kolm_settings.keys_dir))
    assert report.ok, report.problems
    assert [row.decision for row in autoreply_store.registry_rows("acme.support")] == ["swap"]
    counters = autoreply_store.counters("acme", "support")
    assert counters["distilled"] == counters["merged"] == corpus["written"]

    workdir = NamespaceWorkdir(kolm_settings, "acme.support")
    saved = json.loads(workdir.evaluation.read_text())
    assert saved["decision"]["swap"] and saved["candidate"]["k"] > saved["current"]["k"]
    assert saved["candidate"]["accuracy"] > 0.9 > saved["current"]["accuracy"]


def test_failed_training_fails_cleanly_and_leaves_nothing(kolm_settings, ticket_store, tiny_base, monkeypatch):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    instance = ensure_instance(kolm_settings)
    run_config = {"ops": {"corpus": {"config": {"min_pairs": 100}},
                          "adapter": {"config": {"epochs": 1, "target_modules": ["no_such_proj"]}}}}
    result, outcomes = materialize_namespace(instance, "acme.support", run_config)

    assert not result.success
    statuses = {o.stage: o.status for o in outcomes}
    assert statuses["recipe"] == "success" and statuses["adapter"] == "failure"
    assert statuses["evaluation"] == statuses["deployment"] == "skipped"
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "adapter")
    description = failure.step_failure_data.user_failure_data.description
    assert "no_such_proj" in description and "q_proj" in description  # names the module and the choices
    workdir = NamespaceWorkdir(kolm_settings, "acme.support")
    assert not workdir.adapter.exists() and not workdir.adapter.with_name("adapter.partial").exists()
    assert read_pointer(kolm_settings.adapters_dir, "acme.support") is None
    assert not any(kolm_settings.artifacts_dir.glob("**/*.kolm"))


def test_corpus_below_threshold_says_how_many_more(kolm_settings, ticket_store, tiny_base, monkeypatch):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    result, outcomes = materialize_namespace(ensure_instance(kolm_settings), "acme.support",
                                             {"ops": {"corpus": {"config": {"min_pairs": 1000}}}})
    assert not result.success
    assert [o.status for o in outcomes][:3] == ["success", "failure", "skipped"]
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "corpus")
    assert "more needed" in failure.step_failure_data.user_failure_data.description
