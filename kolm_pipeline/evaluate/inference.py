"""Batched inference for evaluation and serving.

Categorical tasks are decoded constrained to the label set: greedy decoding restricted, token by token,
to the continuations that still lead to a label (see ``choose_labels``), so the output is always a valid
label and a choice costs one pass of the prompt plus a few single-token steps, whatever the number of
labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# Bump when a change to decoding can change an answer: the bare base's answers are reused across evaluations
# only while this and the base's weights stay the same (evaluate/evaluation.py: BaseAnswers).
DECODING_VERSION = 2
# Rows generated together in evaluation: a step of many rows costs little more than one of few, so more tokens a
# second (chosen with bench/decode.py; docs/benchmarks.md, session 11).
GENERATION_BATCH = 32
# Shorter common prefixes are not worth a pass of their own.
MIN_SHARED_PREFIX = 8


@dataclass(frozen=True)
class Prediction:
    """One model answer and how long the batch it was part of took per case."""

    output: str
    seconds: float
    # How sure the model was of `output` (0–1): for a label, the probability the constrained decoder gave
    # the path it took (each branching step's chosen token, renormalized over the tokens allowed there).
    confidence: float | None = None


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


def _left_padded_ids(tokenizer, encoded: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows left-padded to one width, and the mask of their real tokens."""
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def _left_padded(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    return _left_padded_ids(tokenizer, encoded, device)


def _prompt_pass(model, tokenizer, prompts: list[str], device):
    """Run a batch of prompts: the model's output (the last position's logits and the KV cache), the attention
    mask, and each row's next position.

    The token prefix every prompt shares (system prompt and chat template: most of a classification prompt) is
    run once and its KV cache repeated for the batch; each row's own tokens follow,
    left-padded between the prefix and them so that every row ends at the last position."""
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    shared = 0
    if len(encoded) > 1:
        limit = min(len(ids) for ids in encoded) - 1  # every row keeps a token of its own to predict from
        while shared < limit and all(ids[shared] == encoded[0][shared] for ids in encoded):
            shared += 1
    cache = None
    if shared >= MIN_SHARED_PREFIX:
        cache = model(input_ids=torch.tensor([encoded[0][:shared]], device=device), use_cache=True,
                      logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(encoded))
    else:
        shared = 0
    input_ids, own = _left_padded_ids(tokenizer, [ids[shared:] for ids in encoded], device)
    positions = shared + (own.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones((len(encoded), shared), dtype=own.dtype, device=device), own], dim=1)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out, mask, positions[:, -1:] + 1


@dataclass
class _TrieNode:
    """A node of the label trie: the continuations (label indices) that pass through it, by next token."""

    labels: list[int] = field(default_factory=list)
    children: dict[int, _TrieNode] = field(default_factory=dict)


def label_trie(continuations: list[list[int]]) -> _TrieNode:
    root = _TrieNode()
    for index, ids in enumerate(continuations):
        node = root
        node.labels.append(index)
        for token in ids:
            node = node.children.setdefault(token, _TrieNode())
            node.labels.append(index)
    return root


def _decided(node: _TrieNode) -> bool:
    # Two labels with the same continuation cannot be told apart: the first wins, as ties do.
    return len(node.labels) == 1 or not node.children


