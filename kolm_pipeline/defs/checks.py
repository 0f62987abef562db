"""Blocking checks on the evaluation: a failure stops `deployment` in the same run and keeps
automation from deploying it in a later one."""


import json

import dagster as dg

from kolm_pipeline.defs.assets import evaluation
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.stages.workdir import NamespaceWorkdir


def _evaluation_result(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> dict:
    partition = context.run.tags.get("dagster/partition")
    path = NamespaceWorkdir(kolm.settings, partition).evaluation
    return json.loads(path.read_text())


@dg.asset_check(asset=evaluation, blocking=True, description="K-score gate: swap only on Δ ≥ +0.01 over "
                "the current adapter, K ≥ K-floor and a clear tripwire.")
def k_gate(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> dg.AssetCheckResult:
    decision = _evaluation_result(context, kolm)["decision"]
    return dg.AssetCheckResult(
        passed=bool(decision["swap"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision["reason"],
        metadata={
            "k_new": dg.FloatMetadataValue(decision["k_new"]),
            "k_current": dg.FloatMetadataValue(decision["k_current"]),
            "delta": dg.FloatMetadataValue(round(decision["delta"], 4)),
            "k_floor": dg.FloatMetadataValue(decision["k_floor"]),
            "alert": dg.BoolMetadataValue(decision["alert"]),
        },
    )


@dg.asset_check(asset=evaluation, blocking=True, description="Collapse tripwire: answer diversity and the "
                "frozen hold-out score against the last good cycle.")
def collapse_tripwire(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> dg.AssetCheckResult:
    tripwire = _evaluation_result(context, kolm)["tripwire"]
    previous = tripwire["previous_holdout_score"]
    return dg.AssetCheckResult(
        passed=bool(tripwire["clear"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(tripwire["reasons"]) or "clear",
        metadata={
            "diversity_ratio": dg.FloatMetadataValue(round(tripwire["diversity_ratio"], 4)),
            "holdout_score": dg.FloatMetadataValue(round(tripwire["holdout_score"], 4)),
            "previous_holdout_score": dg.FloatMetadataValue(previous if previous is not None else float("nan")),
        },
    )


loop_checks = [k_gate, collapse_tripwire]
