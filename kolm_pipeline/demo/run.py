"""`kolm demo`: the whole loop on the embedded defaults, end to end, in a few minutes on a laptop.

A stand-in teacher (an OpenAI-compatible server on localhost that answers from the labeled ticket
dataset) takes the place of the frontier API. Traffic goes through the real capture proxy with the
official `openai` SDK, a triage rule keeps it, and the Dagster assets distill, score and deploy.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kolm_pipeline.capture.background import BackgroundServer
from kolm_pipeline.capture_server import create_app
from kolm_pipeline.corpus.recipe import load_recipe
from kolm_pipeline.demo.open_next import open_next_lines
from kolm_pipeline.demo.teacher import create_teacher_app
from kolm_pipeline.demo.tickets import Ticket, generate_tickets
from kolm_pipeline.evaluate.result import EvaluationResult
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.retention import sweep_products
from kolm_pipeline.stages.workdir import NamespaceWorkdir
from kolm_pipeline.store import CaptureStore, partition_key

DEMO_TENANT = "demo"
DEMO_NAMESPACE = "support"
TEACHER_MODEL = "teacher-frontier-stand-in"
TEACHER_LATENCY_S = 0.25


@dataclass
class DemoReport:
    """What the demo did, for the printed summary and for tests."""

    timings: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    streamed: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    artifact_cid: str | None = None
    pointer: str | None = None
    run_id: str | None = None
    success: bool = False
    failures: list[str] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)  # where the distilled pairs went: train, eval, ...
    checks: list[tuple[str, str, str]] = field(default_factory=list)  # (check, pass | warn | fail, description)
    kolm_key: str | None = None  # issued for the demo tenant on this run: printed once, in "Open next"


def _send(client, ticket: Ticket, stream: bool) -> str:
    if stream:
        chunks = client.chat.completions.create(model=TEACHER_MODEL, messages=ticket.messages(), stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    reply = client.chat.completions.create(model=TEACHER_MODEL, messages=ticket.messages())
    return reply.choices[0].message.content or ""


def send_traffic(proxy_url: str, kolm_key: str, tickets: list[Ticket], stream_every: int = 4,
                 workers: int = 8) -> int:
    """Send every ticket through the proxy with the official openai SDK; returns how many streamed."""
    import openai

    client = openai.OpenAI(
        base_url=f"{proxy_url}/v1/capture/openai",
        api_key=kolm_key,
        default_headers={
            "x-upstream-api-key": "demo-upstream-key-not-a-secret",
            "x-kolm-namespace": DEMO_NAMESPACE,
            "x-kolm-tags": "demo",
        },
        max_retries=0,
    )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = list(pool.map(lambda pair: _send(client, pair[1], pair[0] % stream_every == 0),
                                enumerate(tickets)))
    wrong = sum(1 for ticket, got in zip(tickets, answers, strict=True) if got.strip() != ticket.queue)
    if wrong:
        raise RuntimeError(f"{wrong} answers through the proxy differ from the stand-in teacher's")
    return sum(1 for index in range(len(tickets)) if index % stream_every == 0)


def reset_demo_namespace(settings: Settings, store: CaptureStore) -> None:
    """Start from a clean namespace so the first candidate is compared against the bare base."""
    workdir = NamespaceWorkdir(settings, partition_key(DEMO_TENANT, DEMO_NAMESPACE))
    shutil.rmtree(workdir.root, ignore_errors=True)
    (settings.adapters_dir / workdir.task).unlink(missing_ok=True)
    store.delete_namespace(DEMO_TENANT, DEMO_NAMESPACE)
    sweep_products(settings, store, store.clock())  # the deleted captures' text goes from the object store too
    # The registry is where a host without the pointer file reads the champion: say there too that the task is
    # back on the bare base (a recorded step, like any rollback), or the new candidate meets the last demo's.
    current = store.champions(workdir.task).get(workdir.task)
    if current is not None:
        store.add_registry_row(task=workdir.task, from_cid=current, to_cid=None, k_before=None, k_after=None,
                               decision="rollback", actor="kolm demo",
                               details={"reason": "kolm demo starts again from the bare base"})
    # No halt or last good cycle of an earlier demo carries over to this one.
    store.update_tripwire_state(workdir.task, lambda state: {} if state else None)


def run_demo(settings: Settings, tickets: int = 200, epochs: float = 2.0, log=print) -> DemoReport:
    """Run the loop once on fresh demo traffic and return what happened."""
    from kolm_pipeline.defs.launch import ensure_instance, failure_messages, materialize_namespace
    from kolm_pipeline.train.base_model import resolve_base_model

    report = DemoReport()
    began = time.perf_counter()
    log("[1/5] resolving the embedded base model (dequantized once, then cached)…")
    resolve_base_model(settings.base_model, settings.models_dir)
    report.timings["base model"] = time.perf_counter() - began

    store = CaptureStore(settings.store_url)
    reset_demo_namespace(settings, store)
    kolm_key = store.create_tenant_key(DEMO_TENANT, actor="demo")
    report.kolm_key = kolm_key
    dataset = generate_tickets(tickets)
    answers = {ticket.text: ticket.queue for ticket in dataset}

    log(f"[2/5] starting the stand-in teacher and the capture proxy; sending {len(dataset)} tickets…")
    step = time.perf_counter()
    with BackgroundServer(create_teacher_app(answers, latency_s=TEACHER_LATENCY_S)) as teacher:
        proxy_settings = _with_upstream(settings, teacher.url)
        with BackgroundServer(create_app(proxy_settings, store)) as proxy:
            report.streamed = send_traffic(proxy.url, kolm_key, dataset)
    report.requests = len(dataset)
    report.timings["capture"] = time.perf_counter() - step

    log("[3/5] keeping the captured pairs with an explicit triage rule (status ok, teacher model)…")
    store.add_rule(DEMO_TENANT, DEMO_NAMESPACE, "keep", {"status": "ok", "model": TEACHER_MODEL}, actor="demo")

    log("[4/5] materializing triaged_captures → corpus → recipe → adapter → evaluation → deployment…")
    instance = ensure_instance(settings)
    partition = partition_key(DEMO_TENANT, DEMO_NAMESPACE)
    run_config = {"ops": {"corpus": {"config": {"min_pairs": min(tickets // 2, 100)}},
                          "adapter": {"config": {"epochs": epochs}}}}
    # Stage lines and one training bar are the demo's output; Dagster's own log stays in the UI.
    result, outcomes = materialize_namespace(instance, partition, run_config, tags={"kolm/actor": "demo"},
                                             log_level="WARNING")
    report.run_id = result.run_id
    report.checks = [(check.asset_check_key.name, "pass" if check.passed else
                      "fail" if check.severity.value == "ERROR" else "warn", check.description or "")
                     for check in result.get_asset_check_evaluations()]
    for outcome in outcomes:
        report.timings[outcome.stage] = outcome.seconds
    report.failures = failure_messages(result)
    report.counters = store.counters(DEMO_TENANT, DEMO_NAMESPACE)
    workdir = NamespaceWorkdir(settings, partition)
    if workdir.evaluation.is_file():
        report.evaluation = EvaluationResult.read(workdir.evaluation).document()
    if (workdir.recipe / "spec.json").is_file():
        recipe = load_recipe(workdir.recipe)
        report.splits = {**recipe.spec["counts"],
                         "decontaminated": int(recipe.diagnostics.get("decontamination", {}).get("decontaminated", 0))}
    pointer = settings.adapters_dir / workdir.task
    if pointer.is_symlink():
        report.pointer = str(pointer.resolve())
        report.artifact_cid = pointer.resolve().name.removesuffix(".kolm")
    report.success = result.success
    log("[5/5] done.")
    report.timings["total"] = time.perf_counter() - began
    return report


def _with_upstream(settings: Settings, teacher_url: str) -> Settings:
    return settings.model_copy(update={"upstream_openai": f"{teacher_url}/v1", "upstream_anthropic": teacher_url})


def counters_lines(counters: dict[str, int], splits: dict[str, int]) -> list[str]:
    """The namespace's counters in words (README: Glossary), with where the distilled pairs went."""
    if not counters:
        return []
    lines = [f"Counters: captured {counters['captured']}, kept {counters['kept']}, discarded {counters['discarded']}, "
             f"untriaged {counters['untriaged']}; distilled {counters['distilled']} pairs; merged {counters['merged']} "
             f"(distill runs published)"]
    if splits:
        lines.append(f"  the corpus went to train {splits.get('train', 0)}, eval {splits.get('eval', 0)}, frozen "
                     f"hold-out {splits.get('holdout', 0)}; {splits.get('decontaminated', 0)} training pairs removed "
                     "for overlapping eval or hold-out inputs: only train is trained on")
    return lines


