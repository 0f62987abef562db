"""Every asset of the loop materializes in-process on a tiny random-weight model, in the real Dagster
instance of a temporary KOLM_HOME, with training out of process through Pipes."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from kolm_pipeline.cli import main as kolm_main
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
    from kolm_pipeline.capture.background import BackgroundServer
    from kolm_pipeline_tests.test_judge import JUDGE_MODEL, KEY, stand_in_judge_app

    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    # A free-text task: its answers are scored by the (stand-in) judge when one is configured.
    judged: list[dict] = []
    judge = BackgroundServer(stand_in_judge_app(judged))
    monkeypatch.setenv("KOLM_JUDGE_MODEL", JUDGE_MODEL)
    monkeypatch.setenv("KOLM_JUDGE_URL", judge.url + "/v1")
    monkeypatch.setenv("KOLM_JUDGE_API_KEY", KEY)
    instance = ensure_instance(kolm_settings)
    with judge:
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

    evaluations = result.get_asset_check_evaluations()
    checks = {c.asset_check_key.name: c.passed for c in evaluations}
    assert {name: checks.pop(name) for name in ("k_gate", "collapse_tripwire")} == {"k_gate": True,
                                                                                   "collapse_tripwire": True}
    assert set(checks) == {"corpus_enough_pairs", "corpus_no_pii_in_answers", "recipe_label_balance",
                           "recipe_decontamination"}  # data health: may warn on this small corpus, never fail
    assert all(c.partition == "acme.support" for c in evaluations)  # issue 22: not "Partition —"
    assert all(c.passed or c.severity == dg.AssetCheckSeverity.WARN for c in evaluations)
    assert "accuracy" in evaluation["gate_decision"] and evaluation["accuracy_candidate"] > 0.9
    # The bare base's answers went to the judge once each (the candidate's equal the reference: nothing to ask).
    assert evaluation["judge_calls"] == len(judged) == len({(c["reference"], c["answer"]) for c in judged}) > 0
    assert "![training loss by step](data:image/png;base64," in adapter["loss_curve"]

    deployment = _metadata(instance, "deployment", "acme.support")
    pointer = read_pointer(kolm_settings.adapters_dir, "acme.support")
    assert pointer is not None and pointer.name == f"{deployment['artifact_cid']}.kolm"
    report = verify_kolm(pointer, load_public_keys(kolm_settings.keys_dir))
    assert report.ok, report.problems
    assert [row.decision for row in autoreply_store.registry_rows("acme.support")] == ["swap"]
    counters = autoreply_store.counters("acme", "support")
    # distilled: the pairs of the corpus; merged: distill runs that cleared the gate and were published.
    assert (counters["distilled"], counters["merged"]) == (corpus["written"], 1)

    workdir = NamespaceWorkdir(kolm_settings, "acme.support")
    saved = json.loads(workdir.evaluation.read_text())
    assert saved["decision"]["swap"] and saved["candidate"]["k"] > saved["current"]["k"]
    assert saved["candidate"]["accuracy"] > 0.9 > saved["current"]["accuracy"]
    assert saved["current"]["judge_calls"] + saved["candidate"]["judge_calls"] == len(judged)
    assert json.loads(workdir.judge_verdicts.read_text())["model"] == JUDGE_MODEL

    _assert_mlflow_layout(kolm_settings, instance, result.run_id, saved, deployment["artifact_cid"])


def _assert_mlflow_layout(settings, instance: dg.DagsterInstance, dagster_run_id: str, saved: dict,
                          artifact_cid: str) -> None:
    """One MLflow parent run per Dagster run, its steps as tagged children; the `champion` model version made
    from the training run (which holds the loss per step) and tagged with the K-score; clickable links."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("kolm/acme.support")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.dagster_run_id = '{dagster_run_id}'")
    by_stage = {run.data.tags["kolm.stage"]: run for run in runs}
    assert len(runs) == 4 and set(by_stage) == {"dagster_run", "training", "evaluation", "deployment"}
    parent = by_stage.pop("dagster_run")
    assert "mlflow.parentRunId" not in parent.data.tags and parent.info.status == "FINISHED"
    assert parent.data.metrics["k_score"] == pytest.approx(saved["candidate"]["k"])
    expected_tags = {"dagster_run_id": dagster_run_id, "partition": "acme.support", "task": "acme.support"}
    for run in (parent, *by_stage.values()):
        assert {key: run.data.tags.get(key) for key in expected_tags} == expected_tags, run.info.run_name
    for stage, run in by_stage.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert run.info.status == "FINISHED" and run.info.run_name == stage

    judged = by_stage["evaluation"].data.metrics
    assert judged["current.judge_calls"] == saved["current"]["judge_calls"]  # the judge's cost, in MLflow too
    training = by_stage["training"]
    loss = client.get_metric_history(training.info.run_id, "train.loss")
    assert len({point.step for point in loss}) >= 2  # a curve MLflow plots, not one number
    version = client.get_model_version_by_alias("kolm-acme.support", "champion")
    assert version.run_id == training.info.run_id
    assert version.tags["kolm.artifact_cid"] == artifact_cid
    assert float(version.tags["k_score"]) == pytest.approx(saved["candidate"]["k"], abs=1e-4)
    assert float(version.tags["accuracy"]) == pytest.approx(saved["candidate"]["accuracy"], abs=1e-4)
    assert version.tags["kolm.evaluation_run_id"] == by_stage["evaluation"].info.run_id
    assert "read-only mirror" in version.description

    ui = settings.mlflow_ui_url
    for asset, stage in (("adapter", "training"), ("evaluation", "evaluation"), ("deployment", "deployment")):
        metadata = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
        link = metadata["mlflow_run"]
        assert isinstance(link, dg.UrlMetadataValue)
        assert link.value == (f"{ui}/#/experiments/{experiment.experiment_id}/runs/{by_stage[stage].info.run_id}"
                              "?workflowType=machine_learning")
        assert parent.info.run_id in metadata["mlflow_dagster_run"].value
    deployed = instance.get_latest_materialization_event(dg.AssetKey("deployment")).asset_materialization.metadata
    assert deployed["mlflow_model_version"].value == \
        f"{ui}/#/models/kolm-acme.support/versions/{version.version}?workflowType=machine_learning"


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


