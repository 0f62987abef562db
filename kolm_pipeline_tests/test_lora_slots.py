"""The serving runtime's own LoRA slots answer exactly as PEFT does with the same adapter files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from kolm_pipeline.evaluate.lora_slots import AdapterFormatError, LoraSlots

INPUT = torch.tensor([[1, 17, 300, 42, 9, 2048, 5]])


def _base(tiny_base: Path):
    return AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()


def _save_adapter(tiny_base: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT adapter with non-zero random A and B, saved as the trainer saves one."""
    torch.manual_seed(seed)
    model = get_peft_model(_base(tiny_base), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(str(out))
    return out


def _peft_logits(tiny_base: Path, adapter: Path) -> torch.Tensor:
    with torch.inference_mode():
        return PeftModel.from_pretrained(_base(tiny_base), str(adapter)).eval()(input_ids=INPUT).logits


@pytest.mark.parametrize("lora", [
    {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "alpha_pattern": {"down_proj": 4}},
], ids=["all-linear", "rslora-qv", "alpha-pattern"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "update"])
def test_logits_match_peft(tiny_base, tmp_path, lora, merge):
    adapter = _save_adapter(tiny_base, tmp_path / "adapter", seed=1, **lora)
    model = _base(tiny_base)
    with torch.inference_mode():
        bare = model(input_ids=INPUT).logits
    slots = LoraSlots(model, merge=merge)
    slots.load("a", adapter)
    slots.select("a")
    with torch.inference_mode():
        served = model(input_ids=INPUT).logits
    expected = _peft_logits(tiny_base, adapter)
    assert not torch.allclose(expected, bare, atol=1e-3), "the adapter must change the logits for this to test"
    torch.testing.assert_close(served, expected, atol=2e-5, rtol=1e-5)


def test_a_cpu_model_holds_adapters_merged_and_keeps_its_own_weights(tiny_base, tmp_path):
    """On a CPU a slot holds the adapter merged into a copy of the layer's weight; the base's weights stay as they
    were, so the bare base and the other adapters are unchanged."""
    adapter = _save_adapter(tiny_base, tmp_path / "adapter", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    model = _base(tiny_base)
    originals = {path: module.weight.detach().clone() for path, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear)}
    slots = LoraSlots(model)
    slots.load("a", adapter)
    assert slots.merge
    for path, layer in slots._layers.items():
        held = layer.adapters["a"]
        assert held.merged is not None and held.down is None and held.up is None
        assert torch.equal(layer.base.weight, originals[path]) and not torch.equal(held.merged, originals[path])


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "update"])
def test_switching_and_unloading(tiny_base, tmp_path, merge):
    first = _save_adapter(tiny_base, tmp_path / "first", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    second = _save_adapter(tiny_base, tmp_path / "second", seed=2, r=4, lora_alpha=4,
                           target_modules=["q_proj", "o_proj"])
    model = _base(tiny_base)
    with torch.inference_mode():
        bare = model(input_ids=INPUT).logits
    slots = LoraSlots(model, merge=merge)
    slots.load("first", first)
    slots.load("second", second)
    assert slots.names() == ["first", "second"]

    def logits(name):
        slots.select(name)
        with torch.inference_mode():
            return model(input_ids=INPUT).logits

    for _ in range(2):
        torch.testing.assert_close(logits("second"), _peft_logits(tiny_base, second), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(logits("first"), _peft_logits(tiny_base, first), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits(None), bare)
    slots.select("first")
    slots.unload("first")
    assert slots.names() == ["second"] and slots.selection.name is None
    torch.testing.assert_close(logits(None), bare)
    with pytest.raises(KeyError):
        slots.select("first")


def _refused(tiny_base: Path, adapter: Path) -> str:
    model = _base(tiny_base)
    before = copy.deepcopy(model.state_dict())
    slots = LoraSlots(model)
    with pytest.raises(AdapterFormatError) as caught:
        slots.load("bad", adapter)
    assert slots.names() == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return str(caught.value)


def test_adapters_it_cannot_serve_are_refused_by_name_and_change_nothing(tiny_base, tmp_path):
    dora = _save_adapter(tiny_base, tmp_path / "dora", seed=1, r=4, target_modules=["q_proj"], use_dora=True)
    assert "use_dora=True" in _refused(tiny_base, dora)

    saved = _save_adapter(tiny_base, tmp_path / "saved", seed=1, r=4, target_modules=["q_proj"],
                          modules_to_save=["lm_head"])
    assert "modules_to_save" in _refused(tiny_base, saved)

    torn = _save_adapter(tiny_base, tmp_path / "torn", seed=1, r=4, target_modules=["q_proj"])
    (torn / "adapter_model.safetensors").write_bytes((torn / "adapter_model.safetensors").read_bytes()[:200])
    assert "adapter_model.safetensors: cannot read the weights" in _refused(tiny_base, torn)

    foreign = _save_adapter(tiny_base, tmp_path / "foreign", seed=1, r=4, target_modules=["q_proj"])
    config = json.loads((tiny_base / "config.json").read_text())
    wider = tmp_path / "wider-base"
    AutoModelForCausalLM.from_config(
        type(_base(tiny_base).config)(**{**config, "hidden_size": 128, "intermediate_size": 256})
    ).save_pretrained(str(wider))
    message = _refused(wider, foreign)
    assert "q_proj has A (4, 64)" in message and "another base model?" in message
