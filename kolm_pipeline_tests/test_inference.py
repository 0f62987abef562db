"""Constrained label choice: the batched, cached trie walk equals greedy decoding restricted to the labels,
done the slow way (a full forward pass per token, no cache, one conversation at a time)."""

from __future__ import annotations

import sys
import threading

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from kolm_pipeline.evaluate.inference import PrefixCache, choose_labels
from kolm_pipeline.train import labels as label_module
from kolm_pipeline.train.labels import label_continuations, label_trie, label_trie_for, render_prompt

LABELS = ["fin-ops", "fin", "growth", "l2-platform", "rma", "logistics", "iam"]
REQUESTS = ["I was charged twice", "Where is my parcel?", "Reset my password", "The API returns 500",
            "Send me a return label", "Upgrade my plan", "Refund order 77", "Login fails with SSO",
            "Invoice is wrong", "Package arrived broken", "Quota exceeded", "Add a seat"]


def _greedy_reference(model, tokenizer, messages: list[dict], labels: list[str]) -> int:
    """Greedy decoding over the continuations: at each step the most likely token that still leads to a
    label, until one label is left."""
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids
    continuations = label_continuations(tokenizer, messages, labels)
    remaining, chosen = list(range(len(labels))), []
    while len(remaining) > 1:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + chosen])).logits[0, -1]
        allowed = sorted({continuations[j][len(chosen)] for j in remaining})
        token = max(allowed, key=lambda t: (logits[t].item(), -t))
        chosen.append(token)
        remaining = [j for j in remaining if continuations[j][len(chosen) - 1] == token]
    return remaining[0]


def _models(tiny_base):
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    torch.manual_seed(3)
    flat = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    return base, flat


def test_choice_equals_greedy_constrained_decoding(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    conversations = [[{"role": "system", "content": "Route the ticket."}, {"role": "user", "content": text}]
                     for text in REQUESTS]
    picked = set()
    for model in _models(tiny_base):
        expected = [_greedy_reference(model, tokenizer, messages, LABELS) for messages in conversations]
        assert choose_labels(model, tokenizer, conversations, LABELS) == expected
        assert [choose_labels(model, tokenizer, [messages], LABELS)[0] for messages in conversations] == expected
        picked |= set(expected)
    assert len(picked) > 1, "the conversations must not all pick one label for this to test"


def test_many_labels_sharing_prefixes(tiny_base):
    """150 labels, many sharing their first tokens (as CLINC's intents do): still the greedy choice, and a
    label that is a prefix of another is reachable."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    stems = ["card", "credit_card", "bill", "transfer", "account", "pin", "travel", "car", "pay", "order"]
    labels = [f"{stem}_{n}" for stem in stems for n in range(14)] + stems
    assert len(labels) == 150
    conversations = [[{"role": "user", "content": text}] for text in REQUESTS[:6]]
    _, model = _models(tiny_base)
    expected = [_greedy_reference(model, tokenizer, messages, labels) for messages in conversations]
    passes = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: (passes.append(1), forward(*args, **kwargs))[1]
    assert choose_labels(model, tokenizer, conversations, labels) == expected
    # One pass reads the prompts' shared prefix, one their own tokens (choosing the first token); after that one
    # pass per branching of the trie on the longest path taken: the tokens all remaining labels share (``_`` after
    # ``card``) cost no pass of their own.
    trie = label_trie(label_continuations(tokenizer, conversations[0], labels))
    branchings = []
    for index in expected:
        node, count = trie, 0
        for token in label_continuations(tokenizer, conversations[0], labels)[index]:
            if len(node.labels) == 1:
                break
            count += len(node.children) > 1
            node = node.children[token]
        branchings.append(count)
    assert max(branchings) >= 2, "the labels chosen must branch more than once for this to test"
    assert len(passes) == 1 + max(branchings)


def test_prefix_cache_kept_between_passes_changes_no_choice(tiny_base):
    """The shared prompt prefix read once and kept (as `kolm serve` keeps it per adapter) gives every pass the
    choice of the slow reference: batches, lone prompts after them, a prompt sharing less (another system
    prompt: the kept prefix is cut to what it shares) and one sharing nothing usable."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    system = [{"role": "system", "content": "Route the ticket to the queue that owns it."}]
    other = [{"role": "system", "content": "Route it."}]
    conversations = [[*system, {"role": "user", "content": text}] for text in REQUESTS]
    passes = [conversations[:4], [conversations[4]], [conversations[5]], conversations[6:9],
              [[*other, {"role": "user", "content": REQUESTS[9]}]], [[{"role": "user", "content": REQUESTS[10]}]],
              [conversations[11]], [conversations[0]]]
    _, model = _models(tiny_base)
    prefixes = PrefixCache()
    for batch in passes:
        expected = [_greedy_reference(model, tokenizer, messages, LABELS) for messages in batch]
        assert choose_labels(model, tokenizer, batch, LABELS, prefixes=prefixes, adapter="a") == expected
        kept = prefixes.get("a")
        assert kept is not None and kept[1].get_seq_length() == len(kept[0])
    prefix = tokenizer(render_prompt(tokenizer, conversations[0]), add_special_tokens=False).input_ids
    assert prefixes.get("a")[0] == prefix[: len(prefixes.get("a")[0])]
    prefixes.forget("a")
    assert prefixes.get("a") is None


def test_label_trie_cache_is_safe_across_threads(tiny_base, monkeypatch):
    """`kolm serve` looks label tries up on its request threads; with the cache full, every miss evicts, and two
    threads evicting at once must not drop the same entry twice (a KeyError in a request)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    messages = [{"role": "user", "content": "hello"}]
    monkeypatch.setattr(label_module, "_TRIES_KEPT", 2)
    errors: list[str] = []

    def lookups(thread: int) -> None:
        try:
            for round_ in range(60):
                trie = label_trie_for(tokenizer, messages, [f"a{thread}", f"b{round_}"])
                assert len(trie.labels) == 2
        except Exception as exc:  # noqa: BLE001 - any failure in a thread is the test's failure
            errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so the race shows within a second
    try:
        threads = [threading.Thread(target=lookups, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