@torch.inference_mode()
def choose_labels(model, tokenizer, batch: list[list[dict]], labels: list[str],
                  confidences: list[float] | None = None) -> list[int]:
    """Index of the label each conversation's constrained greedy decoding reaches; with `confidences`, each
    row's path probability is appended to it (the product, over the branching steps, of the chosen token's
    probability among the tokens allowed there: 1.0 when the first token already decides).

    Decoding walks a trie of the labels' continuations (label plus end-of-turn marker, so a label that is a
    prefix of another is chosen only when the model would end its answer there): at each step the most
    likely token among those that still lead to a label is taken, and a conversation is done as soon as one
    label remains below its node. This is how vLLM's `choice` structured output decodes, so the local and
    vLLM backends answer alike; its cost is one pass of the prompt plus one single-token step per branching
    level of the trie, whatever the number of labels (docs/benchmarks.md, session 11, compares it with scoring
    every label).
    """
    device = next(model.parameters()).device
    root = label_trie(label_continuations(tokenizer, batch[0], labels))
    out, mask, next_position = _prompt_pass(model, tokenizer, [render_prompt(tokenizer, m) for m in batch], device)
    nodes = [root] * len(batch)
    path_probability = [1.0] * len(batch)
    while True:
        logits = out.logits[:, -1, :]
        fed = []
        for row, node in enumerate(nodes):
            if _decided(node):
                fed.append(tokenizer.pad_token_id or 0)
                continue
            allowed = list(node.children)
            if len(allowed) > 1:
                probabilities = logits[row, allowed].float().softmax(-1)
                best = int(probabilities.argmax())
                token = allowed[best]
                path_probability[row] *= float(probabilities[best])
            else:
                token = allowed[0]
            nodes[row] = node.children[token]
            fed.append(token)
        if all(_decided(node) for node in nodes):
            if confidences is not None:
                confidences.extend(path_probability)
            return [node.labels[0] for node in nodes]
        # Decided rows are fed a filler token and stay in the batch (their outputs are no longer read), so
        # the KV cache needs no reindexing.
        mask = torch.cat([mask, torch.ones((len(nodes), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=torch.tensor([[token] for token in fed], device=device), attention_mask=mask,
                    position_ids=next_position, past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1


def predict_labels(
    model, tokenizer, conversations: list[list[dict]], labels: list[str], batch_size: int = 16
) -> list[Prediction]:
    """The most likely label for each conversation, chosen in batches."""
    predictions: list[Prediction] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        began = time.perf_counter()
        confidences: list[float] = []
        chosen = choose_labels(model, tokenizer, batch, labels, confidences)
        per_case = (time.perf_counter() - began) / len(batch)
        predictions.extend(Prediction(output=labels[index], seconds=per_case, confidence=confidence)
                           for index, confidence in zip(chosen, confidences, strict=True))
    return predictions


@torch.inference_mode()
def generate_texts(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128,
    batch_size: int = GENERATION_BATCH,
    json_schema: dict | None = None,
) -> list[Prediction]:
    """Greedy generation for free-form outputs (JSON, extractive, free text).

    With ``json_schema`` every answer is held to the schema (``structured.py``) and ends as soon as its object
    closes; a schema that cannot be compiled raises JsonSchemaProblem before anything is generated."""
    device = next(model.parameters()).device
    if json_schema is not None:
        from kolm_pipeline.evaluate.structured import compile_json_schema, stop_token_ids, vocab_size

        compile_json_schema(tokenizer, json_schema, vocab=vocab_size(model), stops=stop_token_ids(model, tokenizer))
    predictions: list[Prediction] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        input_ids, mask = _left_padded(tokenizer, [render_prompt(tokenizer, m) for m in batch], device)
        began = time.perf_counter()
        constraint: dict = {}
        if json_schema is not None:
            from kolm_pipeline.evaluate.structured import constrain_generate

            constraint = constrain_generate(model, tokenizer, json_schema, len(batch), input_ids.shape[1])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **constraint,
        )
        per_case = (time.perf_counter() - began) / len(batch)
        for row in output[:, input_ids.shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            predictions.append(Prediction(output=text, seconds=per_case))
    return predictions


def predict(
    model, tokenizer, conversations: list[list[dict]], labels: list[str] | None, max_new_tokens: int = 128,
    json_schema: dict | None = None,
) -> list[Prediction]:
    """Constrained label choice when the task has a label set, greedy generation otherwise (held to
    ``json_schema`` when given)."""
    if labels:
        return predict_labels(model, tokenizer, conversations, labels)
    return generate_texts(model, tokenizer, conversations, max_new_tokens=max_new_tokens, json_schema=json_schema)