def format_report(report: DemoReport, settings: Settings) -> str:
    """The summary `kolm demo` prints: timings, counters, base vs candidate (accuracy first), the checks and the
    gate, the artifact."""
    lines = ["", "Stage timings", "-------------"]
    lines += [f"  {name:<18} {seconds:8.1f} s" for name, seconds in report.timings.items()]
    lines += ["", f"Traffic: {report.requests} requests through the proxy ({report.streamed} streamed)"]
    lines += counters_lines(report.counters, report.splits)
    evaluation = report.evaluation
    if evaluation:
        result = EvaluationResult.model_validate(evaluation)
        lines += ["", f"Base vs candidate on the same {result.eval_cases} eval cases ({result.holdout_cases} "
                      "hold-out), same run:"]
        lines += [f"  {line}" for line in result.kscore_table().splitlines()]
    if report.checks:
        lines += ["", "Checks: " + ", ".join(f"{name} {outcome}" for name, outcome, _ in report.checks)]
        lines += [f"  {name}: {text}" for name, outcome, text in report.checks if outcome != "pass"]
    if report.artifact_cid:
        lines.append(f"Deployed artifact: {report.artifact_cid}")
        lines.append(f"  pointer {settings.adapters_dir / partition_key(DEMO_TENANT, DEMO_NAMESPACE)} -> "
                     f"{report.pointer}")
    for failure in report.failures:
        lines.append(f"Stage failed: {failure}")
    lines += ["", f"Dagster run {report.run_id}: open the UI on this instance with `make ui` "
              f"(DAGSTER_HOME={settings.dagster_home})."]
    sample = generate_tickets(1, seed=99)[0].messages()
    lines += open_next_lines(settings, report.kolm_key, partition_key(DEMO_TENANT, DEMO_NAMESPACE), sample)
    return "\n".join(lines)
