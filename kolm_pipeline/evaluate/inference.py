"""Batched inference for evaluation and serving.

Categorical tasks are decoded constrained to the label set: the label (plus the end-of-turn marker) with
the highest log-probability under the model wins, so the output is always a valid label. The prompt is
run once per case and its KV cache is shared by the label continuations, and only the continuations that
can still win are run (see ``choose_labels``), which makes a label choice cost little more than one
forward pass of the prompt.
"""

from __future__ import annotations

import copy
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


def _continuation_logps(model, cache, prompt_mask, pending: list[tuple[int, list[int]]]) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after its first, given the prompt's KV cache.

    ``pending`` holds (row of the prompt batch, continuation token ids). The pass feeds each continuation but
    its last token (which is only predicted) on a copy of the cache narrowed to the rows it needs."""
    device = prompt_mask.device
    rows = torch.tensor([row for row, _ in pending], device=device)
    narrowed = copy.deepcopy(cache)
    narrowed.batch_select_indices(rows)
    width = max(1, max(len(ids) for _, ids in pending) - 1)
    fed_ids = torch.zeros((len(pending), width), dtype=torch.long)
    fed_mask = torch.zeros((len(pending), width), dtype=torch.long)
    for index, (_, ids) in enumerate(pending):
        fed = ids[:-1]
        fed_ids[index, : len(fed)] = torch.tensor(fed, dtype=torch.long)
        fed_mask[index, : len(fed)] = 1
    mask = prompt_mask.index_select(0, rows)
    start = mask.sum(-1, keepdim=True)
    out = model(
        input_ids=fed_ids.to(device),
        attention_mask=torch.cat([mask, fed_mask.to(device)], dim=1),
        position_ids=start + torch.arange(width, device=device).unsqueeze(0),
        past_key_values=narrowed,
        use_cache=False,
    )
    logp = out.logits.float().log_softmax(-1)
    return [sum(logp[index, step - 1, ids[step]].item() for step in range(1, len(ids)))
            for index, (_, ids) in enumerate(pending)]


@torch.inference_mode()
def choose_labels(model, tokenizer, batch: list[list[dict]], labels: list[str]) -> list[int]:
    """Index of the most likely label (log-probability of its whole continuation) for each conversation.

    Exact, and cheap by branch and bound: a label's log-probability is at most its first token's, which the
    prompt pass gives for every label at once. The first continuation pass scores each conversation's
    top-bound label in full; a second pass, only where needed, scores every label whose bound still beats
    that score. A trained adapter puts nearly all its mass on one label, so usually one short continuation
    per conversation is run after the prompt instead of every label's.
    """
    device = next(model.parameters()).device
    continuations = label_continuations(tokenizer, batch[0], labels)
    prompt_ids, prompt_mask = _left_padded(tokenizer, [render_prompt(tokenizer, m) for m in batch], device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_out = model(  # only the last position's logits: the one that predicts each label's first token
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    first_logp = prompt_out.logits[:, -1, :].float().log_softmax(-1)
    bounds = first_logp[:, [ids[0] for ids in continuations]].tolist()

    def score(pending: list[tuple[int, int]]) -> list[float]:
        """Full log-probabilities of (case, label) pairs; one-token continuations need no pass."""
        long = [(case, label) for case, label in pending if len(continuations[label]) > 1]
        tails = dict(zip(long, _continuation_logps(model, prompt_out.past_key_values, prompt_mask,
                                                   [(case, continuations[label]) for case, label in long]),
                         strict=True)) if long else {}
        return [bounds[case][label] + tails.get((case, label), 0.0) for case, label in pending]

    # Ties go to the lower label index, as a plain argmax over the full scores would.
    leaders = [max(range(len(labels)), key=lambda j, row=row: (row[j], -j)) for row in bounds]
    best = [(value, label) for value, label in zip(score(list(enumerate(leaders))), leaders, strict=True)]
    challengers = [(case, label) for case, row in enumerate(bounds) for label in range(len(labels))
                   if label != leaders[case] and (row[label], -label) > (best[case][0], -best[case][1])]
    if challengers:
        for (case, label), value in zip(challengers, score(challengers), strict=True):
            if (value, -label) > (best[case][0], -best[case][1]):
                best[case] = (value, label)
    return [label for _, label in best]


def predict_labels(
    model, tokenizer, conversations: list[list[dict]], labels: list[str], batch_size: int = 16
) -> list[Prediction]:
    """The most likely label for each conversation, chosen in batches."""
    predictions: list[Prediction] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        began = time.perf_counter()
        chosen = choose_labels(model, tokenizer, batch, labels)
        per_case = (time.perf_counter() - began) / len(batch)
        predictions.extend(Prediction(output=labels[index], seconds=per_case) for index in chosen)
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
