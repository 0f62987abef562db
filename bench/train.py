"""Trainer throughput, side by side in one run: kolm's trainer vs a plain trl `SFTTrainer` with default
settings (padding, no packing, fp32, trl's default activation checkpointing, default allocator), on the same
pairs, the same base, the same LoRA. kolm's differences: the LM head scores answer positions only, no
activation checkpointing, bf16 autocast where the CPU has bf16 matmuls, plain matmul attention on CPU
(`--attention` picks another), and an allocator that keeps freed memory (TRAINER_ENV).

    .venv/bin/python bench/train.py                 # embedded base, 240 ticket pairs, 2 rounds
    .venv/bin/python bench/train.py --pairs 1000 --epochs 1 --rounds 1 --only kolm   # time to distill 1,000

Each variant runs in its own process (the allocator setting is per process) and the rounds alternate
A, B, A, B so background load hits both alike. Tokens/s counts real (non-padding) tokens per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_pairs(path: Path, count: int) -> None:
    from kolm_pipeline.demo.tickets import generate_tickets

    rows = [{"messages": [*t.messages(), {"role": "assistant", "content": t.queue}]}
            for t in generate_tickets(count, seed=3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_plain(train: Path, base_path: Path, epochs: float, batch_size: int) -> dict:
    """trl SFTTrainer with its defaults: the reference a user would write first."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in train.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": [r["messages"][-1]]} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                           learning_rate=2e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                           disable_tqdm=True),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        began = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - began
    return {"wall_seconds": wall, "tokens_per_second": tokens * epochs / wall}


def run_kolm(train: Path, base_path: Path, epochs: float, batch_size: int, attention: str | None = None) -> dict:
    from kolm_pipeline.train.base_model import BaseModel
    from kolm_pipeline.train.distill import TrainConfig, train_adapter

    base = BaseModel(model_id=str(base_path), path=base_path, digest="bench")
    with tempfile.TemporaryDirectory() as out:
        result = train_adapter(train, base, Path(out) / "adapter",
                               TrainConfig(epochs=epochs, batch_size=batch_size, attention=attention),
                               show_progress=False)
    return {"wall_seconds": result.wall_seconds, "tokens_per_second": result.tokens_per_second}


def child(args: argparse.Namespace) -> None:
    if args.child == "kolm":
        attention = None if args.attention == "auto" else args.attention
        figures = run_kolm(Path(args.train), Path(args.base_path), args.epochs, args.batch_size, attention)
    else:
        figures = run_plain(Path(args.train), Path(args.base_path), args.epochs, args.batch_size)
    print("RESULT " + json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["plain", "kolm"])
    parser.add_argument("--attention", choices=["auto", "sdpa", "eager"], default="auto",
                        help="kolm trainer's attention kernel (TrainConfig.attention); auto: the trainer's "
                             "default, eager on CPU and SDPA on CUDA")
    parser.add_argument("--child", choices=["plain", "kolm"], help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--base-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.train.base_model import resolve_base_model
    from kolm_pipeline.train.distill import TRAINER_ENV

    settings = load_settings()
    base = resolve_base_model(settings.base_model, settings.models_dir)
    variants = [args.only] if args.only else ["plain", "kolm"]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as scratch:
        train = Path(scratch) / "train.jsonl"
        write_pairs(train, args.pairs)
        for round_index in range(args.rounds):
            for name in variants:
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                for key in TRAINER_ENV:
                    env.pop(key, None)
                if name == "kolm":
                    env.update(TRAINER_ENV)
                command = [sys.executable, __file__, "--child", name, "--train", str(train), "--base-path",
                           str(base.path), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                           "--attention", args.attention]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
                figures = json.loads(line.removeprefix("RESULT "))
                results[name].append(figures)
                print(f"round {round_index + 1} {name:<6} {figures['tokens_per_second']:8.1f} tokens/s "
                      f"{figures['wall_seconds']:7.1f} s", flush=True)
    print(f"\n{args.pairs} pairs x {args.epochs} epoch(s), batch {args.batch_size}, base {base.model_id}, "
          f"{os.cpu_count()} CPUs")
    medians = {name: statistics.median(r["tokens_per_second"] for r in runs) for name, runs in results.items()}
    for name, value in medians.items():
        wall = statistics.median(r["wall_seconds"] for r in results[name])
        print(f"  {name:<6} median {value:8.1f} tokens/s, {wall:7.1f} s per run")
    if len(medians) == 2:
        print(f"  kolm / plain tokens/s ratio: {medians['kolm'] / medians['plain']:.2f}x")


if __name__ == "__main__":
    main()
