"""The `kolm` command. Every verb calls the same domain functions the Dagster assets call."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kolm_pipeline.cli_verbs.common import (
    CliError,
    Parser,
    default_actor,
    namespace_of,
    open_store,
    open_store_for_reading,
    print_json,
    settings_for_reading,
    settings_for_writing,
)
from kolm_pipeline.cli_verbs.data import add_capture_parsers, cmd_triage_correct
from kolm_pipeline.cli_verbs.keys import add_tenant_parsers
from kolm_pipeline.demo.open_next import CAPTURE_PORT, SERVE_PORT
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.settings import Settings

__all__ = ["CliError", "build_parser", "main"]


def _settings(args: argparse.Namespace) -> Settings:
    return settings_for_writing(args)


def _store(settings: Settings):
    return open_store(settings)


def _progress_bar(description: str, total: int):
    """A progress bar on stderr, shown only on a terminal (so logs and pipes stay clean)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="line", disable=None, file=sys.stderr, leave=False)


def _tag_list(text: str | None) -> list[str]:
    return [tag.strip() for tag in (text or "").split(",") if tag.strip()]


_namespace = namespace_of


def cmd_capture_serve(args: argparse.Namespace) -> int:
    from kolm_pipeline.capture.background import serve
    from kolm_pipeline.capture_server import create_app

    settings = _settings(args)
    print(f"kolm capture proxy on http://{args.host}:{args.port} → OpenAI {settings.upstream_openai}, "
          f"Anthropic {settings.upstream_anthropic}; inbox at http://{args.host}:{args.port}/inbox "
          "(a full kolm key: `kolm tenant key NAME`)")
    serve(create_app(settings, _store(settings)), args.host, args.port)
    return 0


def cmd_capture_import(args: argparse.Namespace) -> int:
    """Import a JSONL file of pairs into a namespace, all or nothing."""
    from kolm_pipeline.capture.importer import import_file

    tenant, namespace = _namespace(args)
    settings = _settings(args)
    store = _store(settings)
    summary = import_file(store, Path(args.file), tenant, namespace, args.source, tags=_tag_list(args.tags),
                          model=args.model, actor=f"cli:{args.actor}", progress=_progress_bar)
    weight = settings.source_weights[args.source]
    print(f"{args.file} → {tenant}.{namespace} (source {args.source}, weight {weight:g}): {summary.line()}")
    return 0


def cmd_triage(args: argparse.Namespace) -> int:
    from kolm_pipeline.store import EVAL_CANDIDATE_TAG

    if args.action == "correct":
        if args.tag or args.untag or args.eval_candidate:
            raise CliError("triage correct takes only --output (and --actor); tag with triage tag")
        return cmd_triage_correct(args)
    if args.output is not None:
        raise CliError("--output is for triage correct (a rule matches outputs with --output-regex)")
    tenant, namespace = _namespace(args)
    store = _store(_settings(args))
    tags = list(args.tag or [])
    if args.action == "rule":
        if len(tags) > 1 or args.untag or args.eval_candidate:
            raise CliError("a rule matches at most one --tag; --untag and --eval-candidate are for keep/discard/tag")
        match = {key: value for key, value in (("status", args.status), ("model", args.model),
                                               ("tag", tags[0] if tags else None),
                                               ("output_regex", args.output_regex)) if value}
        action = "discard" if args.discard else "keep"
        rule_id = store.add_rule(tenant, namespace, action, match, actor=args.actor)
        applied = store.apply_rules(tenant, namespace)
        print(f"rule {rule_id}: {action} where {match or 'status=ok'}; applied now: {applied}")
        return 0
    add = tags + ([EVAL_CANDIDATE_TAG] if args.eval_candidate else [])
    remove = list(args.untag or [])
    if args.action == "tag" and not add and not remove:
        raise CliError("triage tag needs --tag TAG, --untag TAG or --eval-candidate")
    # Only ids of the namespace named: an id of the tenant's other namespaces is skipped, not changed.
    owned = sorted(store.owned_ids(tenant, args.ids, namespace=namespace))
    missing = sorted(set(args.ids) - set(owned))
    if missing:
        print(f"no capture(s) {missing[:20]} in {tenant}.{namespace}; skipped", file=sys.stderr)
    if args.action == "tag":
        changed = store.retag(tenant, owned, add, remove, actor=args.actor)
        print(f"tags of {changed} of {len(args.ids)} captures changed ({_tag_change(add, remove)})")
        return 0
    state = "kept" if args.action == "keep" else "discarded"
    changed = store.set_triage(tenant, owned, state, actor=args.actor, add_tags=add, remove_tags=remove)
    tagged = f"; tags {_tag_change(add, remove)} on {len(owned)}" if add or remove else ""
    print(f"{changed} of {len(args.ids)} captures marked {state}{tagged}")
    return 0


