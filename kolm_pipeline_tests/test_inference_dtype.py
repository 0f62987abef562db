"""The dtype evaluation and `kolm serve` run the base in (``KOLM_INFERENCE_DTYPE``): ``auto`` is bfloat16 where the
hardware has bf16 matmuls and float32 elsewhere; a bfloat16 base serves LoRA adapters in its own dtype, close to
PEFT's float32 answer; the bare base's cached evaluation answers are kept apart per dtype; a bad value is a clear
error naming the variable."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from kolm_pipeline.corpus.loading import fast_bf16
from kolm_pipeline.evaluate.lora_slots import LoraSlots
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.serve.backends import TransformersBackend
from kolm_pipeline.settings import load_settings
from kolm_pipeline.train.base_model import inference_dtype, load_causal_lm, resolve_base_model
from kolm_pipeline_tests.test_lora_slots import INPUT, _peft_logits, _save_adapter
from kolm_pipeline_tests.test_structured_decoding import schema_of, teacher_answers


def test_auto_is_bfloat16_exactly_where_the_hardware_has_bf16_matmuls(monkeypatch, tmp_path):
    expected = torch.bfloat16 if fast_bf16(torch.cuda.is_available()) else torch.float32
    assert inference_dtype("auto") is expected
    assert inference_dtype("float32") is torch.float32 and inference_dtype("bfloat16") is torch.bfloat16
    assert load_settings(tmp_path / "home").inference_dtype == "auto"
    monkeypatch.setenv("KOLM_INFERENCE_DTYPE", "bfloat16")
    assert load_settings(tmp_path / "home").inference_dtype == "bfloat16"
    monkeypatch.setenv("KOLM_INFERENCE_DTYPE", "float16")
    with pytest.raises(InvalidInput, match="KOLM_INFERENCE_DTYPE"):
        load_settings(tmp_path / "home")


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "update"])
def test_a_bfloat16_base_serves_an_adapter_in_its_own_dtype_close_to_peft(tiny_base, tmp_path, merge):
    """LoRA slots hold an adapter in the base layer's dtype (merged into the layer's weight, or its update with the
    scale folded in); the served logits stay within bfloat16's rounding of PEFT's float32 ones, far closer than the
    bare base's."""
    settings = load_settings(tmp_path / "home")
    base = resolve_base_model(str(tiny_base), settings.models_dir)
    adapter = _save_adapter(tiny_base, tmp_path / "adapter", seed=1, r=8, lora_alpha=16, target_modules="all-linear")
    model = load_causal_lm(base, "bfloat16")
    with torch.inference_mode():
        bare = model(input_ids=INPUT).logits.float()
    slots = LoraSlots(model, merge=merge)
    slots.load("a", adapter)
    slots.select("a")
    held = next(layer for layer in slots._layers.values()).adapters["a"]
    assert all(tensor.dtype is torch.bfloat16 for tensor in ([held.merged] if merge else [held.down, held.up]))
    with torch.inference_mode():
        served = model(input_ids=INPUT).logits.float()
    expected = _peft_logits(tiny_base, adapter)
    error, effect = (served - expected).abs().mean(), (bare - expected).abs().mean()
    assert error < effect / 4, (float(error), float(effect))


def test_a_bfloat16_backend_answers_schema_valid_json(tiny_base, tmp_path):
    settings = load_settings(tmp_path / "home")
    schema = schema_of(teacher_answers())
    backend = TransformersBackend(str(tiny_base), settings.models_dir, dtype="bfloat16")
    assert backend.placement == ""
    backend.start()
    try:
        assert next(backend._model.parameters()).dtype is torch.bfloat16
        assert backend.placement == f"{'cuda' if torch.cuda.is_available() else 'cpu'} bfloat16"  # /healthz runs_on
        backend.load("a", _save_adapter(tiny_base, tmp_path / "adapter", seed=2, r=8, lora_alpha=16,
                                        target_modules="all-linear"), None, ready=lambda: None)
        for text in ("Cancel order 12 please", "Where is my parcel?"):
            answer = "".join(backend.stream("a", [{"role": "user", "content": text}], None, 96, json_schema=schema))
            jsonschema.validate(json.loads(answer), schema)
    finally:
        backend.close()


def test_the_bare_base_answers_cached_for_one_dtype_are_not_reused_for_another(tiny_base, tmp_path):
    from kolm_pipeline.corpus.recipe import Recipe
    from kolm_pipeline.evaluate.evaluation import base_answers_key

    base = resolve_base_model(str(tiny_base), load_settings(tmp_path / "home").models_dir)
    recipe = Recipe(path=tmp_path, spec={"output_kind": "categorical", "labels": ["a", "b"]}, train=[], eval=[],
                    holdout=[])
    assert base_answers_key(base, recipe, 8, "float32") != base_answers_key(base, recipe, 8, "bfloat16")


def test_the_output_head_reads_a_contiguous_input_under_peft(tiny_base, tmp_path):
    """The head reads the last position's hidden states, a strided slice; with frozen bfloat16 weights (as PEFT leaves
    them in evaluation) torch would copy the whole head per row for it (docs/benchmarks.md, session 19), so the
    loaded model hands the head a contiguous copy of its input."""
    from peft import PeftModel

    base = resolve_base_model(str(tiny_base), load_settings(tmp_path / "home").models_dir)
    adapter = _save_adapter(tiny_base, tmp_path / "adapter", seed=3, r=4, lora_alpha=8, target_modules="all-linear")
    model = PeftModel.from_pretrained(load_causal_lm(base, "bfloat16"), str(adapter)).eval()
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad
    seen: list[bool] = []
    head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].is_contiguous()))
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 17, 300, 42], [9, 2048, 5, 6]]), logits_to_keep=1)
    assert seen == [True]
