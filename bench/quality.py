"""Learning quality and cost on public data (issue 21): the whole product, driven as a new user drives it, scored
on held-out messages by what `kolm serve` answers.

    .venv/bin/python bench/quality.py --set clinc20        # CLINC150, 20 banking intents: 800 captured, 800 held out
    .venv/bin/python bench/quality.py --set clinc-all      # CLINC150, all 150 intents: 3,900 captured, 770 held out
    .venv/bin/python bench/quality.py --set snips-json     # SNIPS as JSON answers: 1,039 captured, 400 held out
    .venv/bin/python bench/quality.py --set clinc20 --intents 3 --limit-train 45 --limit-heldout 12   # smoke run
    .venv/bin/python bench/quality.py --set clinc-all --train label_loss=true --train rank=32        # try settings

Steps, each through the product's own entry points, in a fresh temporary KOLM_HOME (its own capture store,
Dagster instance, MLflow and artifacts; only the dequantized base model is cached outside it, in
KOLM_MODEL_CACHE, default `.kolm/models` as the tests use):

 1. `kolm tenant create bench` (the kolm key is read from what it prints).
 2. A STAND-IN TEACHER starts: the OpenAI-compatible server of `kolm_pipeline/demo/teacher.py`, here answering every
    training message with its gold answer from the data set (a label, or the JSON object as text), so it is a
    teacher that is always right. It stands in for the frontier API; `--teacher-latency` (default 0.25 s, as in
    `kolm demo`) is what the proxy measures upstream, which the K-score's latency and cost parts compare against.
 3. `kolm capture serve` starts as its own process with KOLM_UPSTREAM_OPENAI pointing at the teacher; the training
    messages go through it with the official `openai` SDK (8 concurrent clients, every 4th request streamed);
    every answer that comes back must equal the gold one. The proxy stops once the store holds every capture.
 4. `kolm triage rule --keep --model <teacher model>` keeps them.
 5. `kolm distill --namespace bench.<set> --min-pairs N` (timed; its per-stage seconds are parsed from what it
    prints, the evaluation's split between candidate and bare base is read from `evaluation.json`).
 6. If the gate swapped: `kolm serve` starts as its own process; after one warm-up request, the held-out
    messages go to it with the `openai` SDK from 4 concurrent clients (answers/s = messages / wall time).
    Scored: labels by exact match; JSON answers by valid JSON object share, intent set exact (order ignored),
    slot micro-F1 over (slot, span) pairs and whole object exact (intent set and every slot), spans compared
    after collapsing white space and case.

Prints the table of issue 21 for the set, the K-score parts of candidate and bare base, the splits the recipe
chose and where `kolm distill` spent its time; `--json-out FILE` writes the same as JSON. Held-out messages are
never sent through the proxy, so the product never sees them before `kolm serve` does.

Data: `bench/data/` (CLINC150, CC BY 3.0; SNIPS, CC0; see the SOURCE.md files). The machine's cores are shared
by the proxy, the teacher, the trainer and the server: run nothing else heavy alongside if the times matter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT))

TENANT = "bench"
TEACHER_MODEL = "stand-in-teacher-gold"
SEND_WORKERS = 8
STREAM_EVERY = 4
SERVE_CLIENTS = 4
CLINC_PROMPT = ("You are the intent classifier of a bank's customer assistant. Classify the customer's message into "
                "one intent. Answer with the intent name only.")
CLINC_ALL_PROMPT = ("You are the intent classifier of a personal assistant. Classify the user's message into one "
                    "intent. Answer with the intent name only.")
SNIPS_PROMPT = ('Read the user\'s request to a voice assistant and answer with JSON only: {"intents": [the intents '
                'it asks for, in order], "slots": {slot name: the exact text span}}.')


@dataclass(frozen=True)
class BenchSet:
    name: str
    namespace: str
    train_file: str
    heldout_file: str
    system_prompt: str
    kind: str  # "label" or "json"
    description: str


SETS = {
    "clinc20": BenchSet("clinc20", "clinc20", "clinc150/clinc20.train.jsonl", "clinc150/clinc20.heldout.jsonl",
                        CLINC_PROMPT, "label", "CLINC150, 20 intents of one service domain (banking)"),
    "clinc-all": BenchSet("clinc-all", "clinc-all", "clinc150/all.train.jsonl", "clinc150/all.heldout.jsonl",
                          CLINC_ALL_PROMPT, "label", "CLINC150, all 150 intents"),
    "snips-json": BenchSet("snips-json", "snips-json", "snips/json.train.jsonl", "snips/json.heldout.jsonl",
                           SNIPS_PROMPT, "json", "SNIPS, JSON answers (multi-label intents, slots)"),
}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def answer_text(answer: str | dict) -> str:
    """What the teacher says: the label, or the JSON object as a frontier API would write it."""
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def intents_of(answer: str | dict) -> list[str]:
    return [answer] if isinstance(answer, str) else list(answer["intents"])


def select(rows: list[dict], keep: set[str] | None, limit: int | None) -> list[dict]:
    if keep is not None:
        rows = [row for row in rows if set(intents_of(row["answer"])) <= keep]
    return rows[:limit] if limit is not None else rows


def messages(bench: BenchSet, text: str) -> list[dict]:
    return [{"role": "system", "content": bench.system_prompt}, {"role": "user", "content": text}]


# --- scoring ---------------------------------------------------------------------------------------------------


def _span(value: object) -> str:
    return " ".join(str(value).split()).casefold()


def score_labels(golds: list[str], answers: list[str]) -> dict:
    exact = sum(answer.strip() == gold for gold, answer in zip(golds, answers, strict=True))
    return {"cases": len(golds), "exact": exact / len(golds) if golds else 0.0}


def score_json(golds: list[dict], answers: list[str]) -> dict:
    valid = intent_exact = whole = 0
    tp = fp = fn = 0
    for gold, answer in zip(golds, answers, strict=True):
        gold_intents = set(gold["intents"])
        gold_slots = {(name, _span(span)) for name, span in gold["slots"].items()}
        try:
            value = json.loads(answer)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            fn += len(gold_slots)
            continue
        valid += 1
        intents = value.get("intents")
        got_intents = {str(i) for i in intents} if isinstance(intents, list) else set()
        slots = value.get("slots")
        got_slots = ({(str(name), _span(span)) for name, span in slots.items()} if isinstance(slots, dict) else set())
        tp += len(got_slots & gold_slots)
        fp += len(got_slots - gold_slots)
        fn += len(gold_slots - got_slots)
        intent_exact += got_intents == gold_intents
        whole += got_intents == gold_intents and got_slots == gold_slots
    cases = len(golds) or 1
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"cases": len(golds), "valid_json": valid / cases, "intent_set_exact": intent_exact / cases,
            "slot_micro_f1": f1, "slot_precision": tp / (tp + fp) if tp + fp else 0.0,
            "slot_recall": tp / (tp + fn) if tp + fn else 0.0, "whole_object_exact": whole / cases}


# --- processes -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kolm_command() -> list[str]:
    script = Path(sys.executable).with_name("kolm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kolm_pipeline.cli"]


class Proc:
    """A process of ours, its output in a log file; stopped by its own pid (SIGINT, then SIGKILL)."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def wait_until(what: str, check: Callable[[], bool], timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise SystemExit(f"{proc.name} exited ({proc.process.returncode}) before {what}:\n{proc.tail()}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}" + (f":\n{proc.tail()}" if proc else ""))


