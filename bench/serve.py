"""`kolm serve`'s local backend under concurrent clients: answers/s with free-text (or JSON) generation batched
(`kolm serve --max-gen-batch N`) against one request at a time (cap 1), in alternating rounds on one backend.

    .venv/bin/python bench/serve.py                                  # embedded SmolLM2-135M, 4 clients, caps 1 and 8
    .venv/bin/python bench/serve.py --caps 1,2,4,8 --rounds 3 --requests 16 --max-tokens 64
    .venv/bin/python bench/serve.py --json                           # answers held to a small JSON schema

What it does: starts `TransformersBackend` in this process on the base model (`--base`, default the settings'
base: the embedded SmolLM2-135M), loads one LoRA adapter that changes nothing (PEFT's default initialisation,
B = 0, rank 16 on every linear layer: the base's own answers, through the serving code path), then, for every
round and every cap (the order of the caps reversed every other round), sets the cap and lets `--clients` threads
answer the same `--requests` demo tickets in a closed loop, each reading its answer piece by piece as `kolm
serve` does. Measured per round: answers/s (requests / wall time) and generated tokens/s; reported per cap: the
median over rounds. Greedy decoding is deterministic, so every cap must give every ticket the same answer: the
bench counts the tickets whose answer differed from the first cap's (expected 0 in float32 on a CPU; bfloat16
on a GPU may round differently in a batch). No HTTP: it measures the backend, not the server.

Requests and the model share the machine's cores: on a 2-core machine that is the whole budget, so run nothing
else beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kolm_pipeline.demo.tickets import QUEUES, generate_tickets  # noqa: E402
from kolm_pipeline.serve.backends import TransformersBackend  # noqa: E402
from kolm_pipeline.settings import load_settings  # noqa: E402

ADAPTER = "bench-noop"


def json_schema() -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["queue", "urgent", "summary"],
            "properties": {"queue": {"enum": sorted(QUEUES)}, "urgent": {"type": "boolean"},
                           "summary": {"type": "string"}}}


def noop_adapter(base_path: Path, target: Path) -> Path:
    """A rank-16 LoRA on every linear layer whose update is zero (PEFT's default B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path))
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(str(target))
    return target


def run_round(backend: TransformersBackend, conversations: list[list[dict]], clients: int, max_tokens: int,
              schema: dict | None, adapter: str = ADAPTER) -> tuple[float, list[str], int]:
    """(wall seconds, the answers in request order, generated tokens) for one closed-loop round of ``clients``
    threads answering ``conversations`` with ``adapter``, each reading its answer piece by piece."""
    answers: list[str | None] = [None] * len(conversations)
    tokens = [0] * len(conversations)
    errors: list[BaseException] = []
    next_index = iter(range(len(conversations)))
    claim = threading.Lock()

    def client() -> None:
        while True:
            with claim:
                index = next(next_index, None)
            if index is None:
                return
            usage: dict = {}
            try:
                answers[index] = "".join(backend.stream(adapter, conversations[index], None, max_tokens, usage,
                                                        json_schema=schema))
            except BaseException as exc:  # noqa: BLE001 - reported after the round
                errors.append(exc)
                return
            tokens[index] = usage.get("completion_tokens", 0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    return wall, [answer or "" for answer in answers], sum(tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model (default: the settings' base, the embedded SmolLM2-135M)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="tickets answered per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per cap")
    parser.add_argument("--caps", default="1,8", help="comma-separated `--max-gen-batch` values to compare")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="hold every answer to a small JSON schema")
    parser.add_argument("--json-out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    caps = [int(cap) for cap in args.caps.split(",")]
    if not caps or min(caps) < 1:
        parser.error("--caps: positive integers")

    from kolm_pipeline.train.base_model import resolve_base_model

    settings = load_settings()
    base_name = args.base or settings.base_model
    backend = TransformersBackend(base_name, settings.models_dir, max_gen_batch=max(caps))
    backend.start()
    device = str(backend._device())
    with tempfile.TemporaryDirectory(prefix="kolm-bench-serve-") as scratch:
        adapter = noop_adapter(resolve_base_model(base_name, settings.models_dir).path, Path(scratch) / "adapter")
        backend.load(ADAPTER, adapter, None, ready=lambda: None)
    schema = json_schema() if args.json else None
    conversations = [ticket.messages() for ticket in generate_tickets(args.requests, seed=5)]
    print(f"bench/serve.py: {base_name} on {device}, {args.clients} clients, {args.requests} requests a round, "
          f"max_tokens {args.max_tokens}, {'JSON' if schema else 'free text'}, caps {caps}", flush=True)

    backend.max_gen_batch = max(caps)
    run_round(backend, conversations[: args.clients], args.clients, args.max_tokens, schema)  # warm-up, untimed

    rounds: dict[int, list[dict]] = {cap: [] for cap in caps}
    reference: list[str] | None = None
    differing: dict[int, int] = {cap: 0 for cap in caps}
    for number in range(args.rounds):
        for cap in (caps if number % 2 == 0 else caps[::-1]):
            backend.max_gen_batch = cap
            wall, answers, tokens = run_round(backend, conversations, args.clients, args.max_tokens, schema)
            if reference is None:
                reference = answers
            differing[cap] = max(differing[cap], sum(a != b for a, b in zip(answers, reference, strict=True)))
            rounds[cap].append({"seconds": wall, "answers_per_s": len(conversations) / wall,
                                "tokens_per_s": tokens / wall, "tokens": tokens})
            print(f"  round {number + 1} cap {cap}: {len(conversations) / wall:.2f} answers/s, "
                  f"{tokens / wall:.1f} tokens/s ({wall:.1f} s, {tokens} tokens)", flush=True)
    backend.close()

    print("\n| cap | answers/s (median) | tokens/s (median) | rounds (answers/s) | answers ≠ first cap's |")
    print("|---|---|---|---|---|")
    summary = {}
    for cap in caps:
        rate = statistics.median(r["answers_per_s"] for r in rounds[cap])
        token_rate = statistics.median(r["tokens_per_s"] for r in rounds[cap])
        listed = ", ".join(f"{r['answers_per_s']:.2f}" for r in rounds[cap])
        print(f"| {cap} | {rate:.2f} | {token_rate:.1f} | {listed} | {differing[cap]} |")
        summary[cap] = {"answers_per_s": rate, "tokens_per_s": token_rate, "rounds": rounds[cap],
                        "answers_differing": differing[cap]}
    if args.json_out:
        args.json_out.write_text(json.dumps({"base": base_name, "device": device, "clients": args.clients,
                                             "requests": args.requests, "max_tokens": args.max_tokens,
                                             "json": bool(schema), "caps": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
