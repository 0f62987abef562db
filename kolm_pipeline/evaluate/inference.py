"""Batched inference for evaluation and serving.

Categorical tasks are decoded constrained to the label set: greedy decoding restricted, token by token,
to the continuations that still lead to a label (see ``choose_labels``), so the output is always a valid
label and a choice costs one pass of the prompt plus one pass per branching of the label trie on its path,
whatever the number of labels.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from kolm_pipeline.train.labels import decided, label_trie_for, render_prompt

# Bump when a change to decoding can change an answer: the bare base's answers are reused across evaluations
# only while this and the base's weights stay the same (evaluate/evaluation.py: BaseAnswers).
DECODING_VERSION = 3
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


class PrefixCache:
    """The KV cache of the prompt prefix an adapter's requests share, kept between passes (vLLM calls this
    automatic prefix caching): a task's prompts start with the same system prompt and chat template, most of a
    classification prompt, so each pass reads only the rows' own tokens.

    One entry per adapter (the KV depends on its weights): the token ids it covers and their cache (one row). A
    pass whose prompts share fewer tokens with it uses its first part and keeps only that; a lone prompt with no
    entry leaves its own tokens as the entry, so the next request finds the part they share. Callers hold the
    model while they use it (one pass at a time), and ``forget`` an adapter when it is unloaded (`kolm serve` names
    adapters by their content address, so a name always means the same weights).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[list[int], object]] = {}

    def get(self, adapter: str) -> tuple[list[int], object] | None:
        return self._entries.get(adapter)

    def keep(self, adapter: str, ids: list[int], cache) -> None:
        """Remember a copy of ``cache`` (one row) cut to its first ``len(ids)`` positions as ``adapter``'s entry."""
        kept = copy.deepcopy(cache)
        _cut(kept, len(ids))
        self._entries[adapter] = (list(ids), kept)

    def forget(self, adapter: str | None = None) -> None:
        """Drop ``adapter``'s entry (every entry when None)."""
        if adapter is None:
            self._entries.clear()
        else:
            self._entries.pop(adapter, None)


