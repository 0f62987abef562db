"""Training examples: chat pairs rendered with the base model's chat template and tokenized once.

Each example carries `input_ids`, `labels` (-100 on the prompt, so the loss covers the assistant answer
only) and `token_weights` (the pair's provenance weight on every answer token: a person's correction
counts more than an AI peer's answer). Pairs longer than `max_length` keep their first `max_length`
tokens and are counted, not dropped (unless nothing of the answer is left within `max_length`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kolm_pipeline.corpus.pairs import weight_problem
from kolm_pipeline.provenance.errors import UserError


class ExampleError(UserError, ValueError):
    """A training row cannot be turned into an example; the message names the row."""


@dataclass(frozen=True)
class TokenizedPairs:
    """What tokenization produced: the examples, and how many pairs were cut to `max_length`."""

    examples: list[dict]
    truncated: int
    tokens: int
    answer_tokens: int


def row_weight(row: dict, where: str) -> float:
    """The provenance weight of a row (`"weight"`, default 1.0); a bad value names the row (the rule is the
    corpus's own, `weight_problem`)."""
    weight = row.get("weight", 1.0)
    problem = weight_problem(weight)
    if problem is not None:
        raise ExampleError(f"{where}: {problem}")
    return float(weight)


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, source: str = "train.jsonl") -> TokenizedPairs:
    """Render and tokenize every pair exactly as inference will prompt the model (generation prompt after
    the conversation, answer after it)."""
    examples = []
    truncated = tokens = answer_tokens = 0
    for number, row in enumerate(rows, start=1):
        weight = row_weight(row, f"{source}:{number}")
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        if not full.startswith(prompt):
            raise ExampleError(f"{source}:{number}: the chat template renders the answer in a way that does not "
                               "extend the prompt; cannot mask the prompt out of the loss")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        input_ids = prompt_ids + answer_ids
        labels = [-100] * len(prompt_ids) + answer_ids
        if len(input_ids) > max_length:
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == -100 for label in labels):
            continue
        examples.append({
            "input_ids": input_ids,
            "labels": labels,
            "token_weights": [0.0 if label == -100 else weight for label in labels],
        })
        tokens += len(input_ids)
        answer_tokens += sum(label != -100 for label in labels)
    return TokenizedPairs(examples=examples, truncated=truncated, tokens=tokens, answer_tokens=answer_tokens)
