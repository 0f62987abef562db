"""Decoding cost per step by batch size and weight dtype, side by side in one run: the embedded base with an
adapter attached unmerged (as evaluation runs it), random prompts of 90 tokens, 30 greedy steps, two rounds.

    .venv/bin/python bench/decode.py --adapter KOLM_HOME/work/<task>/adapter    # e.g. after `kolm demo`

It chose evaluation's generation batch (`evaluate/inference.py: GENERATION_BATCH`); figures in docs/benchmarks.md.
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.train.base_model import resolve_base_model

    settings = load_settings()
    base = resolve_base_model(settings.base_model, settings.models_dir)
    models = {
        dtype: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype),
                                         args.adapter).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }
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


if __name__ == "__main__":
    main()
