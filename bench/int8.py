"""Dynamic int8 weights for a CPU without bfloat16 matmuls, measured, not adopted: a JSON adapter's answers in
float32 against the same adapter with its linear layers quantized to int8 (torch's dynamic quantization, weights
per output channel), side by side in one process.

    .venv/bin/python bench/int8.py --home /tmp/qb/snips1     # after bench/quality.py --set snips-json --home ...
    .venv/bin/python bench/int8.py --home ... --cases 96

What it does: merges the adapter the quality bench trained (`HOME/work/bench.<namespace>/adapter`) into the settings'
base model in float32 (PEFT's merge: the arithmetic a LoRA slot uses on a CPU), makes two int8 copies of it — every
linear layer, and every one but the output head — and answers the first `--cases` eval cases of the recipe
(`HOME/work/bench.<namespace>/recipe`) with evaluation's own decoding (`generate_texts`: batches of 4, the
recipe's schema and generation budget, drafts on), each variant in turn. It prints each variant's wall time, its
whole-object exact matches against the teacher and how many answers equal float32's. int8 would change what is
served, so the gate would have to evaluate it in int8 too; docs/benchmarks.md (session 21) has the figures. Run
nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # noqa: E402

import kolm_pipeline.evaluate.structured as structured  # noqa: E402
from kolm_pipeline.corpus.recipe import load_recipe  # noqa: E402
from kolm_pipeline.evaluate.evaluation import generation_budget  # noqa: E402
from kolm_pipeline.evaluate.inference import generate_texts  # noqa: E402
from kolm_pipeline.settings import load_settings  # noqa: E402
from kolm_pipeline.train.base_model import load_causal_lm, load_tokenizer, resolve_base_model  # noqa: E402

# A quantized layer has no `weight` tensor for the logits' width to be read from; the config says it.
structured.vocab_size = lambda model: int(model.config.vocab_size)


def parsed(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, type=Path, help="KOLM_HOME of a bench/quality.py --set snips-json run")
    parser.add_argument("--namespace", default="snips-json", help="the set's namespace (bench.<namespace>)")
    parser.add_argument("--cases", type=int, default=48, help="eval cases to answer (default 48)")
    args = parser.parse_args()
    work = args.home / "work" / f"bench.{args.namespace}"
    if not (work / "adapter").is_dir():
        raise SystemExit(f"{work / 'adapter'}: no adapter; run bench/quality.py --home {args.home} first")
    settings = load_settings()
    base = resolve_base_model(settings.base_model, settings.models_dir)
    tokenizer = load_tokenizer(base)

    def merged():
        return PeftModel.from_pretrained(load_causal_lm(base, "float32"), str(work / "adapter")).merge_and_unload()

    def int8(skip_head: bool):
        model = merged()
        layers = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                  and not (skip_head and module is model.get_output_embeddings())}
        return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in layers})

    recipe = load_recipe(work / "recipe")
    schema, budget, rows = recipe.spec["json_schema"], generation_budget(tokenizer, recipe), recipe.eval[: args.cases]
    conversations = [row["messages"][:-1] for row in rows]
    gold = [parsed(row["messages"][-1]["content"]) for row in rows]
    variants = [("float32 (merged)", merged().eval()), ("int8, every linear layer", int8(False).eval()),
                ("int8, the output head float32", int8(True).eval())]
    reference: list[str] | None = None
    print(f"| {len(rows)} eval cases, batches of 4 | wall s | whole object exact | answers equal to float32's |")
    print("|---|---|---|---|")
    for name, model in variants:
        began = time.perf_counter()
        answers = [p.output for p in generate_texts(model, tokenizer, conversations, budget, batch_size=4,
                                                    json_schema=schema)]
        wall = time.perf_counter() - began
        reference = reference or answers
        exact = sum(parsed(answer) == expected for answer, expected in zip(answers, gold, strict=True))
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        print(f"| {name} | {wall:.1f} | {exact} | {same} |", flush=True)


if __name__ == "__main__":
    main()
