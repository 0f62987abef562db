"""The MLflow layout without Dagster (the full loop's layout is asserted in test_assets.py): a parent run per
Dagster run whose status follows its children, links that open MLflow 3's runs view, the `make mlflow`
command, and a model version for an artifact no tracked run trained."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.registry import champion
from kolm_pipeline.settings import DEFAULT_MLFLOW_UI_URL, read_settings
from kolm_pipeline.tracking import (
    ADAPTER_CID_TAG,
    dagster_tags,
    mlflow_run,
    parent_run,
    run_ui_url,
    server_command,
    set_run_tags,
)

TASK = "acme.support"


def test_ui_url_defaults_to_make_mlflow_or_the_tracking_server(tmp_path, monkeypatch):
    monkeypatch.delenv("KOLM_MLFLOW_UI_URL", raising=False)
    monkeypatch.delenv("KOLM_MLFLOW_URI", raising=False)
    assert read_settings(tmp_path).mlflow_ui_url == DEFAULT_MLFLOW_UI_URL == "http://127.0.0.1:5000"
    monkeypatch.setenv("KOLM_MLFLOW_URI", "http://mlflow:5000/")
    assert read_settings(tmp_path).mlflow_ui_url == "http://mlflow:5000"
    monkeypatch.setenv("KOLM_MLFLOW_UI_URL", "https://mlflow.example.com/")
    assert read_settings(tmp_path).mlflow_ui_url == "https://mlflow.example.com"
    monkeypatch.setenv("KOLM_MLFLOW_UI_URL", "mlflow.example.com")
    with pytest.raises(InvalidInput, match="KOLM_MLFLOW_UI_URL"):
        read_settings(tmp_path)


def test_links_open_the_model_development_view():
    url = run_ui_url("http://127.0.0.1:5000", "3", "abc", tab="model-metrics")
    assert url == "http://127.0.0.1:5000/#/experiments/3/runs/abc/model-metrics?workflowType=machine_learning"


def test_make_mlflow_serves_the_tracking_store_where_the_links_point(tmp_path):
    command = server_command(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", "http://127.0.0.1:5077")
    assert command[1:5] == ["server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                            "--default-artifact-root"]
    assert command[command.index("--port") + 1] == "5077" and command[command.index("--host") + 1] == "127.0.0.1"
    assert server_command("http://mlflow:5000", tmp_path, "http://localhost:5000") is None  # already a server


def test_steps_of_one_dagster_run_share_a_parent_that_fails_with_them(tmp_path):
    uri, root = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    tags = dagster_tags("0123456789abcdef", TASK, TASK)
    experiment, parent = parent_run(uri, TASK, root, tags)
    assert parent_run(uri, TASK, root, tags) == (experiment, parent)  # found again, not made twice
    with mlflow_run(uri, TASK, root, "training", tags, parent_run_id=parent) as run:
        mlflow.log_metric("train.loss", 1.0, step=1)
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(RuntimeError), mlflow_run(uri, TASK, root, "evaluation", tags, parent_run_id=parent):
        raise RuntimeError("step failed")
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    # A version is made from the training run of the artifact's adapter; without one, from a run of its own.
    set_run_tags(uri, run.info.run_id, {ADAPTER_CID_TAG: "bafkreiadapter"})
    manifest = {"adapter_cid": "bafkreiadapter", "evals": {"candidate": {"k": 0.8, "accuracy": 0.9}}}
    artifact = tmp_path / "bafkreione.kolm"
    artifact.write_bytes(b"kolm")
    trained = champion.register_artifact(uri, root, TASK, artifact, "bafkreione", {}, manifest=manifest)
    other = tmp_path / "bafkreitwo.kolm"
    other.write_bytes(b"kolm")
    compiled = champion.register_artifact(uri, root, TASK, other, "bafkreitwo", {"actor": "cli"},
                                          manifest={"adapter_cid": "bafkreielsewhere"})
    first = client.get_model_version(trained.name, trained.version)
    assert first.run_id == run.info.run_id and first.tags["k_score"] == "0.8000"
    second = client.get_model_version(compiled.name, compiled.version)
    assert client.get_run(second.run_id).data.tags["kolm.stage"] == "artifact"
    assert "k_score" not in second.tags and "read-only mirror" in second.description
    assert champion.model_version_of(uri, TASK, "bafkreitwo") == compiled
