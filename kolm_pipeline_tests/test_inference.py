"""Constrained label choice: the branch-and-bound pick equals scoring every label in full."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from kolm_pipeline.evaluate.inference import choose_labels, label_continuations, render_prompt

LABELS = ["fin-ops", "fin", "growth", "l2-platform", "rma", "logistics", "iam"]
REQUESTS = ["I was charged twice", "Where is my parcel?", "Reset my password", "The API returns 500",
            "Send me a return label", "Upgrade my plan", "Refund order 77", "Login fails with SSO",
            "Invoice is wrong", "Package arrived broken", "Quota exceeded", "Add a seat"]


def _exhaustive(model, tokenizer, messages: list[dict]) -> int:
    """Every label's full log-probability from a plain forward pass of prompt + answer (no cache)."""
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids
    scores = []
    for continuation in label_continuations(tokenizer, messages, LABELS):
        ids = torch.tensor([prompt + continuation])
        with torch.inference_mode():
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        scores.append(sum(logp[len(prompt) + step - 1, token].item() for step, token in enumerate(continuation)))
    return max(range(len(LABELS)), key=lambda j: (scores[j], -j))


def test_choice_equals_exhaustive_scoring(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    torch.manual_seed(3)
    flat = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    conversations = [[{"role": "system", "content": "Route the ticket."}, {"role": "user", "content": text}]
                     for text in REQUESTS]
    for model in (base, flat):
        expected = [_exhaustive(model, tokenizer, messages) for messages in conversations]
        assert choose_labels(model, tokenizer, conversations, LABELS) == expected
        assert [choose_labels(model, tokenizer, [messages], LABELS)[0] for messages in conversations] == expected
    assert len(set(expected)) > 1, "the conversations must not all pick one label for this to test"