def run_kolm(args: list[str], env: dict, echo: bool = True) -> tuple[int, str, float]:
    """Run `kolm ARGS`, echoing its output as it comes; returns exit status, output and wall seconds."""
    began = time.perf_counter()
    process = subprocess.Popen([*kolm_command(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               cwd=ROOT, text=True, bufsize=1)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if echo:
            print(f"    | {line}", end="", flush=True)
    status = process.wait()
    return status, "".join(lines), time.perf_counter() - began


def openai_client(url: str, key: str, namespace: str | None = None):
    import openai

    headers = {"x-upstream-api-key": "bench-upstream-key-not-a-secret", "x-kolm-namespace": namespace} \
        if namespace else None
    return openai.OpenAI(base_url=url, api_key=key, default_headers=headers, max_retries=0, timeout=600)


def ask(client, model: str, conversation: list[dict], stream: bool) -> str:
    if stream:
        chunks = client.chat.completions.create(model=model, messages=conversation, stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    reply = client.chat.completions.create(model=model, messages=conversation)
    return reply.choices[0].message.content or ""


# --- the run ---------------------------------------------------------------------------------------------------


def bench_env(home: Path, model_cache: Path, upstream: str | None = None) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("KOLM_") and key not in ("DAGSTER_HOME",)}
    env.update({"KOLM_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "KOLM_MODEL_CACHE": str(model_cache),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                # Freed memory stays in the heap, as `make demo` and `make test` run (TRAINER_ENV in train/distill.py).
                "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1099511627776"})
    if upstream:
        env["KOLM_UPSTREAM_OPENAI"] = upstream
    return env


STAGE_LINE = re.compile(r"^\s+(\w+)\s+(\w+)\s+([\d.]+) s$")
KEY_LINE = re.compile(r"kolm key \(shown once, store it now\): (\S+)")  # `kolm tenant create` and `tenant key`


def serve_heldout(bench: BenchSet, task: str, home: Path, env: dict, key: str, heldout: list[dict], logs: Path,
                  procs: list[Proc], result: dict) -> None:
    """Start `kolm serve` on ``home`` and answer ``heldout`` from SERVE_CLIENTS `openai` clients; the served figures
    go into ``result``."""
    pointer = home / "adapters" / task
    result["deployed"] = pointer.is_symlink()
    if not result["deployed"]:
        print("[quality] nothing was deployed, so `kolm serve` has no adapter for the task: no served figures",
              flush=True)
        return
    port = free_port()
    began = time.perf_counter()
    server = Proc("kolm-serve", [*kolm_command(), "serve", "--port", str(port), "--log-level", "warning"], env,
                  logs)
    procs.append(server)
    serve_url = f"http://127.0.0.1:{port}"
    import httpx

    wait_until("kolm serve to load the task", lambda: task in httpx.get(
        f"{serve_url}/v1/models", headers={"authorization": f"Bearer {key}"}).text, 600, server)
    result["timings"]["serve_start"] = time.perf_counter() - began
    clients = [openai_client(f"{serve_url}/v1", key) for _ in range(SERVE_CLIENTS)]
    ask(clients[0], task, messages(bench, heldout[0]["text"]), False)  # warm-up, not counted
    answers: list[str | None] = [None] * len(heldout)
    failures: list[str] = []

    positions = iter(range(len(heldout)))  # one queue: a client takes the next message when it is free
    claim = threading.Lock()

    def client_loop(index: int) -> None:
        while True:
            with claim:
                position = next(positions, None)
            if position is None:
                return
            try:
                answers[position] = ask(clients[index], task, messages(bench, heldout[position]["text"]), False)
            except Exception as exc:  # counted as a wrong answer, and reported
                failures.append(f"{type(exc).__name__}: {exc}")
                answers[position] = ""

    print(f"[quality] kolm serve at {serve_url}: {len(heldout)} held-out messages from {SERVE_CLIENTS} "
          f"concurrent clients…", flush=True)
    began = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(SERVE_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    result["timings"]["serve_heldout"] = wall
    result["serve_answers_per_s"] = len(heldout) / wall if wall else 0.0
    result["serve_failures"] = len(failures)
    result["serve_failure_examples"] = failures[:3]
    texts = [a or "" for a in answers]
    if bench.kind == "label":
        result["served"] = score_labels([row["answer"] for row in heldout], texts)
    else:
        result["served"] = score_json([row["answer"] for row in heldout], texts)
    served = [{"text": row["text"], "gold": answer_text(row["answer"]), "served": text}
              for row, text in zip(heldout, texts, strict=True)]
    result["wrong_examples"] = [case for case in served if case["served"].strip() != case["gold"]][:8]
    result["served_answers"] = served  # every held-out answer, for error analysis (--json-out)
    monitor = httpx.get(f"{serve_url}/v1/monitor", headers={"authorization": f"Bearer {key}"}).json()
    result["live_monitor"] = monitor.get("tasks", {}).get(task)
    result["still_deployed_after_serving"] = pointer.is_symlink() and pointer.resolve().name == \
        result.get("artifact")


def run(args: argparse.Namespace) -> dict:
    from kolm_pipeline.capture.background import BackgroundServer
    from kolm_pipeline.demo.teacher import create_teacher_app

    bench = SETS[args.set]
    train = read_rows(DATA / bench.train_file)
    heldout = read_rows(DATA / bench.heldout_file)
    keep = None
    if args.intents:
        names = sorted({intent for row in train for intent in intents_of(row["answer"])})[: args.intents]
        keep = set(names)
    train = select(train, keep, args.limit_train)
    heldout = select(heldout, keep, args.limit_heldout)
    task = f"{TENANT}.{bench.namespace}"
    home = Path(args.home).resolve() if args.home else Path(tempfile.mkdtemp(prefix="kolm-bench-quality-"))
    if args.serve_only:
        if not args.home or not (home / "adapters" / task).is_symlink():
            raise SystemExit(f"--serve-only needs --home of an earlier run of this set that deployed {task}")
    elif args.home and home.exists() and any(home.iterdir()):
        raise SystemExit(f"--home {home} is not empty; the bench needs a fresh KOLM_HOME")
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "bench-logs"
    logs.mkdir(exist_ok=bool(args.serve_only))
    model_cache = Path(args.model_cache or os.environ.get("KOLM_MODEL_CACHE") or ROOT / ".kolm" / "models").resolve()
    env = bench_env(home, model_cache)
    result: dict = {"set": bench.name, "description": bench.description, "task": task, "home": str(home),
                    "train_messages": len(train), "heldout_messages": len(heldout), "cpus": os.cpu_count(),
                    "teacher_latency_s": args.teacher_latency, "timings": {}}
    labels = sorted({i for row in train for i in intents_of(row["answer"])})
    print(f"[quality] {bench.description}: {len(train)} training messages ({len(labels)} intents), "
          f"{len(heldout)} held out; KOLM_HOME {home}", flush=True)
    procs: list[Proc] = []
    try:
        # 0. The embedded base is resolved (dequantized once, then cached) before anything is timed.
        subprocess.run([sys.executable, "-c", "from kolm_pipeline.settings import load_settings; "
                        "from kolm_pipeline.train.base_model import resolve_base_model as r; "
                        "s = load_settings(); print(r(s.base_model, s.models_dir).model_id)"],
                       env=env, check=True, cwd=ROOT, capture_output=True)

        if args.serve_only:  # the deployed adapter of an earlier run, served again (a new key for the tenant)
            status, out, _ = run_kolm(["tenant", "key", TENANT], env, echo=False)
            match = KEY_LINE.search(out)
            if status or not match:
                raise SystemExit(f"kolm tenant key failed:\n{out}")
            result.update(read_workdir(home, task))
            serve_heldout(bench, task, home, env, match.group(1), heldout, logs, procs, result)
            return result

        # 1. A tenant and its kolm key.
        status, out, _ = run_kolm(["tenant", "create", TENANT], env, echo=False)
        match = KEY_LINE.search(out)
        if status or not match:
            raise SystemExit(f"kolm tenant create failed:\n{out}")
        key = match.group(1)

        # 2-3. Stand-in teacher, capture proxy, training traffic with the openai SDK.
        gold = {row["text"]: answer_text(row["answer"]) for row in train}
        began = time.perf_counter()
        with BackgroundServer(create_teacher_app(gold, latency_s=args.teacher_latency)) as teacher:
            port = free_port()
            proxy = Proc("capture-proxy", [*kolm_command(), "capture", "serve", "--port", str(port)],
                         bench_env(home, model_cache, upstream=f"{teacher.url}/v1"), logs)
            procs.append(proxy)
            proxy_url = f"http://127.0.0.1:{port}"
            import httpx

            wait_until("the capture proxy", lambda: httpx.get(f"{proxy_url}/healthz").status_code == 200, 120, proxy)
            client = openai_client(f"{proxy_url}/v1/capture/openai", key, bench.namespace)
            print(f"[quality] stand-in teacher (gold answers) at {teacher.url}, capture proxy at {proxy_url}: sending "
                  f"{len(train)} messages with the openai SDK…", flush=True)
            with ThreadPoolExecutor(SEND_WORKERS) as pool:
                got = list(pool.map(lambda pair: ask(client, TEACHER_MODEL, messages(bench, pair[1]["text"]),
                                                     pair[0] % STREAM_EVERY == 0), enumerate(train)))
            wrong = sum(answer != gold[row["text"]] for row, answer in zip(train, got, strict=True))
            if wrong:
                raise SystemExit(f"{wrong} answers through the proxy differ from the stand-in teacher's gold answers")
            from kolm_pipeline.store import CaptureStore

            store = CaptureStore(f"sqlite:///{home / 'captures.db'}")
            wait_until(f"{len(train)} captures in the store",
                       lambda: store.counters(TENANT, bench.namespace)["captured"] >= len(train), 120, proxy)
            proxy.stop()
        result["timings"]["capture"] = time.perf_counter() - began
        print(f"[quality] captured {store.counters(TENANT, bench.namespace)['captured']} in "
              f"{result['timings']['capture']:.1f} s", flush=True)

        # 4. A triage rule keeps them.
        status, out, _ = run_kolm(["triage", "rule", "--namespace", task, "--keep", "--model", TEACHER_MODEL], env)
        if status:
            raise SystemExit("kolm triage rule failed")
        result["counters_before_distill"] = store.counters(TENANT, bench.namespace)

        # 5. kolm distill, timed.
        min_pairs = args.min_pairs if args.min_pairs is not None else min(len(train) // 2, 100)
        distill_args = ["distill", "--namespace", task, "--min-pairs", str(min_pairs)]
        if args.epochs is not None:
            distill_args += ["--epochs", str(args.epochs)]
        for setting in args.train or []:
            distill_args += ["--train", setting]
        print(f"[quality] kolm {' '.join(distill_args)}", flush=True)
        status, out, seconds = run_kolm(distill_args, env)
        result["timings"]["distill"] = seconds
        result["distill_exit"] = status
        result["distill_stages"] = {m.group(1): {"status": m.group(2), "seconds": float(m.group(3))}
                                    for m in map(STAGE_LINE.match, out.splitlines()) if m}
        result.update(read_workdir(home, task))

        # 6. kolm serve and the held-out messages.
        serve_heldout(bench, task, home, env, key, heldout, logs, procs, result)
        return result
    finally:
        for proc in reversed(procs):
            proc.stop()
        result["logs"] = str(logs)
        if not args.keep_home and not args.home:
            shutil.rmtree(home, ignore_errors=True)
            result["home"] = f"{home} (removed; --keep-home keeps it)"


def read_workdir(home: Path, task: str) -> dict:
    """What the distill left in the namespace's work directory: splits, output kind, training and evaluation."""
    work = home / "work" / task
    found: dict = {}
    spec_path, diagnostics_path = work / "recipe" / "spec.json", work / "recipe" / "diagnostics.json"
    if (work / "corpus.jsonl").is_file():
        found["corpus_pairs"] = sum(1 for line in (work / "corpus.jsonl").open() if line.strip())
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        found["recipe"] = {"output_kind": spec.get("output_kind"), "verifier": spec.get("verifier"),
                           "counts": spec.get("counts"), "k_floor": spec.get("k_floor"),
                           "labels": len(spec.get("labels") or []), "max_new_tokens": spec.get("max_new_tokens")}
    if diagnostics_path.is_file():
        diagnostics = json.loads(diagnostics_path.read_text())
        found["recipe"]["why"] = diagnostics.get("why")
        found["recipe"]["decontaminated"] = diagnostics.get("dropped", {}).get("decontaminated")
        found["recipe"]["dropped_not_fitting_kind"] = len(diagnostics.get("dropped", {})
                                                          .get("answers_not_fitting_the_kind", []))
    training = work / "adapter" / "kolm_training.json"
    if training.is_file():
        document = json.loads(training.read_text())
        config = document.get("config", {})
        found["training"] = {name: document.get(name) for name in (
            "examples", "steps", "epochs", "train_tokens", "wall_seconds", "tokens_per_second", "final_loss",
            "truncated_pairs")}
        found["training"]["config"] = {name: config.get(name) for name in (
            "epochs", "max_examples", "learning_rate", "rank", "alpha", "batch_size", "max_length", "label_loss",
            "neftune_alpha", "seed") if name in config}
    if (work / "evaluation.json").is_file():
        from kolm_pipeline.evaluate.result import EvaluationResult

        evaluation = EvaluationResult.read(work / "evaluation.json")
        document = evaluation.document()
        found["evaluation"] = {
            "decision": document["decision"], "current_name": document["current_name"],
            "eval_cases": document["eval_cases"], "holdout_cases": document["holdout_cases"],
            "candidate": document["candidate"], "base": document["current"],
        }
        found["kscore_table"] = evaluation.kscore_table()
    pointer = home / "adapters" / task
    if pointer.is_symlink():
        found["artifact"] = pointer.resolve().name
    return found


# --- the report ------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(result: dict) -> str:
    stages = result.get("distill_stages", {})
    evaluation = result.get("evaluation") or {}
    candidate, base = evaluation.get("candidate") or {}, evaluation.get("base") or {}
    served = result.get("served") or {}
    cases = served.get("cases", result["heldout_messages"])
    train_n = result["train_messages"]
    lines = ["", f"Learning quality on public data: {result['description']} (`--set {result['set']}`), "
             f"{result['cpus']} CPUs", ""]
    lines += ["| measured on what `kolm serve` answers | figure |", "|---|---|"]
    if "valid_json" in served:
        lines.append(f"| {train_n} captured; {cases} held out: valid JSON / intent set exact / slot micro-F1 / "
                     f"whole object exact | {fmt(served['valid_json'], 4)} / {fmt(served['intent_set_exact'])} / "
                     f"{fmt(served['slot_micro_f1'])} / {fmt(served['whole_object_exact'])} |")
    else:
        lines.append(f"| {train_n} captured; {cases} held out: exact | {fmt(served.get('exact'))} |")
    split = ""
    if stages:
        split = (f" (adapter {stages.get('adapter', {}).get('seconds', 0):.0f} s, evaluation "
                 f"{stages.get('evaluation', {}).get('seconds', 0):.0f} s: candidate "
                 f"{candidate.get('eval_seconds', 0):.0f} s, bare base {base.get('eval_seconds', 0):.0f} s)")
    lines.append(f"| `kolm distill` wall time | {result['timings'].get('distill', 0):.0f} s{split} |")
    rate = result.get("serve_answers_per_s")
    lines.append(f"| `kolm serve` answers/s, {SERVE_CLIENTS} concurrent clients | {fmt(rate, 2)} |")
    lines += ["", "Where `kolm distill` spent its time (as it printed):"]
    lines += [f"  {name:<18} {part['status']:<8} {part['seconds']:8.1f} s" for name, part in stages.items()]
    recipe = result.get("recipe") or {}
    if recipe:
        counts = recipe.get("counts") or {}
        lines += ["", f"Recipe: {recipe.get('output_kind')} ({recipe.get('verifier')}; {recipe.get('why')}); "
                  f"corpus {result.get('corpus_pairs')} pairs → train {counts.get('train')}, "
                  f"eval {counts.get('eval')}, "
                  f"hold-out {counts.get('holdout')}; decontaminated {recipe.get('decontaminated')}; "
                  f"max_new_tokens {recipe.get('max_new_tokens')}; K-floor {recipe.get('k_floor')}"]
    training = result.get("training") or {}
    if training:
        lines.append(f"Training: {training.get('examples')} pairs, {training.get('steps')} steps, "
                     f"{training.get('train_tokens')} tokens, {fmt(training.get('wall_seconds'), 1)} s "
                     f"({fmt(training.get('tokens_per_second'), 0)} tokens/s), final loss "
                     f"{fmt(training.get('final_loss'), 4)}; config {training.get('config')}")
    if evaluation:
        decision = evaluation["decision"]
        verdict = "swap" if decision.get("swap") else "refused"
        lines += ["", f"Gate against {evaluation['current_name']}: {verdict}, delta {decision.get('delta'):+.3f} "
                  f"(eval {evaluation['eval_cases']} cases, hold-out {evaluation['holdout_cases']})"]
        lines += [f"  {line}" for line in result.get("kscore_table", "").splitlines()]
    if "valid_json" in served:
        lines.append(f"Slots: precision {fmt(served['slot_precision'])}, recall {fmt(served['slot_recall'])}")
    timings = result["timings"]
    lines += ["", "Other times: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())]
    if result.get("serve_failures"):
        lines.append(f"Serving failures: {result['serve_failures']} ({result['serve_failure_examples']})")
    if result.get("deployed") is False:
        failed = [name for name, part in stages.items() if part["status"] not in ("success", "skipped")]
        if evaluation and not evaluation["decision"].get("swap"):
            lines.append("Not deployed: the gate refused, so nothing was served.")
        else:
            lines.append(f"Not deployed: `kolm distill` exited {result.get('distill_exit')}"
                         f"{' at ' + ', '.join(failed) if failed else ''} before a passing evaluation; nothing served.")
    for example in result.get("wrong_examples", [])[:5]:
        lines.append(f"  wrong: {example['text'][:70]!r} gold {example['gold'][:80]!r} "
                     f"served {example['served'][:80]!r}")
    lines.append(f"KOLM_HOME: {result['home']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, choices=sorted(SETS), help="which public set to run")
    parser.add_argument("--limit-train", type=int, metavar="N", help="send only the first N training messages")
    parser.add_argument("--limit-heldout", type=int, metavar="N", help="score only the first N held-out messages")
    parser.add_argument("--intents", type=int, metavar="K",
                        help="keep only messages of the first K intents (sorted by name), for a quick smoke run")
    parser.add_argument("--min-pairs", type=int, help="`kolm distill --min-pairs` (default: half the training "
                        "messages, at most 100)")
    parser.add_argument("--epochs", type=float, help="`kolm distill --epochs` (default: the product's, 2)")
    parser.add_argument("--train", action="append", metavar="NAME=VALUE",
                        help="`kolm distill --train NAME=VALUE`, repeatable: try a training setting on the set")
    parser.add_argument("--teacher-latency", type=float, default=0.25,
                        help="seconds the stand-in teacher waits per answer (default 0.25, as `kolm demo`)")
    parser.add_argument("--home", help="use this (empty or new) directory as KOLM_HOME and keep it")
    parser.add_argument("--serve-only", action="store_true",
                        help="only serve the held-out messages again with what an earlier run with this --home "
                             "deployed (to compare serving code side by side)")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary KOLM_HOME for inspection")
    parser.add_argument("--model-cache", help="KOLM_MODEL_CACHE for the dequantized base (default: $KOLM_MODEL_CACHE "
                        "or .kolm/models in the repository, shared with the tests)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.limit_train is not None and args.limit_train < 10:
        parser.error("--limit-train must be at least 10 (a recipe needs 10 training pairs)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    result = run(args)
    result["timings"]["bench_total"] = time.perf_counter() - began
    print(report(result), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result.get("deployed") and not result.get("serve_failures") else 1


if __name__ == "__main__":
    raise SystemExit(main())