def _tag_change(add: list[str], remove: list[str]) -> str:
    return " ".join([*(f"+{tag}" for tag in add), *(f"-{tag}" for tag in remove)])


def training_overrides(pairs: list[str] | None, epochs: float | None = None) -> dict:
    """The adapter's settings from `--train NAME=VALUE` (VALUE read as JSON — a number, true, null, a list — or
    else as text) and `--epochs`, checked against TrainConfig before anything runs (InvalidInput)."""
    from kolm_pipeline.corpus.train_config import TrainConfig

    values: dict = {}
    for pair in pairs or []:
        name, equals, raw = pair.partition("=")
        if not equals or not name.strip():
            raise CliError(f"--train {pair!r}: expected NAME=VALUE, e.g. --train learning_rate=1e-3")
        try:
            values[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[name.strip()] = raw
    if epochs is not None:
        values["epochs"] = epochs
    TrainConfig.parse(values)  # InvalidInput names every bad setting; main prints it as one error
    return values


def cmd_distill(args: argparse.Namespace) -> int:
    from kolm_pipeline.defs.launch import ensure_instance, failure_messages, materialize_namespace

    tenant, namespace = _namespace(args)
    training = training_overrides(args.train, args.epochs)
    settings = _settings(args)
    instance = ensure_instance(settings)
    run_config: dict = {"ops": {}}
    if args.min_pairs is not None:
        run_config["ops"]["corpus"] = {"config": {"min_pairs": args.min_pairs}}
    if training:
        run_config["ops"]["adapter"] = {"config": training}
    result, outcomes = materialize_namespace(instance, f"{tenant}.{namespace}", run_config,
                                             tags={"kolm/actor": "cli"})
    for outcome in outcomes:
        print(f"  {outcome.stage:<18} {outcome.status:<10} {outcome.seconds:7.1f} s")
    for message in failure_messages(result):
        print(f"  failed: {message}", file=sys.stderr)
    print(f"Dagster run {result.run_id} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    return 0 if result.success else 1


def cmd_compile(args: argparse.Namespace) -> int:
    from kolm_pipeline.corpus.recipe import dry_run
    from kolm_pipeline.stages.compile import compile_recipe

    recipe_dir = Path(args.recipe)
    problems = dry_run(recipe_dir)
    if problems:
        raise CliError("recipe is not ready:\n  " + "\n  ".join(problems))
    if args.dry_run:
        print(f"{recipe_dir}: valid, ready to compile")
        return 0
    if not args.output:
        raise CliError("--output F.kolm is required unless --dry-run")
    settings = _settings(args)
    result = compile_recipe(settings, recipe_dir, Path(args.output), tenant=args.tenant, epochs=args.epochs)
    print(result.table)
    print(f"wrote {args.output} ({result.cid})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kolm_pipeline.stages.suite import evaluate_artifact

    settings = _settings(args)
    print(evaluate_artifact(settings, Path(args.artifact), Path(args.suite)))
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    from kolm_pipeline.registry.manage import swap_artifact, swap_to_cid

    if bool(args.artifact) == bool(args.cid):
        raise CliError("give either --artifact F.kolm, or --task T with --cid CID of an artifact published before")
    if args.cid and not args.task:
        raise CliError("--cid needs --task")
    settings = _settings(args)
    store = _store(settings)
    if args.cid:
        activation = swap_to_cid(settings, store, args.task, args.cid, strategy=args.strategy, actor=args.actor)
    else:
        activation = swap_artifact(settings, store, Path(args.artifact), strategy=args.strategy, actor=args.actor,
                                   task=args.task)
    print(activation.describe("swapped"))
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from kolm_pipeline.registry.composition import PartRef
    from kolm_pipeline.stages.compose import compose

    refs = [PartRef.parse(text) for text in args.adapter]
    settings = _settings(args)
    print(f"composing {len(refs)} adapters for {args.task}, then evaluating the composition against what "
          f"{args.task} serves now…", flush=True)
    result = compose(settings, _store(settings), args.task, refs, actor=args.actor)
    print(result.evaluation.kscore_table())
    if result.activation is None:
        raise CliError(f"{args.task}: the gate refused the composition, nothing changed: "
                       f"{result.evaluation.decision.reason}")
    print(result.activation.describe("composed"))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from kolm_pipeline.registry.manage import rollback

    settings = _settings(args)
    print(rollback(settings, _store(settings), args.task, actor=args.actor).describe("rolled back"))
    return 0


def cmd_registry_log(args: argparse.Namespace) -> int:
    from kolm_pipeline.registry.manage import describe_cid, describe_cid_text, log_lines

    settings = settings_for_reading(args)
    store = open_store_for_reading(settings)
    if args.cid:
        description = describe_cid(settings, store, args.cid, task=args.task)
        print(json.dumps(description, indent=2) if args.json else describe_cid_text(description))
        return 0
    rows = store.registry_rows(args.task)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], default=str, indent=2))
        return 0
    if args.task and not rows:
        raise CliError(f"the registry has no rows for task {args.task!r}")
    print("\n".join(log_lines(rows)))
    return 0


