"""The trainer: answer-only loss, provenance weights honoured, determinism, truncation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kolm_pipeline.train.base_model import BaseModel, load_tokenizer
from kolm_pipeline.train.distill import TrainConfig, TrainingError, train_adapter
from kolm_pipeline.train.examples import tokenize_pairs

QUESTION = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Which queue?"}]


def _base(path: Path) -> BaseModel:
    return BaseModel(model_id=str(path), path=path, digest="tiny")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _answer_logprob(base: BaseModel, adapter: Path, answer: str) -> float:
    """Log-probability of `answer` after QUESTION under base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base.path)), str(adapter)).eval()
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
    return sum(float(logits[len(prompt_ids) - 1 + i, token]) for i, token in enumerate(answer_ids))


def _conflicting(weight_alpha: float, weight_beta: float) -> list[dict]:
    """Eight people say 'alpha', eight AI peers say 'beta' to the same question: only weights break the tie."""
    def pair(answer: str, weight: float) -> dict:
        return {"messages": [*QUESTION, {"role": "assistant", "content": answer}], "weight": weight}
    return [pair("alpha", weight_alpha) if i % 2 == 0 else pair("beta", weight_beta) for i in range(16)]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_provenance_weights_decide_between_conflicting_answers(tiny_base, tmp_path, packing):
    base = _base(tiny_base)
    config = TrainConfig(epochs=3, learning_rate=0.01, batch_size=4, packing=packing)
    preferences = {}
    for name, weights in (("people-alpha", (1.0, 0.5)), ("people-beta", (0.5, 1.0))):
        adapter = tmp_path / name
        train_adapter(_write(tmp_path / f"{name}.jsonl", _conflicting(*weights)), base, adapter, config,
                      show_progress=False)
        preferences[name] = _answer_logprob(base, adapter, "alpha") - _answer_logprob(base, adapter, "beta")
    assert preferences["people-alpha"] > 0, preferences
    assert preferences["people-beta"] < 0, preferences


def test_same_seed_same_adapter_other_seed_differs(tiny_base, tmp_path):
    import torch
    from safetensors.torch import load_file

    base = _base(tiny_base)
    train = _write(tmp_path / "train.jsonl", _conflicting(1.0, 1.0))
    tensors = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = train_adapter(train, base, tmp_path / name, TrainConfig(epochs=1, batch_size=4, seed=seed),
                               show_progress=False)
        tensors[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        # What trained it is recorded as resolved: plain matmul attention on CPU, SDPA on CUDA.
        assert result.config["attention"] == ("sdpa" if torch.cuda.is_available() else "eager")
    assert tensors["a"].keys() == tensors["b"].keys()
    assert all(tensors["a"][key].equal(tensors["b"][key]) for key in tensors["a"])
    assert any(not tensors["a"][key].equal(tensors["c"][key]) for key in tensors["a"])


def test_examples_mask_the_prompt_and_count_truncation(tiny_base):
    tokenizer = load_tokenizer(_base(tiny_base))
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": "alpha"}], "weight": 0.5},
            {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "x"}]}]
    result = tokenize_pairs(tokenizer, rows, max_length=64)
    assert result.truncated == 1
    assert len(result.examples) == 1, "the long pair's answer lies beyond max_length: nothing to learn from it"
    example = result.examples[0]
    answer = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert tokenizer.decode(answer).startswith("alpha")
    assert {w for w, label in zip(example["token_weights"], example["labels"], strict=True) if label != -100} == {0.5}
    assert all(w == 0.0 for w, label in zip(example["token_weights"], example["labels"], strict=True) if label == -100)