def test_kolm_distill_train_settings_reach_the_trainer_and_bad_ones_stop_before_a_run(
        kolm_settings, ticket_store, tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    distill = ["distill", "--namespace", "acme.support", "--min-pairs", "100"]
    for bad, problem in [(["--train", "rank=0"], "rank: 0 is not a whole number >= 1"),
                         (["--train", "learning_rate"], "expected NAME=VALUE"),
                         (["--train", "rnak=8"], "unknown setting(s) ['rnak']"),
                         (["--train", "label_loss=yes"], "label_loss: 'yes' is not true or false")]:
        assert kolm_main([*distill, *bad]) == 1
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, err
    assert not NamespaceWorkdir(kolm_settings, "acme.support").recipe.exists()  # refused before any stage ran

    # A setting given with --train is what the trainer runs with: a module that does not exist fails the adapter.
    assert kolm_main([*distill, "--epochs", "1", "--train", 'target_modules=["no_such_proj"]']) == 1
    assert "no_such_proj" in capsys.readouterr().err


def test_corpus_below_threshold_says_how_many_more(kolm_settings, ticket_store, tiny_base, monkeypatch):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    result, outcomes = materialize_namespace(ensure_instance(kolm_settings), "acme.support",
                                             {"ops": {"corpus": {"config": {"min_pairs": 1000}}}})
    assert not result.success
    assert [o.status for o in outcomes][:3] == ["success", "failure", "skipped"]
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "corpus")
    assert "more needed" in failure.step_failure_data.user_failure_data.description