def cmd_registry_diff(args: argparse.Namespace) -> int:
    from kolm_pipeline.stages.diff import diff_text, registry_diff

    settings = settings_for_reading(args)
    refs = [ref for ref in (args.from_version, args.to_version) if ref]
    diff = registry_diff(settings, open_store_for_reading(settings), args.task, refs)
    print(json.dumps(diff.as_dict(args.limit), indent=2) if args.json else diff_text(diff, args.limit))
    return 0


def _artifact_by_ref(args: argparse.Namespace) -> Path:
    """`kolm verify current --task T` (or `previous`, a CID, a unique CID prefix): the published artifact."""
    from kolm_pipeline.registry.manage import artifact_path_of
    from kolm_pipeline.registry.refs import MIN_PREFIX, NAMES

    ref = args.artifact
    if "/" in ref or ref.endswith(".kolm") or (ref not in NAMES and len(ref) < MIN_PREFIX):
        raise CliError(f"{ref}: no such file")
    settings = settings_for_reading(args)
    try:
        return artifact_path_of(settings, open_store_for_reading(settings), ref, args.task)[0]
    except UserError as exc:
        raise CliError(f"{ref}: no such file, nor a published artifact ({exc})") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from kolm_pipeline.provenance.keys import load_public_keys
    from kolm_pipeline.registry.artifact import read_kolm, verify_kolm
    from kolm_pipeline.registry.deployment import sibling_receipt, verify_deployment
    from kolm_pipeline.registry.provenance import provenance, summary_lines

    path = Path(args.artifact)
    if not path.is_file():
        path = _artifact_by_ref(args)
    keys = load_public_keys(Path(args.keys) if args.keys else settings_for_reading(args).keys_dir)
    report = verify_kolm(path, keys)
    problems, links = list(report.problems), report.chain.links if report.chain else []
    deployment = sibling_receipt(path) if report.ok else None
    if deployment is not None:
        chain, found = verify_deployment(read_kolm(path), report.cid, deployment, keys)
        problems += [f"deployment receipt: {problem}" for problem in found]
        links = chain.links
    if problems:
        if args.json:
            print_json({"ok": False, "artifact": str(path), "cid": report.cid, "problems": problems})
        print(f"FAILED {path}", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    info = provenance(read_kolm(path), report.cid)
    if args.json:
        print_json({"ok": True, "artifact": str(path), "cid": report.cid, "receipts": links, "provenance": info})
        return 0
    print(f"OK {report.cid}\n  receipts: {' → '.join(links)}\n  task:  {info['task']} (tenant {info['tenant']})")
    print("\n".join(f"  {line}" for line in summary_lines(info)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from kolm_pipeline.capture.background import server_options
    from kolm_pipeline.serve.app import create_serving_app
    from kolm_pipeline.serve.backends import BackendError, TransformersBackend, VLLMBackend
    from kolm_pipeline.serve.runtime import ServingRuntime

    settings = _settings(args)
    if args.backend == "vllm":
        if not args.vllm_url:
            raise CliError("--backend vllm needs --vllm-url (the vLLM server, e.g. http://vllm:8000)")
        backend = VLLMBackend(args.vllm_url, settings.home / "serve-cache", adapter_root=args.vllm_adapter_root,
                              accepts_images=args.vllm_images)
    else:
        if args.threads is not None and args.threads < 1:
            raise CliError("--threads must be at least 1")
        for flag, value in (("--max-batch", args.max_batch), ("--max-gen-batch", args.max_gen_batch)):
            if value is not None and value < 1:
                raise CliError(f"{flag} must be at least 1")
        from kolm_pipeline.train.base_model import resolve_base_model

        if resolve_base_model(settings.base_model, settings.models_dir).vision:
            from kolm_pipeline.serve.vision import VisionBackend

            if args.threads is not None:  # the vision backend runs on request threads: the process-wide count
                import torch

                torch.set_num_threads(args.threads)
            backend = VisionBackend(settings.base_model, settings.models_dir)  # requests may carry images
        else:
            backend = TransformersBackend(settings.base_model, settings.models_dir, max_batch=args.max_batch,
                                          max_gen_batch=args.max_gen_batch, dtype=settings.inference_dtype,
                                          threads=args.threads)
    from kolm_pipeline.serve.monitor import MonitorConfig

    monitor = MonitorConfig(enabled=not args.no_live_monitor, sample_share=args.monitor_sample_share,
                            tolerance=args.monitor_tolerance, min_requests=args.monitor_min_requests,
                            window=args.monitor_window)
    registry = None
    if args.follow == "registry":
        from kolm_pipeline.store import CaptureStore

        registry = CaptureStore(settings.store_url)
    runtime = ServingRuntime(settings, backend, poll_interval=args.poll_interval,
                             grace_seconds=args.grace_seconds, monitor=monitor, registry=registry)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        runtime.start()  # base model (or vLLM) and every task's adapter, before accepting requests
    except BackendError as exc:
        raise CliError(str(exc)) from None
    status = runtime.status()
    for task, refusal in status["refused"].items():
        print(f"refused {task}: {refusal['reason']}", file=sys.stderr)
    threads = f", decoding on {backend.threads} torch thread{'s' if backend.threads != 1 else ''}" \
        if getattr(backend, "threads", 0) else ""
    print(f"kolm serving runtime ({args.backend}, {backend.placement}{threads}) on http://{args.host}:{args.port}: "
          f"{', '.join(status['tasks']) or 'no tasks yet'} "
          f"({_following(settings) if registry else f'pointers in {settings.adapters_dir}'})", flush=True)
    # Not `serve`: its gc.freeze would keep the adapters loaded so far from ever being collected once swapped out.
    uvicorn.run(create_serving_app(runtime), host=args.host, port=args.port, **server_options(args.log_level))
    return 0


def _following(settings) -> str:
    """Which registry `kolm serve --follow registry` follows, password hidden: a replica left on the embedded SQLite
    file (KOLM_STORE_URL unset) follows nobody's deployments, and this line shows it."""
    from sqlalchemy.engine import make_url

    return (f"following the registry in {make_url(settings.store_url).render_as_string(hide_password=True)}, "
            f"artifacts from {settings.artifacts_url or settings.artifacts_dir}")


def cmd_tripwire_clear(args: argparse.Namespace) -> int:
    from kolm_pipeline.evaluate.tripwire import clear_halt
    from kolm_pipeline.stages.workdir import NamespaceWorkdir

    tenant, namespace = _namespace(args)
    settings = _settings(args)
    workdir = NamespaceWorkdir(settings, f"{tenant}.{namespace}")
    previous = clear_halt(workdir.tripwire_ledger(_store(settings)), workdir.task)
    if previous is None:
        print(f"{workdir.partition} is not halted")
        return 0
    _store(settings).audit(tenant, namespace, "tripwire.clear", {"reasons": previous.get("halt_reasons", [])},
                           args.actor)
    print(f"{workdir.partition}: halt cleared ({'; '.join(previous.get('halt_reasons', []))})")
    return 0


def cmd_retention_sweep(args: argparse.Namespace) -> int:
    from kolm_pipeline.stages.retention import sweep_retention

    settings = _settings(args)
    swept = sweep_retention(settings, _store(settings))
    for partition, count in sorted(swept.expired.items()):
        print(f"{partition}: {count} captures expired")
    for partition, files in sorted(swept.work_files.items()):
        print(f"{partition}: work files removed or rewritten: {', '.join(files)}")
    if swept.quarantined:
        print(f"quarantine: {swept.quarantined} refused records past the shortest window removed")
    if not swept.expired and not swept.work_files and not swept.quarantined:
        print("nothing past its retention window")
    if not swept.scrubbed:
        print("the store's file is busy (another connection in a transaction): the old text stays in its free "
              "space until the next sweep rewrites it", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kolm_pipeline.demo.run import format_report, run_demo

    settings = _settings(args)
    report = run_demo(settings, tickets=args.tickets, epochs=args.epochs)
    print(format_report(report, settings))
    return 0 if report.success else 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kolm",
        description="kolm pipeline: capture frontier-API traffic, distill it into a LoRA adapter, "
        "score it with the K-score and hot-swap it only when it wins.",
    )
    parser.add_argument("--home", help="state directory (default: $KOLM_HOME or ./.kolm); verbs that only read "
                        "refuse where it does not exist, and create nothing")
    parser.add_argument("--base", help="base model: Hugging Face id or local path (default: $KOLM_BASE_MODEL "
                        "or the embedded SmolLM2-135M-Instruct)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(sub, name: str, handler: Callable[[argparse.Namespace], int], help_text: str):
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    capture = verbs.add_parser("capture", help="run the capture proxy or inspect what it captured")
    capture_verbs = capture.add_subparsers(dest="capture_verb", required=True, metavar="ACTION")
    serve = verb(capture_verbs, "serve", cmd_capture_serve, "run the capture proxy (HTTP) and the inbox at /inbox")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=CAPTURE_PORT, help="port to listen on")
    add_capture_parsers(capture_verbs, default_actor())
    import_ = capture_verbs.add_parser(
        "import",
        help="bring existing pairs (chat or prompt/completion JSONL) into a namespace as if captured",
        description="Bring existing pairs into a namespace as if the proxy had captured them. Each line of FILE "
        'is {"messages": [..., {"role": "assistant", "content": ANSWER}]} or {"prompt": P, "completion": C}, '
        'optionally with "model" and "tags". Every line is checked first: bad lines are listed as FILE:LINE and '
        "nothing is imported. Pairs are redacted as the proxy redacts, written in one transaction, tagged "
        "source:SOURCE and triaged: human pairs are kept (a person approved them), ai and import pairs go "
        "through the namespace's triage rules. Importing the same pairs again skips them.",
        epilog="Training weight by source: KOLM_SOURCE_WEIGHTS (default human=1.0,ai=0.5,import=1.0,capture=1.0). "
        "Pairs tagged eval-candidate are held out for evaluation, never trained on.",
    )
    import_.set_defaults(handler=cmd_capture_import)
    import_.add_argument("file", metavar="FILE.jsonl", help="the pairs, one JSON object per line")
    import_.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    import_.add_argument("--tenant")
    import_.add_argument("--source", required=True, choices=["human", "ai", "import"],
                         help="who wrote the answers: human (people; kept at once), ai (an AI peer; weighs less) "
                              "or import (other existing pairs)")
    import_.add_argument("--tags", help="comma-separated tags for every pair, e.g. eval-candidate")
    import_.add_argument("--model", default="imported",
                         help="model name for lines that give none (triage rules can match it)")
    import_.add_argument("--actor", default=default_actor(), help="who, for the audit log")

    tenant = verbs.add_parser("tenant", help="manage tenants and their kolm keys")
    tenant_verbs = tenant.add_subparsers(dest="tenant_verb", required=True, metavar="ACTION")
    add_tenant_parsers(tenant_verbs)

    triage = verb(verbs, "triage", cmd_triage, "keep, discard, tag or correct captures, or add a triage rule")
    triage.add_argument("action", choices=["keep", "discard", "tag", "rule", "correct"],
                        help="keep/discard: set the state of the ids (and their tags); tag: only change tags; "
                             "rule: add a rule and apply it to untriaged captures; correct: record a person's "
                             "corrected answer for one id (--output)")
    triage.add_argument("ids", nargs="*", type=int, help="capture ids (keep/discard/tag; one for correct)")
    triage.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    triage.add_argument("--tenant")
    triage.add_argument("--keep", action="store_true", help="rule: keep matching captures (default)")
    triage.add_argument("--discard", action="store_true", help="rule: discard matching captures")
    triage.add_argument("--status", default="ok", help="rule: capture status to match")
    triage.add_argument("--model", help="rule: upstream model to match")
    triage.add_argument("--tag", action="append",
                        help="rule: tag to match; keep/discard/tag: tag to add (repeatable)")
    triage.add_argument("--untag", action="append", help="keep/discard/tag: tag to remove (repeatable)")
    triage.add_argument("--eval-candidate", action="store_true",
                        help="keep/discard/tag: add the eval-candidate tag (held out for evaluation, never trained on)")
    triage.add_argument("--output-regex",
                        help="rule: regular expression (RE2 syntax: linear time, so no backreferences or "
                             "lookaround) the output must contain a match of")
    triage.add_argument("--output", metavar="TEXT",
                        help="correct: the corrected answer (- reads it from stdin); redacted as the namespace's "
                             "captures are, and it replaces the teacher's answer when the capture trains")
    triage.add_argument("--actor", default=default_actor(), help="who, for the audit log")

    distill = verb(verbs, "distill", cmd_distill, "materialize the loop for a namespace in the Dagster instance")
    distill.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    distill.add_argument("--tenant")
    distill.add_argument("--min-pairs", type=int, help="override the distill threshold for this run")
    distill.add_argument("--epochs", type=float, help="training epochs (default 2)")
    distill.add_argument("--train", action="append", metavar="NAME=VALUE",
                         help="a training setting for this run, repeatable: --train learning_rate=1e-3 --train rank=32 "
                         "--train label_loss=true (names and defaults: the adapter's config in the Dagster UI, or "
                         "README: Configuration)")

    compile_ = verb(verbs, "compile", cmd_compile, "train a recipe directory into a signed .kolm artifact")
    compile_.add_argument("--recipe", required=True, help="recipe directory (spec.json, train/eval/holdout.jsonl)")
    compile_.add_argument("--output", help="where to write the .kolm")
    compile_.add_argument("--tenant", default="local", help="tenant whose key signs the artifact")
    compile_.add_argument("--epochs", type=float, help="training epochs (default: the recipe's)")
    compile_.add_argument("--dry-run", action="store_true", help="validate the recipe without training")

    eval_ = verb(verbs, "eval", cmd_eval, "print the K-score table of an artifact on an eval suite")
    eval_.add_argument("--artifact", required=True)
    eval_.add_argument("--suite", required=True, help="recipe directory whose eval.jsonl is the suite")

    swap = verb(verbs, "swap", cmd_swap, "make an artifact the serving adapter of its task (verified first)")
    swap.add_argument("--artifact", help="a .kolm file")
    swap.add_argument("--task", help="the task; with --cid, or to check the artifact's manifest names it")
    swap.add_argument("--cid", help="swap to this previously published artifact of --task: a CID, a unique CID "
                      "prefix (6+ characters) or `previous` (what served before the current one)")
    swap.add_argument("--strategy", choices=["higher-k-wins", "force"], default="higher-k-wins",
                      help="higher-k-wins: only if its recorded K beats the serving one by the gate margin")
    swap.add_argument("--actor", default=default_actor(), help="who, for the audit log")

    compose_ = verb(verbs, "compose", cmd_compose,
                    "serve a task with several adapters of its base at once (e.g. a house style plus the task's own): "
                    "combined exactly into one adapter, evaluated and gated against what the task serves now, "
                    "swapped in only if it wins")
    compose_.add_argument("--task", required=True, help="the task to serve the composition as, TENANT.NAMESPACE")
    compose_.add_argument("--adapter", action="append", required=True, metavar="CID[:WEIGHT]",
                          help="a published artifact of the tenant (CID or unique prefix) and its weight (default 1); "
                          "give it two or more times, in order")
    compose_.add_argument("--actor", default=default_actor(), help="who, for the audit log")

    rollback = verb(verbs, "rollback", cmd_rollback, "restore the previous adapter of a task in one step")
    rollback.add_argument("--task", required=True, help="the task, TENANT.NAMESPACE")
    rollback.add_argument("--actor", default=default_actor(), help="who, for the audit log")

    registry = verbs.add_parser("registry", help="the registry of swaps and gate decisions")
    registry_verbs = registry.add_subparsers(dest="registry_verb", required=True, metavar="ACTION")
    log = verb(registry_verbs, "log", cmd_registry_log,
               "print the registry rows, newest first, with what data, code and score each deployment had")
    log.add_argument("--task", help="only this task's rows")
    log.add_argument("--cid", help="everything the registry knows about one artifact: a CID, a unique CID prefix "
                     "(6+ characters), or `current` / `previous` with --task")
    log.add_argument("--json", action="store_true", help="print the rows as JSON")
    diff = verb(registry_verbs, "diff", cmd_registry_diff,
                "what changed between two versions of a task: corpus, recipe, K-score parts, and the eval cases "
                "whose verdict flipped")
    diff.add_argument("--task", required=True)
    diff.add_argument("from_version", nargs="?", metavar="FROM",
                      help="`current`, `previous`, `base` (the bare base), `candidate` (the last evaluated, not "
                           "deployed), a CID, a unique CID prefix (6+ characters) or a .kolm path. No version: "
                           "previous -> current; one: it and the current one, older first (base, previous and "
                           "earlier deployments before it, candidate after); two: FROM -> TO as given")
    diff.add_argument("to_version", nargs="?", metavar="TO")
    diff.add_argument("--limit", type=int, default=20, help="flipped cases listed per direction")
    diff.add_argument("--json", action="store_true", help="print the diff as JSON")

    verify = verb(verbs, "verify", cmd_verify,
                  "check an artifact's files, signatures and receipt chain offline (and its deployment receipt)")
    verify.add_argument("artifact", help="a .kolm file, or a published artifact by `current`, `previous` (with "
                        "--task), CID or unique CID prefix")
    verify.add_argument("--task", help="the task whose `current` or `previous` to verify")
    verify.add_argument("--keys", help="directory of tenant public keys (*.pub); default KOLM_HOME/keys")
    verify.add_argument("--json", action="store_true", help="print the verdict, receipts and provenance as JSON")

    serve_ = verb(verbs, "serve", cmd_serve, "OpenAI-compatible serving of the base model plus each task's adapter")
    serve_.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_.add_argument("--port", type=int, default=SERVE_PORT, help="port to listen on")
    serve_.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="transformers: in process; vllm: a vLLM server's runtime LoRA endpoints")
    serve_.add_argument("--vllm-url", help="vLLM server, e.g. http://vllm:8000 (--backend vllm)")
    serve_.add_argument("--vllm-adapter-root",
                        help="KOLM_HOME/serve-cache as the vLLM server sees it, when mounted at another path")
    serve_.add_argument("--vllm-images", action="store_true",
                        help="the vLLM server runs a vision-language model: pass image_url parts (base64 data URLs "
                        "only) on to it")
    serve_.add_argument("--poll-interval", type=float, default=0.1, help="seconds between pointer checks")
    serve_.add_argument("--follow", choices=["pointers", "registry"], default="pointers",
                        help="what says which adapter serves each task: the pointer files in KOLM_HOME/adapters "
                        "(default: one host, or a shared volume), or the registry in the capture store "
                        "(replicas that share only PostgreSQL and the object store: artifacts are fetched by CID "
                        "from KOLM_ARTIFACTS_URL and verified with the public keys deployments publish)")
    serve_.add_argument("--grace-seconds", type=float, default=5.0,
                        help="how long a replaced adapter stays loaded (and until its requests finish)")
    serve_.add_argument("--no-live-monitor", action="store_true",
                        help="do not watch served answers or roll back automatically (docs/live-monitoring.md)")
    serve_.add_argument("--monitor-sample-share", type=float, default=0.2,
                        help="share of answers format-checked without a reference")
    serve_.add_argument("--monitor-tolerance", type=float, default=0.10,
                        help="how far the live score may fall below the evaluated one before rollback")
    serve_.add_argument("--monitor-min-requests", type=int, default=50,
                        help="judged answers needed before an automatic rollback")
    serve_.add_argument("--monitor-window", type=int, default=1000,
                        help="most recent judged answers the live score covers")
    serve_.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                        help="info logs every request and every swap; warning keeps refusals and errors")
    serve_.add_argument("--max-batch", type=int,
                        help="closed-vocabulary requests scored together at most (transformers backend; default "
                             "2 on CPU, where larger batches lowered throughput in bench/swap.py, 16 on a GPU); "
                             "smaller also shortens the wait of the first request after a swap")
    serve_.add_argument("--max-gen-batch", type=int,
                        help="free-text and JSON answers of one adapter decoded together at most (transformers "
                             "backend; default 8 on CPU, 32 on a GPU); 1 decodes each request on its own")
    serve_.add_argument("--threads", type=int,
                        help="torch threads of the model (transformers backend). Default on a CPU: decoding passes "
                             "(free text, JSON) on one less than the cores, at least 1, leaving a core for HTTP, and "
                             "label batches and loading on every core; on a GPU torch's choice. Given, it sets both")

    tripwire = verbs.add_parser("tripwire", help="the collapse tripwire's halt of a namespace")
    tripwire_verbs = tripwire.add_subparsers(dest="tripwire_verb", required=True, metavar="ACTION")
    clear = verb(tripwire_verbs, "clear", cmd_tripwire_clear, "let a halted namespace distill again")
    clear.add_argument("--namespace", required=True, help="TENANT.NAMESPACE (or NAMESPACE with --tenant)")
    clear.add_argument("--tenant")
    clear.add_argument("--actor", default=default_actor(), help="who, for the audit log")

    retention = verbs.add_parser("retention", help="the retention windows of the namespaces")
    retention_verbs = retention.add_subparsers(dest="retention_verb", required=True, metavar="ACTION")
    verb(retention_verbs, "sweep", cmd_retention_sweep,
         "remove the text of every capture past its namespace's window from the store and the work directories "
         "(every distill does this first; cron it where none runs daily)")

    demo = verb(verbs, "demo", cmd_demo, "run the whole loop on the embedded defaults")
    demo.add_argument("--tickets", type=int, default=200, help="support tickets to send")
    demo.add_argument("--epochs", type=float, default=2.0, help="training epochs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives the optional `ids` of `triage` its (empty) turn right after the action, so ids written
    # after options (`triage keep --namespace NS 12 13`) arrive as leftovers: take those, refuse the rest.
    if args.verb == "triage" and extra and all(item.isdigit() for item in extra):
        args.ids = [*args.ids, *(int(item) for item in extra)]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verb == "triage" and args.action != "rule" and not args.ids:
        parser.error(f"triage {args.action} needs " + ("one capture id" if args.action == "correct"
                                                        else "one or more capture ids"))
    try:
        return args.handler(args)
    except (UserError, FileNotFoundError) as exc:
        print(f"kolm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kolm … | head`: the reader has all it wanted; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
