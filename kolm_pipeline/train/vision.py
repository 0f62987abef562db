"""Vision-language bases (`AutoModelForImageTextToText`: SmolVLM, Idefics3, Qwen2.5-VL, ...): LoRA on the language
model, trained on rows whose text holds image placeholders, and greedy answers for evaluation.

A row's images are its placeholders (`<kolm-image sha256:…>`, capture/images.py), read from the image store by
digest; the processor's image token takes each one's place in the prompt, so the processor expands it into the
image's patches. The loss is on the answer tokens only. The adapter targets the language model's projections
(`LANGUAGE_MODULES`), and the vision tower's too with the `vision_tower` training setting.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kolm_pipeline.capture.images import PLACEHOLDER, ImageStore, split_placeholders
from kolm_pipeline.corpus.loading import quiet_loading
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.train.base_model import BaseModel

# Every linear projection of the language model's attention and MLP; with `vision_tower`, the vision tower's too.
LANGUAGE_MODULES = r".*(text_model|language_model)\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_AND_LANGUAGE_MODULES = (r".*(text_model|language_model|vision_model|vision_tower|visual)\..*\."
                               r"(q_proj|k_proj|v_proj|o_proj|out_proj|qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj)")


class VisionError(UserError):
    """A row's image cannot be read, or the base is no vision-language model."""


def load_vision(base: BaseModel):
    """The base as (model in float32 on CPU or bfloat16 on CUDA, eval mode; its processor)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with quiet_loading():
        model = AutoModelForImageTextToText.from_pretrained(
            str(base.path), dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        processor = AutoProcessor.from_pretrained(str(base.path))
    return model.to(device).eval(), processor


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def processor_digest(base: BaseModel) -> str:
    """sha256 over the base's processor and tokenizer files (name and bytes): what turns a request into input."""
    import hashlib

    digest = hashlib.sha256()
    for name in PROCESSOR_FILES:
        path = base.path / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _image(images: ImageStore | None, digest: str):
    from PIL import Image

    if images is None:
        raise VisionError(f"image {digest}: no image store to read it from")
    try:
        return Image.open(io.BytesIO(images.get(digest))).convert("RGB")
    except Exception as exc:  # a missing object, a damaged file: the row cannot be used
        raise VisionError(f"image {digest}: {exc}") from None


def render(processor, conversation: list[tuple[str, list[str | None]]], generation: bool = True) -> str:
    """The chat prompt of a conversation whose turns are (role, parts): a part is text, or None for an image. The
    one rendering training, evaluation and serving share: the processor's own chat template over typed parts (what
    SmolVLM, Idefics3 and Qwen2.5-VL ship: it places their image markers), or, where the template takes strings
    only (a text model's), that one with the processor's image token where each image is (parts joined by a
    newline)."""
    if getattr(processor, "chat_template", None):
        typed = [{"role": role, "content": [{"type": "image"} if part is None else {"type": "text", "text": part}
                                            for part in parts]} for role, parts in conversation]
        try:
            return processor.apply_chat_template(typed, tokenize=False, add_generation_prompt=generation)
        except Exception:  # noqa: BLE001 - a text model's template (strings only) handed down to the processor
            pass
    token = getattr(processor, "image_token", "<image>")
    turns = [{"role": role, "content": "\n".join(token if part is None else part for part in parts)}
             for role, parts in conversation]
    return processor.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)


def literal_image_token(processor, texts: list[str]) -> bool:
    """Whether a text holds the processor's image token itself (an HTML question, say): the processor would count it
    as an image, so such a conversation cannot be rendered faithfully."""
    token = getattr(processor, "image_token", None)
    return bool(token) and any(token in text for text in texts)


def prompt(processor, messages: list[dict], images: ImageStore | None, generation: bool = True):
    """(the chat prompt of corpus rows' messages, whose images are placeholders; the images in order); VisionError
    for a row that cannot be rendered (an image that cannot be read, the image token in its text)."""
    conversation, pictures = [], []
    for message in messages:
        text = str(message.get("content", ""))
        if literal_image_token(processor, [PLACEHOLDER.sub("", text)]):
            raise VisionError("the text itself holds the base's image token")
        pieces, digests = split_placeholders(text)
        parts: list[str | None] = []
        for index, piece in enumerate(pieces):
            if index > 0:
                piece = piece.removeprefix("\n")  # the newline the corpus joined the parts with
            if index < len(digests):
                piece = piece.removesuffix("\n")
            if piece:
                parts.append(piece)
            if index < len(digests):
                parts.append(None)
        conversation.append((message["role"], parts))
        pictures += [_image(images, digest) for digest in digests]
    return render(processor, conversation, generation), pictures


