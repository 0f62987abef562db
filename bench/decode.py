"""Decoding cost per step by batch size and weight dtype, side by side in one run: the embedded base with an
adapter attached unmerged (as evaluation runs it), random prompts of 90 tokens, 30 greedy steps, two rounds.

    .venv/bin/python bench/decode.py --adapter KOLM_HOME/work/<task>/adapter    # e.g. after `kolm demo`
    .venv/bin/python bench/decode.py --adapter ... --widths 1,2,4,8 --batches 1,4,8,32   # float32 only

It chose evaluation's generation batch (`evaluate/inference.py: GENERATION_BATCH`); with `--widths`, the cost of a
decoding pass that reads several tokens per row (jump-forward of JSON rows), which chose `evaluate/decoding.py:
CPU_PASS_TOKENS`. Figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_TOKENS = 90
STEPS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a PEFT adapter directory for the embedded base")
    parser.add_argument("--batches", default="8,32", help="batch sizes to compare (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--widths", help="tokens read per row in one pass, compared per batch size (float32)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.train.base_model import resolve_base_model

    settings = load_settings()
    base = resolve_base_model(settings.base_model, settings.models_dir)
    dtypes = (torch.float32,) if args.widths else (torch.float32, torch.bfloat16)
    models = {
        dtype: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype),
                                         args.adapter).eval()
        for dtype in dtypes
    }
    if args.widths:
        widths(models[torch.float32], [int(v) for v in args.batches.split(",")],
               [int(v) for v in args.widths.split(",")], args.rounds)
        return
    for _ in range(args.rounds):
        for dtype, model in models.items():
            for size in (int(value) for value in args.batches.split(",")):
                ids = torch.randint(100, 40000, (size, PROMPT_TOKENS))
                with torch.inference_mode():
                    began = time.perf_counter()
                    out = model(input_ids=ids, use_cache=True)
                    prefill = time.perf_counter() - began
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    began = time.perf_counter()
                    for _step in range(STEPS):
                        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                        token = out.logits[:, -1].argmax(-1, keepdim=True)
                    decode = time.perf_counter() - began
                print(f"{str(dtype):15} batch {size:3}: prefill {prefill * 1000:6.0f} ms, "
                      f"{decode / STEPS * 1000:6.1f} ms/step, {size * STEPS / decode:6.1f} tokens/s", flush=True)


def widths(model, sizes: list[int], widths: list[int], rounds: int) -> None:
    """ms per decoding pass reading `width` tokens in each of `size` rows (after a 90-token prompt), and that
    per token read, width by width in alternating order per round."""
    import statistics

    import torch

    timings: dict[tuple[int, int], list[float]] = {}
    for round_index in range(rounds):
        for size in sizes:
            ids = torch.randint(100, 40000, (size, PROMPT_TOKENS))
            with torch.inference_mode():
                prompt = model(input_ids=ids, use_cache=True).past_key_values
                for width in widths if round_index % 2 == 0 else widths[::-1]:
                    feed = torch.randint(100, 40000, (size, width))
                    began = time.perf_counter()
                    for _step in range(STEPS // 3):
                        model(input_ids=feed, past_key_values=prompt, use_cache=True, logits_to_keep=1)
                        prompt.crop(-width)  # back to the prompt: every pass reads after the same 90 tokens
                    timings.setdefault((size, width), []).append((time.perf_counter() - began) / (STEPS // 3))
    for (size, width), values in sorted(timings.items()):
        ms = statistics.median(values) * 1000
        base = statistics.median(timings[(size, widths[0])]) * 1000
        print(f"rows {size:3} width {width:2}: {ms:6.1f} ms/pass ({ms / base:4.2f}x width {widths[0]}), "
              f"{size * width / ms * 1000:7.1f} tokens read/s", flush=True)


if __name__ == "__main__":
    main()
