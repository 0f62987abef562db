"""Training examples: chat pairs rendered with the base model's chat template and tokenized once.

Each example carries `input_ids`, `labels` (-100 on the prompt, so the loss covers the assistant answer
only) and `token_weights` (the pair's provenance weight on every answer token: a person's correction
counts more than an AI peer's answer). With a recipe's label set it also carries `label_choices`: for each token,
the tokens the label trie allows where it stands (``train/labels.py``; one token where the label is already
decided, none off the trie or in the prompt), which the label loss scores it among (``answer_loss.py``).

Pairs longer than `max_length` keep their first `max_length` tokens and are counted, not dropped (unless nothing
of the answer is left within `max_length`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kolm_pipeline.corpus.pairs import weight_problem
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.train.labels import TrieNode, decided, label_trie_for, render_prompt

CHOICES_COLUMN = "label_choices"


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


def label_choices(trie: TrieNode, answer_ids: list[int]) -> list[list[int]]:
    """For each answer token, the tokens ``trie`` allows where it stands: every branch while labels remain to be
    told apart, the token itself once one label is left, none (the whole vocabulary) off the trie."""
    choices: list[list[int]] = []
    node: TrieNode | None = trie
    for token in answer_ids:
        if node is None or token not in node.children and not decided(node):
            node = None
            choices.append([])
        elif decided(node):
            choices.append([token])
        else:
            choices.append(sorted(node.children) if len(node.children) > 1 else [token])
            node = node.children[token]
    return choices


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, source: str = "train.jsonl",
                   labels: list[str] | None = None) -> TokenizedPairs:
    """Render and tokenize every pair exactly as inference will prompt the model (generation prompt after
    the conversation, answer after it); with ``labels``, each example's ``label_choices`` too."""
    examples = []
    truncated = tokens = answer_tokens = 0
    for number, row in enumerate(rows, start=1):
        weight = row_weight(row, f"{source}:{number}")
        prompt = render_prompt(tokenizer, row["messages"][:-1])
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        if not full.startswith(prompt):
            raise ExampleError(f"{source}:{number}: the chat template renders the answer in a way that does not "
                               "extend the prompt; cannot mask the prompt out of the loss")
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        input_ids = prompt_ids + answer_ids
        targets = [-100] * len(prompt_ids) + answer_ids
        if len(input_ids) > max_length:
            truncated += 1
            input_ids, targets = input_ids[:max_length], targets[:max_length]
        if all(target == -100 for target in targets):
            continue
        example = {
            "input_ids": input_ids,
            "labels": targets,
            "token_weights": [0.0 if target == -100 else weight for target in targets],
        }
        if labels:
            trie = label_trie_for(tokenizer, row["messages"][:-1], labels)
            choices = [[] for _ in prompt_ids] + label_choices(trie, answer_ids)
            example[CHOICES_COLUMN] = choices[: len(input_ids)]
        examples.append(example)
        tokens += len(input_ids)
        answer_tokens += sum(target != -100 for target in targets)
    return TokenizedPairs(examples=examples, truncated=truncated, tokens=tokens, answer_tokens=answer_tokens)