def test_long_pairs_are_trained_truncated_and_counted(tiny_base, tmp_path):
    long_question = [{"role": "user", "content": "please route this " * 30}]
    rows = [{"messages": [*long_question, {"role": "assistant", "content": "alpha"}]} for _ in range(4)]
    rows += _conflicting(1.0, 1.0)[:4]
    result = train_adapter(_write(tmp_path / "train.jsonl", rows), _base(tiny_base), tmp_path / "adapter",
                           TrainConfig(epochs=1, batch_size=4, max_length=48), show_progress=False)
    assert result.truncated == 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_weight_names_the_line_and_leaves_no_adapter(tiny_base, tmp_path):
    rows = _conflicting(1.0, 1.0)[:3] + [{"messages": [*QUESTION, {"role": "assistant", "content": "a"}],
                                           "weight": "heavy"}]
    train = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(TrainingError, match=r"train\.jsonl:4: 'weight' must be a non-negative number"):
        train_adapter(train, _base(tiny_base), tmp_path / "adapter", TrainConfig(epochs=1), show_progress=False)
    assert not (tmp_path / "adapter").exists()


def test_a_large_corpus_is_trained_within_the_examples_budget(tiny_base, tmp_path):
    """`max_examples` caps the pairs seen in all: 16 pairs × 2 epochs = 32 would be seen, the budget of 16 cuts
    it to one epoch (4 steps of 4); with no cap both epochs run."""
    train = _write(tmp_path / "train.jsonl", _conflicting(1.0, 1.0))
    capped = train_adapter(train, _base(tiny_base), tmp_path / "capped",
                           TrainConfig(epochs=2, batch_size=4, max_examples=16), show_progress=False)
    assert capped.steps == 4 and capped.epochs == 1.0 and capped.metrics()["epochs"] == 1.0
    full = train_adapter(train, _base(tiny_base), tmp_path / "full",
                         TrainConfig(epochs=2, batch_size=4, max_examples=None), show_progress=False)
    assert full.steps == 8 and full.epochs == 2.0
    assert TrainConfig().max_examples == 4400


LABELS = ["book_flight", "book_hotel", "balance"]


def test_label_choices_follow_the_label_trie(tiny_base):
    """With a label set each answer token carries the tokens constrained decoding chooses among where it stands:
    every label's next token while several remain, the token alone once one label is left, none in the prompt."""
    from kolm_pipeline.train.labels import label_continuations

    tokenizer = load_tokenizer(_base(tiny_base))
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": label}]} for label in LABELS]
    examples = tokenize_pairs(tokenizer, rows, max_length=256, labels=LABELS).examples
    continuations = label_continuations(tokenizer, QUESTION, LABELS)
    firsts = sorted({ids[0] for ids in continuations})
    assert len(firsts) >= 2
    for example, ids in zip(examples, continuations, strict=True):
        answer = [choices for choices, label in zip(example["label_choices"], example["labels"], strict=True)
                  if label != -100]
        prompt = [choices for choices, label in zip(example["label_choices"], example["labels"], strict=True)
                  if label == -100]
        assert all(choices == [] for choices in prompt)
        assert answer[0] == firsts
        others = [other for other in continuations if other != ids]
        for position, choices in enumerate(answer[1:], start=1):
            rivals = [other for other in others if other[:position] == ids[:position] and len(other) > position]
            expected = sorted({ids[position], *(other[position] for other in rivals)}) if rivals else \
                [example["input_ids"][example["labels"].index(ids[0]) + position]]
            assert choices == expected, (position, choices, expected)
    assert "label_choices" not in tokenize_pairs(tokenizer, rows, max_length=256).examples[0]


