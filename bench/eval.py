"""Evaluation throughput on the embedded base, side by side in one run: eval cases per second with
batched constrained decoding (kolm's evaluator) vs one case at a time.

    .venv/bin/python bench/eval.py            # 96 ticket cases, 6 labels, 3 alternating rounds

Both paths score the same label set with the same shared-prefix KV cache; only the batch size differs.
Rounds alternate so background load hits both alike; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from kolm_pipeline.demo.tickets import QUEUES, generate_tickets
    from kolm_pipeline.evaluate.inference import predict_labels
    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.train.base_model import load_causal_lm, load_tokenizer, resolve_base_model

    settings = load_settings()
    base = resolve_base_model(settings.base_model, settings.models_dir)
    model, tokenizer = load_causal_lm(base), load_tokenizer(base)
    conversations = [ticket.messages() for ticket in generate_tickets(args.cases, seed=9)]
    labels = sorted(QUEUES)
    predict_labels(model, tokenizer, conversations[:4], labels, batch_size=4)  # warm-up

    rates: dict[str, list[float]] = {"batched": [], "one at a time": []}
    answers: dict[str, list[str]] = {}
    for round_index in range(args.rounds):
        for name, batch_size in (("batched", args.batch_size), ("one at a time", 1)):
            began = time.perf_counter()
            predictions = predict_labels(model, tokenizer, conversations, labels, batch_size=batch_size)
            rate = len(conversations) / (time.perf_counter() - began)
            rates[name].append(rate)
            answers[name] = [p.output for p in predictions]
            print(f"round {round_index + 1} {name:<14} {rate:7.2f} cases/s", flush=True)
    agree = sum(a == b for a, b in zip(answers["batched"], answers["one at a time"], strict=True))
    batched, single = statistics.median(rates["batched"]), statistics.median(rates["one at a time"])
    print(f"\n{args.cases} cases, {len(labels)} labels, base {base.model_id}, {os.cpu_count()} CPUs")
    print(f"  batched (batch {args.batch_size}) median {batched:.2f} cases/s")
    print(f"  one at a time        median {single:.2f} cases/s")
    print(f"  batched / one-at-a-time: {batched / single:.2f}x; identical answers on {agree}/{len(conversations)}")


if __name__ == "__main__":
    main()
