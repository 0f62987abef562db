"""A task's label set as the base's tokenizer writes it: each label's continuation after the generation prompt
(the label and the chat template's end-of-turn marker) and the trie of those token sequences.

Constrained label choice walks the trie (``evaluate/inference.py: choose_labels``), and the trainer's label loss
scores each answer token against the tokens the trie allows there (``train/examples.py``), so both see the same
choices.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field


@dataclass
class TrieNode:
    """A node of the label trie: the continuations (label indices) that pass through it, by next token."""

    labels: list[int] = field(default_factory=list)
    children: dict[int, TrieNode] = field(default_factory=dict)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model reads it before answering: the chat template with its generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def continuation_text(tokenizer, messages: list[dict], prompt: str, label: str) -> str:
    """What the template writes after ``prompt`` (``messages`` rendered) when the answer is ``label``."""
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": label}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template renders the answer in a way that does not extend the prompt")
    return full[len(prompt) :].rstrip("\n")


def label_continuations(tokenizer, messages: list[dict], labels: list[str]) -> list[list[int]]:
    """Token ids the chat template appends after the generation prompt for each label answer.

    Derived from the template itself so the end-of-turn marker is scored too, which stops a label
    that is a prefix of another from winning by being shorter.
    """
    prompt = render_prompt(tokenizer, messages)
    return [tokenizer(continuation_text(tokenizer, messages, prompt, label), add_special_tokens=False).input_ids
            for label in labels]


# Label tries by (tokenizer, labels, the first label's continuation text): a template renders every label's answer
# the same way after any conversation it renders the first one's the same way after, so a request re-renders one
# answer instead of one per label (150 renders for CLINC's intents).
_TRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(labels, probe): trie}
_TRIES_KEPT = 64  # per tokenizer, oldest dropped first
# `kolm serve` builds tries on its request threads: two evicting at once would drop the same entry twice.
_TRIES_LOCK = threading.Lock()


def label_trie_for(tokenizer, messages: list[dict], labels: list[str]) -> TrieNode:
    """The trie of ``labels``' continuations after ``messages`` (cached; safe to call from several threads)."""
    key = (tuple(labels), continuation_text(tokenizer, messages, render_prompt(tokenizer, messages), labels[0]))
    with _TRIES_LOCK:
        trie = _TRIES.setdefault(tokenizer, {}).get(key)
    if trie is None:  # built outside the lock: a 150-label trie tokenizes 150 answers
        trie = label_trie(label_continuations(tokenizer, messages, labels))
        with _TRIES_LOCK:
            tries = _TRIES.setdefault(tokenizer, {})
            while len(tries) >= _TRIES_KEPT:
                tries.pop(next(iter(tries)))
            tries[key] = trie
    return trie


def label_trie(continuations: list[list[int]]) -> TrieNode:
    """The trie of token sequences; each node lists the sequences (by index) passing through it."""
    root = TrieNode()
    for index, ids in enumerate(continuations):
        node = root
        node.labels.append(index)
        for token in ids:
            node = node.children.setdefault(token, TrieNode())
            node.labels.append(index)
    return root


def decided(node: TrieNode) -> bool:
    """Whether one label is left below ``node`` (nothing to choose any more)."""
    # Two labels with the same continuation cannot be told apart: the first wins, as ties do.
    return len(node.labels) == 1 or not node.children