def _cut(cache, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (its ``crop`` takes how many to remove, negated)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _common_prefix(reference: list[int], rows: list[list[int]], limit: int) -> int:
    shared = 0
    while shared < min(limit, len(reference)) and all(ids[shared] == reference[shared] for ids in rows):
        shared += 1
    return shared


def prompt_pass(model, tokenizer, encoded: list[list[int]], device, prefixes: PrefixCache | None = None,
                adapter: str = ""):
    """Run a batch of prompts (their tokens, ``encoded``): the model's output (the last position's logits and the KV
    cache), the attention mask, and each row's next position.

    The token prefix every prompt shares (system prompt and chat template: most of a classification prompt) is
    run once and its KV cache repeated for the batch, or taken from ``prefixes`` (``adapter``'s entry) when an
    earlier pass ran it; each row's own tokens follow, left-padded between the prefix and them so that every row
    ends at the last position."""
    limit = min(len(ids) for ids in encoded) - 1  # every row keeps a token of its own to predict from
    known = prefixes.get(adapter) if prefixes is not None else None
    cache, shared = None, 0
    if known is not None:
        shared = _common_prefix(known[0], encoded, limit)
        if shared >= MIN_SHARED_PREFIX:
            cache = copy.deepcopy(known[1])
            if shared < len(known[0]):
                _cut(cache, shared)
                prefixes.keep(adapter, known[0][:shared], cache)
    if cache is None and len(encoded) > 1:
        shared = _common_prefix(encoded[0], encoded[1:], limit)
        if shared >= MIN_SHARED_PREFIX:
            cache = model(input_ids=torch.tensor([encoded[0][:shared]], device=device), use_cache=True,
                          logits_to_keep=1).past_key_values
            if prefixes is not None:
                prefixes.keep(adapter, encoded[0][:shared], cache)
    if cache is None:
        shared = 0
    else:
        cache.batch_repeat_interleave(len(encoded))
    input_ids, own = _left_padded_ids(tokenizer, [ids[shared:] for ids in encoded], device)
    positions = shared + (own.cumsum(-1) - 1).clamp(min=0)
    mask = torch.cat([torch.ones((len(encoded), shared), dtype=own.dtype, device=device), own], dim=1)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    if prefixes is not None and shared == 0 and len(encoded) == 1 and limit >= MIN_SHARED_PREFIX:
        # A lone prompt: its tokens (less the last) are what the next request may share with it.
        prefixes.keep(adapter, encoded[0][:limit], out.past_key_values)
    return out, mask, positions[:, -1:] + 1


def step_inputs(feeds: list[list[int]], pad: int | None, mask: torch.Tensor, next_positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of a pass where each row of a running batch reads its ``feeds`` (some none): the token ids
    right-aligned, so every row's next-token logits are in the last column, padded in front; the attention mask
    extended by them; their positions, continuing from ``next_positions``."""
    width = max(len(feed) for feed in feeds)
    ids = torch.full((len(feeds), width), pad if pad is not None else 0, dtype=torch.long)
    fed = torch.zeros((len(feeds), width), dtype=mask.dtype)
    for row, feed in enumerate(feeds):
        if feed:
            ids[row, width - len(feed) :] = torch.tensor(feed)
            fed[row, width - len(feed) :] = 1
    fed = fed.to(mask.device)
    positions = next_positions + (fed.cumsum(-1) - 1).clamp(min=0)
    return ids.to(mask.device), torch.cat([mask, fed], dim=1), positions


@torch.inference_mode()
def choose_labels(model, tokenizer, batch: list[list[dict]], labels: list[str],
                  confidences: list[float] | None = None, prefixes: PrefixCache | None = None,
                  adapter: str = "") -> list[int]:
    """Index of the label each conversation's constrained greedy decoding reaches; with `confidences`, each
    row's path probability is appended to it (the product, over the branching steps, of the chosen token's
    probability among the tokens allowed there: 1.0 when the first token already decides).

    Decoding walks a trie of the labels' continuations (label plus end-of-turn marker, so a label that is a
    prefix of another is chosen only when the model would end its answer there): at each step the most
    likely token among those that still lead to a label is taken, and a conversation is done as soon as one
    label remains below its node. This is how vLLM's `choice` structured output decodes, so the local and
    vLLM backends answer alike; its cost is one pass of the prompt plus one pass per branching level of the trie,
    whatever the number of labels (docs/benchmarks.md, session 11, compares it with scoring every label): a pass
    reads the chosen token and the tokens every label still possible after it shares (``book`` ``_`` after ``book``
    when ``book_flight`` and ``book_hotel`` remain).
    """
    device = next(model.parameters()).device
    root = label_trie_for(tokenizer, batch[0], labels)
    encoded = [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False).input_ids for m in batch]
    out, mask, next_position = prompt_pass(model, tokenizer, encoded, device, prefixes, adapter)
    nodes = [root] * len(batch)
    path_probability = [1.0] * len(batch)
    while True:
        logits = out.logits[:, -1, :]
        feeds: list[list[int]] = []
        for row, node in enumerate(nodes):
            if decided(node):
                feeds.append([])
                continue
            allowed = list(node.children)
            if len(allowed) > 1:
                probabilities = logits[row, allowed].float().softmax(-1)
                best = int(probabilities.argmax())
                token = allowed[best]
                path_probability[row] *= float(probabilities[best])
            else:
                token = allowed[0]
            node, feed = node.children[token], [token]
            # The tokens every label left below this node shares are read in the same pass: a pass per branching.
            while not decided(node) and len(node.children) == 1:
                token = next(iter(node.children))
                node = node.children[token]
                feed.append(token)
            nodes[row] = node
            feeds.append(feed)
        if all(decided(node) for node in nodes):
            if confidences is not None:
                confidences.extend(path_probability)
            return [node.labels[0] for node in nodes]
        # A decided row reads nothing and stays in the batch (its outputs are no longer read), so the KV cache
        # needs no reindexing.
        ids, mask, positions = step_inputs(feeds, tokenizer.pad_token_id, mask, next_position)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        next_position = positions[:, -1:] + 1


def predict_labels(
    model, tokenizer, conversations: list[list[dict]], labels: list[str], batch_size: int = 16,
    prefixes: PrefixCache | None = None, adapter: str = "",
) -> list[Prediction]:
    """The most likely label for each conversation, chosen in batches; the prompts' shared prefix is read once
    (kept in ``prefixes`` under ``adapter``: a fresh cache for this call when None)."""
    prefixes = PrefixCache() if prefixes is None else prefixes
    predictions: list[Prediction] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        began = time.perf_counter()
        confidences: list[float] = []
        chosen = choose_labels(model, tokenizer, batch, labels, confidences, prefixes, adapter)
        per_case = (time.perf_counter() - began) / len(batch)
        predictions.extend(Prediction(output=labels[index], seconds=per_case, confidence=confidence)
                           for index, confidence in zip(chosen, confidences, strict=True))
    return predictions


def generate_texts(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128,
    batch_size: int = GENERATION_BATCH,
    json_schema: dict | None = None,
) -> list[Prediction]:
    """Greedy generation for free-form outputs (JSON, extractive, free text), in a continuous batch of at most
    ``batch_size`` rows: the code `kolm serve` answers with (``decoding.py``).

    With ``json_schema`` every answer is held to the schema (``structured.py``) and ends as soon as its object
    closes; a schema that cannot be compiled raises JsonSchemaProblem before anything is generated."""
    from kolm_pipeline.evaluate.decoding import BatchDecoder, decode_prompts
    from kolm_pipeline.evaluate.structured import json_decoder, stop_token_ids, vocab_size

    stops = stop_token_ids(model, tokenizer)
    json_decoders = None
    if json_schema is not None:  # a bad schema fails here, before anything is generated
        json_decoders = [json_decoder(tokenizer, json_schema, vocab_size(model), stops, m) for m in conversations]
    if not conversations:
        return []
    began = time.perf_counter()
    rows = decode_prompts(BatchDecoder(model, tokenizer, set(stops), PrefixCache()),
                          [render_prompt(tokenizer, m) for m in conversations], max_new_tokens, batch_size,
                          json_decoders)
    per_case = (time.perf_counter() - began) / len(rows)
    return [Prediction(output=tokenizer.decode(row.generated, skip_special_tokens=True).strip(), seconds=per_case)
            for row in rows]


def predict(
    model, tokenizer, conversations: list[list[dict]], labels: list[str] | None, max_new_tokens: int = 128,
    json_schema: dict | None = None,
) -> list[Prediction]:
    """Constrained label choice when the task has a label set, greedy generation otherwise (held to
    ``json_schema`` when given)."""
    if labels:
        return predict_labels(model, tokenizer, conversations, labels)
    return generate_texts(model, tokenizer, conversations, max_new_tokens=max_new_tokens, json_schema=json_schema)
