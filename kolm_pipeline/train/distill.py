"""LoRA distillation: train a PEFT adapter on a recipe's train split with trl's SFTTrainer.

The loss covers the assistant answer only (prompt/completion format), the base model's chat template
renders every example, and the adapter is written in plain PEFT format so vLLM and PEFT load it as is.
The output directory appears only when training finished: a crash leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kolm_pipeline.capture.images import ImageStore
from kolm_pipeline.corpus.loading import fast_bf16, quiet_loading
from kolm_pipeline.corpus.pairs import scan_pair_file
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.train.base_model import BaseModel, load_tokenizer
from kolm_pipeline.train.examples import ExampleError, tokenize_pairs

TRAINER_VERSION = "kolm-distill/0.1"

# glibc returns every large tensor's memory to the OS and faults it back in on the next step; with a
# 49k-token vocabulary that page-fault traffic costs more than the math on CPU, so freed memory stays in the
# heap (bench/train.py, docs/benchmarks.md). Set for the trainer process.
TRAINER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "TOKENIZERS_PARALLELISM": "false"}


class TrainingError(UserError):
    """Training could not run; the message names the input that is wrong."""


@dataclass
class TrainResult:
    """What training produced and how it went."""

    adapter_dir: Path
    examples: int
    steps: int
    train_tokens: int
    wall_seconds: float
    tokens_per_second: float
    final_loss: float
    peak_memory_mb: float
    truncated: int = 0
    epochs: float = 0.0  # as run: the configured epochs, or fewer under the max_examples budget
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {
            "examples": self.examples,
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "train_tokens": self.train_tokens,
            "wall_seconds": round(self.wall_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "final_loss": round(self.final_loss, 5),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "truncated_pairs": self.truncated,
        }


def read_chat_jsonl(path: Path) -> list[dict]:
    """Rows of a chat-pair JSONL file; bad lines are an error naming the file and each line."""
    rows, problems = scan_pair_file(path)
    if problems:
        raise TrainingError("; ".join(problems))
    return rows


def planned_epochs(config: TrainConfig, pairs: int) -> float:
    """The configured epochs, cut so that at most `max_examples` pairs are seen in all."""
    if config.max_examples is None or pairs * config.epochs <= config.max_examples:
        return config.epochs
    return config.max_examples / pairs


def _attention(use_cuda: bool) -> str:
    """The attention kernel to train with. On CPU, torch's fused SDPA backward is slow for the short
    sequences of distillation pairs; plain matmul attention trains faster (bench/train.py) to the same
    adapter quality. CUDA keeps SDPA's fused kernels."""
    return "sdpa" if use_cuda else "eager"


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_adapter(
    train_path: Path,
    base: BaseModel,
    output_dir: Path,
    config: TrainConfig,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
    init_adapter: Path | None = None,
    images: ImageStore | None = None,
    labels: list[str] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `train_path` and write it to `output_dir` atomically.

    With `init_adapter` (continual training) the champion's adapter is the starting point instead of a
    fresh LoRA; its rank and target modules then win over `config`'s. A vision-language base trains on the
    language model, reading the rows' images from `images` (train/vision.py). With `labels` (a closed-vocabulary
    recipe's) and `config.label_loss`, answers are scored among the labels only (answer_loss.py)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTConfig, pack_dataset

    from kolm_pipeline.train.answer_loss import AnswerLossTrainer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = read_chat_jsonl(train_path)
    if not rows:
        raise TrainingError(f"{train_path}: no training pairs")
    if base.vision:
        from kolm_pipeline.train.vision import train_vision_adapter

        return train_vision_adapter(rows, base, output_dir, config, images, on_log=on_log, init_adapter=init_adapter,
                                    trainer_version=TRAINER_VERSION)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base)
    use_cuda = torch.cuda.is_available()
    # Recorded as it was trained: the kernel chosen for this hardware, not null.
    config = config.model_copy(update={"attention": config.attention or _attention(use_cuda)})
    bf16 = fast_bf16(use_cuda) if config.bf16 is None else config.bf16
    # Under bf16 autocast the frozen base is loaded in bf16: autocast would otherwise cast every fp32 weight again
    # at each step for the same bf16 values (docs/benchmarks.md, session 18). The LoRA weights peft adds stay fp32;
    # whole modules trained as copies (`modules_to_save`) would not, so those keep fp32.
    weights_dtype = torch.bfloat16 if bf16 and not config.modules_to_save else torch.float32
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=weights_dtype,
                                                     attn_implementation=config.attention)
    available = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)})
    if config.target_modules != "all-linear":
        unknown = [name for name in config.target_modules if name not in available]
        if unknown:
            raise TrainingError(f"unknown target module(s) {unknown}; this base has {available}")

    try:
        tokenized = tokenize_pairs(tokenizer, rows, config.max_length, source=str(train_path),
                                   labels=labels if config.label_loss else None)
    except ExampleError as exc:
        raise TrainingError(str(exc)) from exc
    if not tokenized.examples:
        raise TrainingError(f"{train_path}: no pair has answer tokens within max_length={config.max_length}")
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    loss_curve: list[tuple[int, float]] = []

    class _Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                loss_curve.append((state.global_step, float(logs["loss"])))
            if logs and on_log is not None:
                on_log(state.global_step, {k: float(v) for k, v in logs.items() if isinstance(v, int | float)})

    class _QuietProgress(ProgressCallback):
        """The progress bar without a dict printed under it at every logging step (MLflow has them)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    epochs = planned_epochs(config, len(tokenized.examples))
    args = SFTConfig(
        output_dir=str(staging / "trainer"),
        num_train_epochs=epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=None,  # examples are truncated at tokenization (and counted there)
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not use_cuda,
        bf16=bf16,
        # Packed examples (below) go through padding-free: position ids keep the pairs apart.
        padding_free=config.packing,
        train_sampling_strategy="group_by_length" if config.length_grouped and not config.packing else "random",
        activation_checkpointing=config.activation_checkpointing,
        dataloader_num_workers=0,
        neftune_noise_alpha=config.neftune_alpha,
        disable_tqdm=not show_progress,
    )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        task_type="CAUSAL_LM",
    )
    if init_adapter is not None:
        from peft import PeftModel

        if not (init_adapter / "adapter_config.json").is_file():
            raise TrainingError(f"{init_adapter}: not a PEFT adapter directory (no adapter_config.json)")
        with quiet_loading():
            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    dataset = Dataset.from_list(tokenized.examples)
    if config.packing:
        # Best-fit decreasing into rows of max_length, weights packed alongside the labels.
        dataset = pack_dataset(dataset, config.max_length, "bfd")
    with quiet_loading():  # the trainer wraps the model in a PeftModel here
        trainer = AnswerLossTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=None if init_adapter is not None else lora,
            callbacks=[_Reporter()],
        )
    if show_progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_QuietProgress())
    train_tokens = tokenized.tokens
    began = time.perf_counter()
    outcome = trainer.train()
    wall = time.perf_counter() - began
    trainer.model.save_pretrained(str(staging / "adapter"))
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    epochs_run = max(epochs, 1e-9)
    result = TrainResult(
        adapter_dir=output_dir,
        examples=len(rows),
        steps=outcome.global_step,
        epochs=epochs,
        train_tokens=train_tokens,
        wall_seconds=wall,
        tokens_per_second=train_tokens * epochs_run / wall if wall > 0 else 0.0,
        final_loss=loss_curve[-1][1] if loss_curve else float(outcome.training_loss),
        peak_memory_mb=peak_memory_mb(),
        truncated=tokenized.truncated,
        loss_curve=loss_curve,
        config=config.model_dump(),
    )
    (staging / "adapter" / "kolm_training.json").write_text(
        json.dumps({"trainer_version": TRAINER_VERSION, "base_model": base.model_id,
                    "base_digest": base.digest, "base_dtype": str(weights_dtype).removeprefix("torch."),
                    **result.metrics(), "config": result.config}, indent=2)
    )
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging / "adapter", output_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return result
