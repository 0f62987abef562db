"""The whole loop on the real embedded base (SmolLM2-135M-Instruct): traffic through the capture proxy
with the openai SDK, a triage rule, real LoRA training, the gate, the signed swap. Then a second cycle
against the new champion, which the gate must refuse without touching the pointer."""

from __future__ import annotations

import json

import pytest

from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.demo.run import DEMO_NAMESPACE, DEMO_TENANT, run_demo
from kolm_pipeline.provenance.keys import load_public_keys
from kolm_pipeline.registry.artifact import read_kolm, verify_kolm
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.store import CaptureStore

pytestmark = pytest.mark.slow
TASK = f"{DEMO_TENANT}.{DEMO_NAMESPACE}"


def test_loop_on_embedded_base_swaps_then_refuses(kolm_settings):
    report = run_demo(kolm_settings, tickets=200, epochs=2, log=lambda *_: None)
    assert report.success, report.failures
    evaluation = report.evaluation
    assert evaluation["current_name"] == "base"
    assert evaluation["decision"]["swap"] is True
    # Real learning on the frozen hold-out, with `kolm demo`'s defaults (their figures: docs/benchmarks.md, session 16).
    assert evaluation["current"]["holdout_accuracy"] < 0.5
    assert evaluation["candidate"]["holdout_accuracy"] >= 0.85

    pointer = read_pointer(kolm_settings.adapters_dir, TASK)
    assert pointer is not None and pointer.name == f"{report.artifact_cid}.kolm"
    assert verify_kolm(pointer, load_public_keys(kolm_settings.keys_dir)).ok
    manifest = read_kolm(pointer).manifest
    assert manifest["task"] == TASK and manifest["parent_cid"] is None
    assert manifest["corpus_cid"].startswith("bafkrei")
    store = CaptureStore(kolm_settings.store_url)
    rows = store.registry_rows(TASK)
    assert [(r.decision, r.from_cid, r.to_cid) for r in rows] == [("swap", None, report.artifact_cid)]

    # Second cycle on the same data: the candidate now faces the champion and cannot beat it by +0.01.
    run_config = {"ops": {"corpus": {"config": {"min_pairs": 50}}, "adapter": {"config": {"epochs": 0.5}}}}
    result, outcomes = materialize_namespace(ensure_instance(kolm_settings), TASK, run_config)
    assert not result.success
    statuses = {o.stage: o.status for o in outcomes}
    assert statuses["evaluation"] == "success" and statuses["deployment"] == "skipped"
    checks = {c.asset_check_key.name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["k_gate"] is False
    second = json.loads((kolm_settings.work_dir / TASK / "evaluation.json").read_text())
    assert second["current_name"] == f"champion:{report.artifact_cid}"
    assert read_pointer(kolm_settings.adapters_dir, TASK) == pointer
    newest = store.registry_rows(TASK)[0]
    assert newest.decision in ("refuse", "alert") and newest.to_cid is None
