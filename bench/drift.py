"""Drift sensor benchmark: detections, false alarms and cost per tick, on real MiniLM embeddings.

    .venv/bin/python bench/drift.py                    # new topic: data-protection requests
    .venv/bin/python bench/drift.py --topic queue      # new topic: a ticket queue the champion never saw

Sets up, for real, what the sensor sees: a capture store (SQLite in a temporary KOLM_HOME) holding 1,000
support tickets (kolm_pipeline/demo/tickets.py) kept and distilled by the corpus stage, and a signed
champion `.kolm` behind the task's pointer that names that corpus. Then come windows of 1,000 new captures:
10 undrifted (fresh tickets, other seeds) and 10 drifted (900 tickets + 100 requests of a topic the
champion never saw, shuffled in), each checked by `check_drift`, the function the sensor runs per
namespace, so the reference, the window, the statistic and the p-value are the sensor's own.

For comparison each window is also tested, with the same test, against the request texts of the
champion's corpus file itself, which the corpus stage deduplicated (exact and near duplicates): the
reason the sensor compares raw requests with raw requests.

Tick time: `check_drift` run again on each window once its embeddings are cached (the memo forgets that
the window was tested): the sensor's per-namespace cost on a warm cache — counters, pointer, the window's
captures from the store, cache lookups and 1,000 permutations. Embeddings persist in --cache, so a second
run re-embeds nothing. The load average is printed: other processes slow the wall clock.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kolm_pipeline.corpus.build import read_corpus  # noqa: E402
from kolm_pipeline.corpus.embedding_cache import EmbeddingCache  # noqa: E402
from kolm_pipeline.demo.tickets import QUEUES, Ticket, generate_tickets  # noqa: E402
from kolm_pipeline.evaluate.drift import mmd_test  # noqa: E402
from kolm_pipeline.registry.artifact import build_kolm  # noqa: E402
from kolm_pipeline.registry.swap import publish_artifact, swap_pointer  # noqa: E402
from kolm_pipeline.settings import load_settings  # noqa: E402
from kolm_pipeline.stages.corpus import run_corpus_stage  # noqa: E402
from kolm_pipeline.stages.drift import DriftConfig, check_drift, recent_requests, request_text  # noqa: E402
from kolm_pipeline.stages.workdir import NamespaceWorkdir  # noqa: E402
from kolm_pipeline.store import CaptureStore, NewCapture  # noqa: E402

PARTITION = "bench.support"
HELD_OUT_QUEUE = "growth"

# Data-protection requests: a topic a support desk starts to receive after, say, a privacy incident.
PRIVACY_TEMPLATES = [
    "Please delete all the personal data you hold about me under {law}.",
    "I want a copy of every piece of data {company} stores about me.",
    "Under {law} I ask you to stop selling my personal information.",
    "Who is your data protection officer and how do I contact them about {topic}?",
    "Which third parties did you share my {topic} with in {year}?",
    "I withdraw my consent for {topic} and want confirmation in writing.",
    "Someone opened an account with my personal details, please erase everything about {topic}.",
    "How long do you keep {topic} before it is deleted?",
    "We need a signed data processing agreement covering {topic} before our {country} team can continue.",
    "Was my {topic} part of the data breach you announced in {year}?",
    "Please correct the personal data in my profile, my {topic} is wrong.",
    "I object to automated profiling based on my {topic}.",
]
_PRIVACY_FILLERS = {
    "law": ["GDPR", "the CCPA", "article 17 of the GDPR", "the UK Data Protection Act", "LGPD"],
    "company": ["your company", "your app", "your support team", "your analytics partner"],
    "topic": ["purchase history", "location data", "call recordings", "marketing cookies", "chat transcripts",
              "date of birth", "home address", "browsing data"],
    "year": ["2023", "2024", "2025"],
    "country": ["German", "French", "Brazilian", "Japanese", "Canadian"],
}
_OPENERS = ["", "Hi, ", "Hello team, ", "Urgent: ", "Dear support, ", "Good morning. "]
_CLOSERS = ["", " Thanks.", " Please reply within 30 days.", " Thank you!", " Regards."]


def privacy_requests(count: int, seed: int) -> list[Ticket]:
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        body = rng.choice(PRIVACY_TEMPLATES).format(**{k: rng.choice(v) for k, v in _PRIVACY_FILLERS.items()})
        requests.append(Ticket(f"{rng.choice(_OPENERS)}{body}{rng.choice(_CLOSERS)}", "privacy"))
    return requests


def tickets(count: int, seed: int, exclude: str | None) -> list[Ticket]:
    """`count` demo tickets, none from the queue `exclude`."""
    found: list[Ticket] = []
    while len(found) < count:
        found += [t for t in generate_tickets(count, seed=seed) if t.queue != exclude]
        seed += 7919
    return found[:count]


def held_out_queue(count: int, seed: int) -> list[Ticket]:
    found: list[Ticket] = []
    while len(found) < count:
        found += [t for t in generate_tickets(len(QUEUES) * count, seed=seed) if t.queue == HELD_OUT_QUEUE]
        seed += 7919
    return found[:count]


def capture(store: CaptureStore, batch: list[Ticket]) -> None:
    tenant, namespace = PARTITION.split(".")
    store.insert_captures([
        NewCapture(request_id=uuid.uuid4().hex, tenant=tenant, namespace=namespace, provider="openai",
                   model="gpt-4o-mini", messages=ticket.messages(), output_text=ticket.queue, latency_us=300_000,
                   status="ok", http_status=200, prompt_tokens=40, completion_tokens=3, tags=[])
        for ticket in batch
    ])


def deploy_champion(settings, store: CaptureStore, home: Path) -> str:
    """Distill the kept captures and put a signed .kolm naming that corpus behind the task's pointer. The
    adapter is a real PEFT LoRA of a tiny random Llama: the drift check only reads the manifest and receipts."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    workdir = NamespaceWorkdir(settings, PARTITION)
    corpus = run_corpus_stage(workdir, store, min_pairs=1)
    adapter = home / "adapter"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    staging = home / "champion.kolm"
    tenant, namespace = PARTITION.split(".")
    build_kolm(staging, manifest={"task": PARTITION, "tenant": tenant, "namespace": namespace,
                                  "corpus_cid": corpus.cid},
               adapter_dir=adapter, evals={}, receipts=[workdir.receipt_path("corpus").read_bytes()],
               signer=workdir.signer())
    swap_pointer(settings.adapters_dir, PARTITION, publish_artifact(settings.artifacts_dir, PARTITION, staging))
    return corpus.cid


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topic", choices=["privacy", "queue"], default="privacy",
                        help="privacy: data-protection requests; queue: the demo's 'growth' queue, held out of "
                        "the champion's corpus and the undrifted windows")
    parser.add_argument("--trials", type=int, default=10, help="drifted windows, and as many undrifted ones")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=1000, help="kept captures the champion was trained on")
    parser.add_argument("--share", type=float, default=0.10, help="share of a drifted window on the new topic")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--kernel", choices=["linear", "gaussian"], default="linear")
    parser.add_argument("--cache", type=Path, default=Path(".kolm/bench/drift-embeddings.sqlite"),
                        help="embedding cache kept between runs")
    args = parser.parse_args()

    exclude = HELD_OUT_QUEUE if args.topic == "queue" else None
    inject = held_out_queue if args.topic == "queue" else privacy_requests
    config = DriftConfig(window=args.window, min_samples=min(100, args.window), max_reference=args.reference,
                         alpha=args.alpha, permutations=args.permutations, kernel=args.kernel,
                         max_new_embeddings=10 ** 9)
    cache = EmbeddingCache(args.cache)
    with tempfile.TemporaryDirectory(prefix="kolm-drift-bench-") as tmp:
        home = Path(tmp)
        os.environ["KOLM_HOME"] = str(home)
        os.environ.pop("KOLM_STORE_URL", None)
        settings = load_settings(home)
        store = CaptureStore(settings.store_url)
        tenant, namespace = PARTITION.split(".")
        store.add_rule(tenant, namespace, "keep", {"status": "ok"}, actor="bench")
        capture(store, tickets(args.reference, 100, exclude))
        store.apply_rules(tenant, namespace)
        corpus_cid = deploy_champion(settings, store, home)
        print(f"champion corpus {corpus_cid}: {args.reference} kept tickets; topic {args.topic}; kernel {args.kernel}, "
              f"{args.permutations} permutations, alpha {args.alpha}")

        corpus_rows = read_corpus(NamespaceWorkdir(settings, PARTITION).corpus.read_bytes())
        corpus_vectors = cache.embed([request_text(row["messages"][:-1]) for row in corpus_rows]).vectors
        memo: dict = {}
        results = []
        plan = [("undrifted", trial) for trial in range(args.trials)] + [("drifted", t) for t in range(args.trials)]
        injected = round(args.window * args.share)
        for kind, trial in plan:
            if kind == "undrifted":
                batch = tickets(args.window, 1000 + trial, exclude)
            else:
                batch = tickets(args.window - injected, 3000 + trial, exclude) + inject(injected, 5000 + trial)
                random.Random(trial).shuffle(batch)
            capture(store, batch)
            began = time.perf_counter()
            outcome = check_drift(store, settings, PARTITION, cache, config, memo)
            first = time.perf_counter() - began
            if not outcome.tested:
                raise SystemExit(f"{kind} window {trial}: no test ({outcome.reason})")
            memo = outcome.memo
            warm = {key: value for key, value in memo.items() if key != "tested"}
            wall, cpu = time.perf_counter(), _cpu()
            check_drift(store, settings, PARTITION, cache, config, warm)
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            test = outcome.test
            recent = cache.embed(recent_requests(store, tenant, namespace, args.window, outcome.champion.last_capture))
            deduplicated = mmd_test(recent.vectors, corpus_vectors, alpha=args.alpha, permutations=args.permutations,
                                    kernel=args.kernel, seed=trial)
            results.append((kind, test, wall, cpu, deduplicated))
            print(f"{kind:9s} window {trial}: p = {test.p_value:.4f}  MMD² {test.statistic:.5f} (threshold "
                  f"{test.threshold:.5f})  n = {test.n_recent} vs {test.n_reference}  "
                  f"{'DRIFT' if test.drifted else 'quiet'}  first check {first:.1f} s (embedded {outcome.embedded}), "
                  f"cached tick {wall:.3f} s wall / {cpu:.3f} s CPU; against the deduplicated corpus "
                  f"({deduplicated.n_reference} rows) p = {deduplicated.p_value:.4f}")

    quiet = sum(not test.drifted for kind, test, *_ in results if kind == "undrifted")
    caught = sum(test.drifted for kind, test, *_ in results if kind == "drifted")
    walls = [wall for _, _, wall, _, _ in results]
    cpus = [cpu for _, _, _, cpu, _ in results]
    print(f"\ndrifted windows detected: {caught}/{args.trials} (goal ≥ {round(0.8 * args.trials)})")
    print(f"undrifted windows quiet:  {quiet}/{args.trials} (goal ≥ {round(0.9 * args.trials)})")
    print(f"tick on a warm cache, {args.window} + {args.reference} requests: median {statistics.median(walls):.3f} s, "
          f"max {max(walls):.3f} s wall; median {statistics.median(cpus):.3f} s CPU (goal ≤ 1 s)")
    false_alarms = sum(dedup.drifted for kind, *_, dedup in results if kind == "undrifted")
    print(f"against the deduplicated corpus instead: {false_alarms}/{args.trials} undrifted windows flagged, "
          f"{sum(dedup.drifted for kind, *_, dedup in results if kind == 'drifted')}/{args.trials} drifted")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
