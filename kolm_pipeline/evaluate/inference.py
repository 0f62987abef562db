"""Batched inference for evaluation and serving.

Categorical tasks are decoded constrained to the label set: every label (plus the end-of-turn marker)
is scored under the model and the most likely one wins, so the output is always a valid label. The
prompt is run once per case and its KV cache is shared by all labels, which makes scoring a label set
cost little more than one forward pass of the prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prediction:
    """One model answer and how long the batch it was part of took per case."""

    output: str
    seconds: float


def render_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def label_continuations(tokenizer, messages: list[dict], labels: list[str]) -> list[list[int]]:
    """Token ids the chat template appends after the generation prompt for each label answer.

    Derived from the template itself so the end-of-turn marker is scored too, which stops a label
    that is a prefix of another from winning by being shorter.
    """
    prompt = render_prompt(tokenizer, messages)
    continuations = []
    for label in labels:
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": label}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError("chat template renders the answer in a way that does not extend the prompt")
        continuations.append(tokenizer(full[len(prompt) :].rstrip("\n"), add_special_tokens=False).input_ids)
    return continuations


def _left_padded(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


@torch.inference_mode()
def score_labels(model, tokenizer, batch: list[list[dict]], labels: list[str]) -> list[list[float]]:
    """Log-probability of every label for every conversation in `batch`."""
    device = next(model.parameters()).device
    continuations = label_continuations(tokenizer, batch[0], labels)
    prompt_ids, prompt_mask = _left_padded(tokenizer, [render_prompt(tokenizer, m) for m in batch], device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True
    )
    first_logp = prompt_out.logits[:, -1, :].float().log_softmax(-1)
    cache = prompt_out.past_key_values
    n_labels = len(labels)
    cache.batch_repeat_interleave(n_labels)

    width = max(len(ids) for ids in continuations)
    label_ids = torch.zeros((n_labels, width), dtype=torch.long)
    label_mask = torch.zeros((n_labels, width), dtype=torch.long)
    for row, ids in enumerate(continuations):
        label_ids[row, : len(ids)] = torch.tensor(ids)
        label_mask[row, : len(ids)] = 1
    label_ids = label_ids.repeat(len(batch), 1).to(device)
    label_mask = label_mask.repeat(len(batch), 1).to(device)
    full_mask = torch.cat([prompt_mask.repeat_interleave(n_labels, dim=0), label_mask], dim=1)
    start = prompt_mask.sum(-1).repeat_interleave(n_labels).unsqueeze(1)
    label_positions = start + torch.arange(width, device=device).unsqueeze(0)
    label_out = model(
        input_ids=label_ids,
        attention_mask=full_mask,
        position_ids=label_positions,
        past_key_values=cache,
        use_cache=False,
    )
    next_logp = label_out.logits.float().log_softmax(-1)

    scores: list[list[float]] = []
    for case in range(len(batch)):
        row_scores = []
        for index, ids in enumerate(continuations):
            flat = case * n_labels + index
            total = first_logp[case, ids[0]].item()
            for step in range(1, len(ids)):
                total += next_logp[flat, step - 1, ids[step]].item()
            row_scores.append(total)
        scores.append(row_scores)
    return scores


def predict_labels(
    model, tokenizer, conversations: list[list[dict]], labels: list[str], batch_size: int = 16
) -> list[Prediction]:
    """The most likely label for each conversation, scored in batches."""
    predictions: list[Prediction] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        began = time.perf_counter()
        scores = score_labels(model, tokenizer, batch, labels)
        per_case = (time.perf_counter() - began) / len(batch)
        for row in scores:
            best = max(range(len(labels)), key=row.__getitem__)
            predictions.append(Prediction(output=labels[best], seconds=per_case))
    return predictions


@torch.inference_mode()
def generate_texts(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128, batch_size: int = 8
) -> list[Prediction]:
    """Greedy generation for free-form outputs (JSON, extractive, free text)."""
    device = next(model.parameters()).device
    predictions: list[Prediction] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        input_ids, mask = _left_padded(tokenizer, [render_prompt(tokenizer, m) for m in batch], device)
        began = time.perf_counter()
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        per_case = (time.perf_counter() - began) / len(batch)
        for row in output[:, input_ids.shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            predictions.append(Prediction(output=text, seconds=per_case))
    return predictions


def predict(
    model, tokenizer, conversations: list[list[dict]], labels: list[str] | None, max_new_tokens: int = 128
) -> list[Prediction]:
    """Constrained label choice when the task has a label set, greedy generation otherwise."""
    if labels:
        return predict_labels(model, tokenizer, conversations, labels)
    return generate_texts(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