def _names(modules) -> str | list[str]:
    """PEFT's target modules as JSON: a pattern as it is, a set of names sorted."""
    return modules if isinstance(modules, str) else sorted(modules)


def _encode(processor, text: str, pictures: list):
    return processor(text=[text], images=[pictures] if pictures else None, return_tensors="pt")


def train_vision_adapter(rows: list[dict], base: BaseModel, output_dir: Path, config: TrainConfig,
                         images: ImageStore | None, on_log: Callable[[int, dict[str, float]], None] | None = None,
                         init_adapter: Path | None = None, trainer_version: str = ""):
    """Train a LoRA on the language model of `base` and write it to `output_dir` atomically; a TrainResult."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from kolm_pipeline.train.distill import TrainResult, peak_memory_mb

    torch.manual_seed(config.seed)
    model, processor = load_vision(base)
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        pattern = re.compile(VISION_AND_LANGUAGE_MODULES if config.vision_tower else LANGUAGE_MODULES)
        # Linear layers only: LoRA on a patch embedding's convolution could be trained, but not served.
        modules = [name for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)]
        model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                                 target_modules=modules, task_type="CAUSAL_LM"))
    device = next(model.parameters()).device
    examples, skipped = [], 0
    for row in rows:  # kept on the CPU; each step moves its own rows to the device
        try:
            text, pictures = prompt(processor, row["messages"][:-1], images)
        except VisionError:
            skipped += 1  # an image gone or unreadable, an image token in the text: this row only
            continue
        answer = str(row["messages"][-1]["content"]) + (processor.tokenizer.eos_token or "")
        full = _encode(processor, text + answer, pictures)
        prompt_length = _encode(processor, text, pictures)["input_ids"].shape[1]
        labels = full["input_ids"].clone()
        labels[:, :prompt_length] = -100
        examples.append((dict(full), labels))
    if not examples:
        raise VisionError(f"none of the {len(rows)} training rows could be read ({skipped} skipped)")
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    steps = max(1, math.ceil(config.epochs * len(examples) / config.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps)) * (1 - step / steps))
    loss_curve: list[tuple[int, float]] = []
    began, tokens, order = time.perf_counter(), 0, list(range(len(examples)))
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(steps):
        if step * config.batch_size % len(examples) < config.batch_size:
            order = torch.randperm(len(examples), generator=generator).tolist()
        batch = [order[(step * config.batch_size + i) % len(examples)] for i in range(config.batch_size)]
        total = 0.0
        for index in batch:
            inputs, labels = examples[index]
            inputs = {key: value.to(device) for key, value in inputs.items()}
            loss = model(**inputs, labels=labels.to(device)).loss / len(batch)
            loss.backward()
            total += loss.item()
            tokens += int(inputs["input_ids"].shape[1])
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        loss_curve.append((step + 1, total))
        if on_log is not None:
            on_log(step + 1, {"loss": total, "learning_rate": schedule.get_last_lr()[0]})
    wall = time.perf_counter() - began
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    result = TrainResult(adapter_dir=output_dir, examples=len(examples), steps=steps, train_tokens=tokens,
                         wall_seconds=wall, tokens_per_second=tokens / wall if wall > 0 else 0.0,
                         final_loss=loss_curve[-1][1], peak_memory_mb=peak_memory_mb(),
                         epochs=steps * config.batch_size / len(examples), loss_curve=loss_curve,
                         config={**config.model_dump(),
                                 "target_modules": _names(model.peft_config["default"].target_modules)})
    (staging / "kolm_training.json").write_text(json.dumps({
        "trainer_version": trainer_version, "base_model": base.model_id, "base_digest": base.digest,
        "vision": True, "processor": processor.__class__.__name__, "processor_digest": processor_digest(base),
        "skipped_rows": skipped,
        **result.metrics(), "config": result.config},
        indent=2))
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return result


def generate_answers(model, processor, conversations: list[list[dict]], images: ImageStore | None,
                     max_new_tokens: int) -> list[tuple[str, float]]:
    """Greedy answers (text, seconds) of `model` to each conversation, one at a time."""
    import torch

    answers = []
    device = next(model.parameters()).device
    for conversation in conversations:
        began = time.perf_counter()
        try:
            text, pictures = prompt(processor, conversation, images)
        except VisionError:  # no answer: the case counts as failed for every model alike
            answers.append(("", time.perf_counter() - began))
            continue
        inputs = {key: value.to(device) for key, value in _encode(processor, text, pictures).items()}
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append((answer.strip(), time.perf_counter() - began))
    return answers
