"""Asset checks, each scoped to its `kolm_namespace` partition (results show per namespace, never mixed).

- Data health on `corpus` and `recipe` (the measurements are `corpus/health.py`'s): a warning shows and the
  run goes on; a failure of a blocking check stops the run before it trains on bad data.
- The gate on `evaluation`: `k_gate` and `collapse_tripwire`, blocking. A failure stops `deployment` in the
  same run and keeps automation from deploying it in a later one.
"""

import json
import warnings
from collections.abc import Callable, Iterator

import dagster as dg

from kolm_pipeline.corpus.build import read_corpus
from kolm_pipeline.corpus.health import HealthCheck, corpus_health, recipe_health
from kolm_pipeline.corpus.recipe import load_recipe
from kolm_pipeline.defs.assets import corpus, evaluation, recipe
from kolm_pipeline.defs.partitions import namespace_partitions
from kolm_pipeline.defs.resources import KolmResource
from kolm_pipeline.stages.workdir import NamespaceWorkdir, ProductMissing

_SEVERITY = {"pass": dg.AssetCheckSeverity.WARN, "warn": dg.AssetCheckSeverity.WARN,
             "fail": dg.AssetCheckSeverity.ERROR}


def _partitioned(make: Callable[[], object]):
    """Dagster 1.13 marks a check's own `partitions_def` as a preview (it warns once per definition); it is
    what scopes each result to its namespace, so the notice is silenced here, where we choose it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
        return make()


def _spec(name: str, asset: dg.AssetsDefinition, blocking: bool, description: str) -> dg.AssetCheckSpec:
    return _partitioned(lambda: dg.AssetCheckSpec(name, asset=asset, blocking=blocking, description=description,
                                                  partitions_def=namespace_partitions))


def _workdir(context: dg.AssetCheckExecutionContext, kolm: KolmResource, stage: str) -> NamespaceWorkdir:
    """The namespace's work directory, holding the newest `stage` product (a check may run on another host)."""
    workdir = NamespaceWorkdir(kolm.settings, context.partition_key, store=kolm.store)
    try:
        workdir.pull_latest(stage)
    except ProductMissing as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    if not workdir.product_path(stage)[0].exists():
        raise dg.Failure(description=f"{workdir.task}: no {stage} to check (none was made, or retention removed "
                                     "it with its captures); materialize it again", allow_retries=False)
    return workdir


def _result(check: HealthCheck, asset: dg.AssetsDefinition) -> dg.AssetCheckResult:
    metadata: dict = {name: dg.JsonMetadataValue(value) if isinstance(value, list | dict) else value
                      for name, value in check.metadata.items()}
    if check.table:
        columns = [dg.TableColumn(name, "string" if name == "label" else "float" if name.endswith("share")
                                  else "int") for name in check.table[0]]
        metadata["by_label"] = dg.TableMetadataValue(records=[dg.TableRecord(row) for row in check.table],
                                                     schema=dg.TableSchema(columns=columns))
    metadata["outcome"] = check.outcome
    return dg.AssetCheckResult(check_name=check.name, asset_key=asset.key, passed=check.passed,
                               severity=_SEVERITY[check.outcome], description=check.description, metadata=metadata)


@dg.multi_asset_check(
    specs=[_spec("corpus_enough_pairs", corpus, True, "Enough usable pairs for an eval split the gate can trust "
                 "(fails when no recipe can be made; warns below 30 expected eval cases)."),
           _spec("corpus_no_pii_in_answers", corpus, True, "No redaction placeholder such as <EMAIL> in the answers "
                 "the student trains on (warns on any; fails above 10% of answers).")],
    name="corpus_health",
)
def corpus_health_checks(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> Iterator[dg.AssetCheckResult]:
    workdir = _workdir(context, kolm, "corpus")
    rows = read_corpus(workdir.corpus.read_bytes(), source=str(workdir.corpus))
    for check in corpus_health(rows):
        yield _result(check, corpus)


@dg.multi_asset_check(
    specs=[_spec("recipe_label_balance", recipe, False, "Closed vocabularies: no label dominating training, none "
                 "too rare, none the eval asks for that training never shows (warns)."),
           _spec("recipe_decontamination", recipe, True, "Share of training pairs removed for overlapping eval, "
                 "hold-out or eval-candidate inputs (warns above 40%, fails above 75%).")],
    name="recipe_health",
)
def recipe_health_checks(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> Iterator[dg.AssetCheckResult]:
    for check in recipe_health(load_recipe(_workdir(context, kolm, "recipe").recipe)):
        yield _result(check, recipe)


def _evaluation_result(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> dict:
    return json.loads(_workdir(context, kolm, "evaluation").evaluation.read_text())


def _accuracy(decision: dict) -> dict:
    new, current = decision.get("accuracy_new"), decision.get("accuracy_current")
    if new is None or current is None:
        return {}
    return {"accuracy_new": dg.FloatMetadataValue(new), "accuracy_current": dg.FloatMetadataValue(current),
            "accuracy_delta": dg.FloatMetadataValue(round(new - current, 4))}


def _k_gate(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> dg.AssetCheckResult:
    decision = _evaluation_result(context, kolm)["decision"]
    return dg.AssetCheckResult(
        passed=bool(decision["swap"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision["reason"],
        metadata={
            **_accuracy(decision),
            "k_new": dg.FloatMetadataValue(decision["k_new"]),
            "k_current": dg.FloatMetadataValue(decision["k_current"]),
            "delta": dg.FloatMetadataValue(round(decision["delta"], 4)),
            "k_floor": dg.FloatMetadataValue(decision["k_floor"]),
            "alert": dg.BoolMetadataValue(decision["alert"]),
        },
    )


def _collapse_tripwire(context: dg.AssetCheckExecutionContext, kolm: KolmResource) -> dg.AssetCheckResult:
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


k_gate = _partitioned(lambda: dg.asset_check(
    asset=evaluation, blocking=True, partitions_def=namespace_partitions, name="k_gate",
    description="K-score gate: swap only on Δ ≥ +0.01 over the current adapter, K ≥ K-floor and a clear tripwire.",
)(_k_gate))
collapse_tripwire = _partitioned(lambda: dg.asset_check(
    asset=evaluation, blocking=True, partitions_def=namespace_partitions, name="collapse_tripwire",
    description="Collapse tripwire: answer diversity and the frozen hold-out score against the last good cycle.",
)(_collapse_tripwire))

loop_checks = [corpus_health_checks, recipe_health_checks, k_gate, collapse_tripwire]
