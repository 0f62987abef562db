"""`kolm serve`'s JSON answers with and without decoding drafts (`evaluate/drafting.py`), side by side on one
backend: a trained adapter, its recipe's schema and held-out requests of a `bench/quality.py` set.

    .venv/bin/python bench/drafts.py --home /tmp/qb/snips0     # after bench/quality.py --home /tmp/qb/snips0
    .venv/bin/python bench/drafts.py --home ... --requests 64 --rounds 3 --clients 4
    .venv/bin/python bench/drafts.py --home ... --compare merge  # LoRA slots merged or not (drafts on)

What it does: starts `TransformersBackend` in this process on the settings' base model (in KOLM_INFERENCE_DTYPE),
loads the adapter the quality bench deployed (`HOME/work/bench.<namespace>/adapter`) and reads the schema from its
recipe (`HOME/work/bench.<namespace>/recipe/spec.json`), then, for every round, answers the first `--requests`
held-out requests of the set from `--clients` threads in a closed loop (bench/serve.py's round), drafting off and on
(the order swapped every other round): answers/s (median over rounds), decoding passes per answer, and the answers
that differ between the two (none in float32; in bfloat16 a batch of another shape can flip a near-tie). No HTTP:
it measures the backend, as bench/serve.py does. Run nothing else beside it.

With `--compare merge` the two sides are the same adapter loaded twice into the backend's LoRA slots, once as its
low-rank update and once merged into a copy of each layer's weight (`evaluate/lora_slots.py`; a CPU's default), both
with drafts on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import DATA, SETS, TENANT, messages, read_rows  # noqa: E402
from serve import run_round  # noqa: E402  (bench/serve.py: one closed-loop round of client threads)

from kolm_pipeline.evaluate.decoding import BatchDecoder  # noqa: E402
from kolm_pipeline.serve.backends import TransformersBackend  # noqa: E402
from kolm_pipeline.settings import load_settings  # noqa: E402

ADAPTER = "bench-drafts"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True, help="a bench/quality.py --home that deployed an adapter")
    parser.add_argument("--set", default="snips-json", choices=[name for name, s in SETS.items() if s.kind == "json"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48, help="held-out requests answered per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per side")
    parser.add_argument("--max-tokens", type=int, default=138, help="each answer's room (the recipe's default)")
    parser.add_argument("--compare", choices=["drafts", "merge"], default="drafts",
                        help="drafts off and on (default), or the adapter's update against it merged")
    parser.add_argument("--json-out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    bench = SETS[args.set]
    work = args.home / "work" / f"{TENANT}.{bench.namespace}"
    schema = json.loads((work / "recipe" / "spec.json").read_text())["json_schema"]
    conversations = [messages(bench, row["text"])
                     for row in read_rows(DATA / bench.heldout_file)[: args.requests]]

    settings = load_settings()
    backend = TransformersBackend(settings.base_model, settings.models_dir, dtype=settings.inference_dtype)
    backend.start()
    # Each side: (the adapter's name in the backend, drafting on).
    if args.compare == "merge":  # the same adapter twice: side "off" its low-rank update, side "on" merged
        sides = {"off": (f"{ADAPTER}-update", True), "on": (ADAPTER, True)}
        for (name, _drafting), merge in zip(sides.values(), (False, True), strict=True):
            backend._slots.merge = merge
            backend.load(name, work / "adapter", None, ready=lambda: None)
    else:
        sides = {"off": (ADAPTER, False), "on": (ADAPTER, True)}
        backend.load(ADAPTER, work / "adapter", None, ready=lambda: None)
    compared = "merged" if args.compare == "merge" else "drafts"
    passes = {"count": 0}
    original = BatchDecoder.decode

    def counted(self, batch):
        passes["count"] += 1
        return original(self, batch)

    BatchDecoder.decode = counted  # counts the decoding passes (instrumentation only)
    decoder = backend._generation._passes
    print(f"bench/drafts.py: {bench.description}, {len(conversations)} requests a round, {args.clients} clients, "
          f"gen batch cap {backend.max_gen_batch}, {decoder.pass_tokens} row-tokens a pass, "
          f"{next(backend._model.parameters()).dtype}", flush=True)
    for name in {name for name, _drafting in sides.values()}:  # warm-up
        run_round(backend, conversations[: args.clients], args.clients, args.max_tokens, schema, name)

    rounds: dict[str, list[dict]] = {side: [] for side in sides}
    answers: dict[str, list[str]] = {}
    for number in range(args.rounds):
        for side in (list(sides) if number % 2 == 0 else list(sides)[::-1]):
            name, decoder.drafting = sides[side]
            decoder.drafters.clear()  # every round starts knowing no earlier answer
            passes["count"] = 0
            wall, given, _tokens = run_round(backend, conversations, args.clients, args.max_tokens, schema, name)
            answers.setdefault(side, given)
            rounds[side].append({"seconds": wall, "answers_per_s": len(conversations) / wall,
                                 "passes_per_answer": passes["count"] / len(conversations)})
            print(f"  round {number + 1} {compared} {side}: {len(conversations) / wall:.2f} answers/s, "
                  f"{passes['count'] / len(conversations):.1f} passes an answer ({wall:.1f} s)", flush=True)
    float32 = next(backend._model.parameters()).dtype == torch.float32
    backend.close()
    differing = sum(a != b for a, b in zip(answers["off"], answers["on"], strict=True))

    print(f"\n| {compared} | answers/s (median) | decoding passes an answer | rounds (answers/s) |")
    print("|---|---|---|---|")
    summary = {}
    for side in sides:
        rate = statistics.median(r["answers_per_s"] for r in rounds[side])
        per_answer = statistics.median(r["passes_per_answer"] for r in rounds[side])
        listed = ", ".join(f"{r['answers_per_s']:.2f}" for r in rounds[side])
        print(f"| {side} | {rate:.2f} | {per_answer:.1f} | {listed} |")
        summary[side] = {"answers_per_s": rate, "passes_per_answer": per_answer, "rounds": rounds[side]}
    ratio = summary["on"]["answers_per_s"] / summary["off"]["answers_per_s"]
    print(f"\n{compared} on / off: {ratio:.2f}x answers/s; answers that differ: {differing} of {len(conversations)}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"set": args.set, "compare": args.compare, "clients": args.clients,
                                             "sides": summary, "ratio": ratio, "answers_differing": differing},
                                            indent=2))
    return 1 if differing and float32 and args.compare == "drafts" else 0  # in float32 drafts change no answer


if __name__ == "__main__":
    raise SystemExit(main())
