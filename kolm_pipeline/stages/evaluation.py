"""The evaluation stage: candidate vs current (champion or bare base), the gate and the tripwire."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from kolm_pipeline.capture.images import image_store
from kolm_pipeline.corpus.build import corpus_cid
from kolm_pipeline.corpus.recipe import answer, load_recipe
from kolm_pipeline.evaluate.alerts import send_alert
from kolm_pipeline.evaluate.evaluation import ModelReport, case_previews, case_verdicts, evaluate_models
from kolm_pipeline.evaluate.gate import decide
from kolm_pipeline.evaluate.judge import Judge
from kolm_pipeline.evaluate.result import CasePreviews, EvaluationResult, RegressionAlert
from kolm_pipeline.evaluate.tripwire import MemoryLedger, check_collapse, read_state, record_trip
from kolm_pipeline.provenance.atomic import write_json_atomic
from kolm_pipeline.provenance.cid import cid_for_file
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.retention import case_text_rows
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.train.base_model import BaseModel

CANDIDATE = "candidate"


def run_evaluation_stage(
    workdir: NamespaceWorkdir,
    settings: Settings,
    base: BaseModel,
    champion: tuple[str, Path] | None,
    store=None,
    details: dict | None = None,
    trial: bool = False,
) -> EvaluationResult:
    """Evaluate candidate and current on the same split in one run; write and sign evaluation.json, and the
    case texts beside it (case_previews.json: never signed or shipped, removed by retention).

    A refusal is written to the registry right away (with `store`, and `details` added to the row's), so the log
    shows every decision, not only swaps. Reads the adapter and recipe its chain names by CID. A `trial` (`kolm
    compose`) compares with the task's tripwire state but records no trip and sends no alert: an operator's
    experiment that loses halts nothing and wakes nobody."""
    workdir.pull("adapter")
    recipe = load_recipe(workdir.recipe)
    # Without a store (`kolm compile`: no namespace) the tripwire compares with nothing and remembers nothing.
    ledger = workdir.tripwire_ledger(store) if store is not None else MemoryLedger()
    if trial:
        state = read_state(ledger, workdir.task)
        ledger = MemoryLedger({workdir.task: state} if state is not None else None)
    current_name = f"champion:{champion[0]}" if champion else "base"
    reports = evaluate_models(
        base,
        {CANDIDATE: workdir.adapter, current_name: champion[1] if champion else None},
        recipe,
        size_budget_bytes=settings.size_budget_bytes,
        price_table=settings.price_table,
        student_dollars_per_hour=settings.student_dollars_per_hour,
        base_answers=workdir.base_answers,
        images=image_store(settings) if base.vision else None,
        judge=Judge.from_settings(settings, workdir.judge_verdicts),
        inference_dtype=settings.inference_dtype,
    )
    candidate, current = reports[CANDIDATE], reports[current_name]
    sides = {CANDIDATE: candidate.eval, "current": current.eval}
    tripwire = check_collapse(
        candidate.holdout.outputs,
        [answer(row) for row in recipe.holdout],
        candidate.holdout.accuracy,
        read_state(ledger, workdir.task),
    )
    decision = decide(
        k_new=candidate.kscore.total,
        k_current=current.kscore.total,
        k_floor=float(recipe.spec["k_floor"]),
        tripwire_clear=tripwire.clear,
        accuracy_new=candidate.kscore.accuracy,
        accuracy_current=current.kscore.accuracy,
    )
    result = EvaluationResult.model_validate({
        "task": workdir.task,
        "decision": decision,
        "current_name": current_name,
        "adapter_cid": directory_cid(workdir.adapter),
        "recipe_cid": directory_cid(workdir.recipe),
        "current_cid": champion[0] if champion else None,
        "candidate": _report(candidate),
        "current": _report(current),
        "tripwire": tripwire,
        "eval_cases": len(recipe.eval),
        "holdout_cases": len(recipe.holdout),
        "case_verdicts": case_verdicts(recipe.eval, sides),
        "recipe_spec": recipe.spec,
        "corpus": corpus_summary(workdir, recipe.spec.get("corpus_cid")),
        "alert": None,
    })
    if decision.alert and not trial:
        delivery = send_alert(settings.alert_webhook, RegressionAlert.of(result).model_dump())
        result = result.model_copy(update={"alert": delivery})
    write_json_atomic(workdir.evaluation, result.document())
    previews = CasePreviews.model_validate({"adapter_cid": result.adapter_cid, "current_name": current_name,
                                            "cases": case_previews(recipe.eval, sides)})
    write_json_atomic(workdir.case_previews, previews.model_dump(mode="json"))
    ids, unnamed = case_text_rows(workdir.case_previews.read_bytes())
    workdir.publish("previews", capture_ids=ids, unnamed_rows=unnamed)
    receipt_cid = workdir.write_receipt(
        "evaluation",
        "evaluation.json",
        cid_for_file(workdir.evaluation),
        {"decision": asdict(decision), "candidate_k": candidate.kscore.total, "current_k": current.kscore.total,
         "current": current_name, "tripwire_clear": tripwire.clear},
    )
    result = result.model_copy(update={"receipt_cid": receipt_cid})
    if not tripwire.clear:
        record_trip(ledger, workdir.task, tripwire)
    if store is not None and not decision.swap:
        store.add_registry_row(
            task=workdir.task,
            from_cid=result.current_cid,
            to_cid=None,
            k_before=current.kscore.total,
            k_after=candidate.kscore.total,
            decision="alert" if decision.alert else "refuse",
            actor="gate",
            details={"reason": decision.reason, "adapter_cid": result.adapter_cid,
                     "tripwire": tripwire.reasons,
                     "accuracy": {"before": current.kscore.accuracy, "after": candidate.kscore.accuracy},
                     **(details or {})},
        )
    return result


def corpus_summary(workdir: NamespaceWorkdir, cid: str | None) -> dict:
    """The corpus the recipe was made from: its CID and, when the workdir still holds it, its size."""
    pairs = None
    if cid and workdir.corpus.is_file():
        data = workdir.corpus.read_bytes()
        if corpus_cid(data) == cid:
            pairs = sum(1 for line in data.splitlines() if line.strip())
    return {"cid": cid, "pairs": pairs}


def _report(report: ModelReport) -> dict:
    return {"name": report.name, **report.summary(),
            "holdout_coverage": round(report.holdout.coverage, 4)}