def test_label_loss_is_cross_entropy_among_the_choices():
    import torch
    import torch.nn.functional as F

    from kolm_pipeline.train.answer_loss import _label_loss

    logits = torch.tensor([[[2.0, 1.0, 0.0, 5.0], [0.5, 0.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    targets = torch.tensor([[1, 2, 0]])
    whole = F.cross_entropy(logits[0], targets[0], reduction="none").unsqueeze(0)
    # Position 0 chooses between tokens 0 and 1 (token 3's high logit does not count), position 1 is decided,
    # position 2 is off the trie (the whole vocabulary).
    choices = torch.tensor([[[0, 1], [2, -1], [-1, -1]]])
    loss = _label_loss(logits, targets, choices, whole)
    among = torch.log(torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(1.0))) - 1.0
    assert torch.allclose(loss[0], torch.stack([among, torch.tensor(0.0), whole[0, 2]]))


def test_training_with_the_label_loss_prefers_the_taught_label(tiny_base, tmp_path):
    base = _base(tiny_base)
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": "alpha"}]} for _ in range(16)]
    config = TrainConfig(epochs=3, learning_rate=0.01, batch_size=4, label_loss=True)
    result = train_adapter(_write(tmp_path / "train.jsonl", rows), base, tmp_path / "adapter", config,
                           show_progress=False, labels=["alpha", "beta"])
    assert result.config["label_loss"] is True
    assert _answer_logprob(base, tmp_path / "adapter", "alpha") > _answer_logprob(base, tmp_path / "adapter", "beta")


def test_bf16_training_freezes_the_base_in_bf16_and_keeps_the_adapter_fp32(tiny_base, tmp_path):
    """Under bf16 autocast the frozen base is loaded in bf16 (no fp32 weights cast again at every step); the
    LoRA weights stay fp32, and the adapter still learns its answer on the fp32 base kolm serves with."""
    import torch
    from safetensors.torch import load_file

    base = _base(tiny_base)
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": "alpha"}]} for _ in range(16)]
    train = _write(tmp_path / "train.jsonl", rows)
    for name, bf16 in (("bf16", True), ("fp32", False)):
        train_adapter(train, base, tmp_path / name, TrainConfig(epochs=2, learning_rate=0.01, batch_size=4, bf16=bf16),
                      show_progress=False)
        recorded = json.loads((tmp_path / name / "kolm_training.json").read_text())
        assert recorded["base_dtype"] == ("bfloat16" if bf16 else "float32")
        assert recorded["config"]["bf16"] is bf16
        tensors = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}
    assert _answer_logprob(base, tmp_path / "bf16", "alpha") > _answer_logprob(base, tmp_path / "bf16", "beta")


def test_neftune_noise_reaches_training_and_only_when_asked(tiny_base, tmp_path):
    """`neftune_alpha` perturbs the input embeddings while training (the same seed and pairs train another adapter);
    the default trains as before, and the adapter still learns its answer."""
    from safetensors.torch import load_file

    base = _base(tiny_base)
    rows = [{"messages": [*QUESTION, {"role": "assistant", "content": "alpha"}]} for _ in range(16)]
    train = _write(tmp_path / "train.jsonl", rows)
    weights = {}
    for name, alpha in (("plain", None), ("again", None), ("noisy", 5.0)):
        config = TrainConfig(epochs=2, learning_rate=0.01, batch_size=4, neftune_alpha=alpha)
        result = train_adapter(train, base, tmp_path / name, config, show_progress=False)
        assert result.config["neftune_alpha"] == alpha
        weights[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    same = all((weights["plain"][key] == weights["again"][key]).all() for key in weights["plain"])
    differs = any((weights["plain"][key] != weights["noisy"][key]).any() for key in weights["plain"])
    assert same and differs
    assert _answer_logprob(base, tmp_path / "noisy", "alpha") > _answer_logprob(base, tmp_path / "noisy", "beta")


def test_processes_starting_on_a_fresh_model_cache_dequantize_the_embedded_base_once(tmp_path, monkeypatch):
    """Two callers (replicas, Dagster steps, test workers) resolving the embedded base on an empty cache at once: the
    second waits for the first's dequantized copy instead of writing over it."""
    import threading
    import time

    from kolm_pipeline.settings import EMBEDDED_BASE_MODEL
    from kolm_pipeline.train import base_model

    calls = []

    def dequantize(target: Path) -> None:  # stands in for the minute-long GGUF → safetensors conversion
        calls.append(target)
        time.sleep(0.5)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(base_model, "_dequantize_embedded", dequantize)
    found = []
    callers = [threading.Thread(target=lambda: found.append(base_model.resolve_base_model(EMBEDDED_BASE_MODEL,
                                                                                           tmp_path / "models")))
               for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(calls) == 1 and len(found) == 2 and found[0].digest == found[1].digest
