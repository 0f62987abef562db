"""Issue 26, composition: a task served as an ordered, weighted set of adapters sharing its base.

The combined adapter is exact (what serving computes equals PEFT applying every part at once), goes through the
same evaluation and gate as a distilled candidate, and is an artifact of its own whose manifest, receipts and
registry rows name the parts. Bad input is a clear error and stores nothing."""

from __future__ import annotations

import pytest

from kolm_pipeline.cli import main
from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.registry.artifact import read_kolm
from kolm_pipeline.registry.composition import PartRef, combine_adapters
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.train.base_model import resolve_base_model
from kolm_pipeline_tests.test_assets import TINY_RUN
from kolm_pipeline_tests.test_registry_support import real_adapter, signed_artifact

TASK = "acme.support"
BILLING = "acme.billing"


def _logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(tokens).logits


def test_the_combined_adapter_is_every_part_applied_at_once(tiny_base, tmp_path):
    """PEFT with both parts active, and serving's LoRA slots with the combined adapter, give the same logits."""
    import torch
    from peft import PeftModel

    from kolm_pipeline.evaluate.lora_slots import LoraSlots
    from kolm_pipeline.train.base_model import load_causal_lm

    base = resolve_base_model(str(tiny_base), tmp_path / "models")
    first = real_adapter(tiny_base, tmp_path / "first", seed=1, rank=4)
    second = real_adapter(tiny_base, tmp_path / "second", seed=2, rank=8)
    combined = tmp_path / "combined"
    config = combine_adapters(base, [(first, 1.0), (second, 1.0)], combined)
    assert config["r"] == 12 and config["lora_alpha"] == 12

    tokens = torch.tensor([[1, 17, 230, 999, 4, 58]])
    both = PeftModel.from_pretrained(load_causal_lm(base, "float32"), str(first), adapter_name="first")
    both.load_adapter(str(second), adapter_name="second")
    both.base_model.set_adapter(["first", "second"])
    expected = _logits(both, tokens)
    served = load_causal_lm(base, "float32")  # exact to 1e-4: float32
    slots = LoraSlots(served)
    slots.load("composed", combined)
    slots.select("composed")
    assert torch.allclose(_logits(served, tokens), expected, atol=1e-4)
    slots.select(None)
    assert not torch.allclose(_logits(served, tokens), expected, atol=1e-2)  # the parts do change the answer

    # A weight scales its part's update: at 0.5 each, every A matrix is half the one at 1, every B the same.
    from safetensors.torch import load_file

    halves = tmp_path / "halves"
    combine_adapters(base, [(first, 0.5), (second, 0.5)], halves)
    full, half = (load_file(str(path / "adapter_model.safetensors")) for path in (combined, halves))
    assert full.keys() == half.keys()
    for key, tensor in full.items():
        assert torch.allclose(half[key], tensor * (0.5 if ".lora_A." in key else 1.0), atol=1e-6)


def test_weights_are_numbers():
    assert PartRef.parse("bafkreiabc") == PartRef("bafkreiabc", 1.0)
    assert PartRef.parse("bafkreiabc:0.25") == PartRef("bafkreiabc", 0.25)
    for bad, why in (("bafkreiabc:heavy", "is not a number"), ("bafkreiabc:nan", "finite"),
                     ("bafkreiabc:0", "other than 0"), (":2", "no artifact")):
        with pytest.raises(Exception, match=why):
            PartRef.parse(bad)


def test_compose_evaluates_gates_swaps_and_rolls_back(kolm_settings, autoreply_store, tiny_base, monkeypatch,
                                                      tmp_path, capsys):
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))
    result, outcomes = materialize_namespace(ensure_instance(kolm_settings), TASK, TINY_RUN)
    assert result.success, [o for o in outcomes if o.status != "success"]
    store = CaptureStore(kolm_settings.store_url)
    distilled = store.champions(TASK)[TASK]
    base = resolve_base_model(str(tiny_base), kolm_settings.models_dir)

    # The tenant's house style: another task's adapter on the same base.
    style = signed_artifact(tmp_path / "style.kolm", adapter_dir=real_adapter(tiny_base, tmp_path / "style", seed=3,
                            rank=4), keys_dir=kolm_settings.keys_dir, task="acme.style", base_digest=base.digest)
    assert main(["swap", "--artifact", str(style), "--strategy", "force"]) == 0
    style_cid = store.champions("acme.style")["acme.style"]
    capsys.readouterr()

    # Bad input: nothing is stored, each error names what is wrong.
    rows = len(store.registry_rows(TASK))
    other_base = signed_artifact(tmp_path / "other.kolm", adapter_dir=real_adapter(tiny_base, tmp_path / "o", seed=4),
                                 keys_dir=kolm_settings.keys_dir, task="acme.other")
    assert main(["swap", "--artifact", str(other_base), "--strategy", "force"]) == 0
    other_cid = store.champions("acme.other")["acme.other"]
    stranger = signed_artifact(tmp_path / "stranger.kolm", adapter_dir=tmp_path / "style", tenant="globex",
                               keys_dir=kolm_settings.keys_dir, task="globex.style", base_digest=base.digest)
    assert main(["swap", "--artifact", str(stranger), "--strategy", "force"]) == 0
    stranger_cid = store.champions("globex.style")["globex.style"]
    capsys.readouterr()
    for adapters, why in (([f"{distilled}:heavy"], "'heavy' is not a number"),
                          ([distilled, f"{other_cid}:1"], "not on the base"),
                          ([distilled, stranger_cid], "tenant 'globex'"),
                          ([distilled], "takes 2 to 8 adapters")):
        code = main(["compose", "--task", TASK, *sum((["--adapter", a] for a in adapters), [])])
        assert code != 0 and why in capsys.readouterr().err
    assert len(store.registry_rows(TASK)) == rows and store.champions(TASK)[TASK] == distilled

    # A composition worse than what serves (the distilled adapter undone) is refused, with a row naming its parts.
    assert main(["compose", "--task", TASK, "--adapter", f"{distilled}:-1", "--adapter", f"{style_cid}:1"]) == 1
    assert "the gate refused the composition" in capsys.readouterr().err
    refused = store.registry_rows(TASK)[0]
    assert refused.decision in ("refuse", "alert")
    assert [part["artifact_cid"] for part in refused.details["composition"]] == [distilled, style_cid]
    assert store.champions(TASK)[TASK] == distilled
    assert not (store.tripwire_state(TASK) or {}).get("halted")  # an operator's losing trial halts nothing

    # Another namespace of the tenant, with its own recipe and nothing deployed: against the bare base, a light
    # composition wins and is swapped in, then a fuller one beats it; one rollback brings the first one back.
    from kolm_pipeline.demo.tickets import generate_tickets
    from kolm_pipeline_tests.conftest import AUTO_REPLY, capture_tickets

    capture_tickets(store, "acme", "billing", generate_tickets(160, seed=12), reply=AUTO_REPLY)
    store.add_rule("acme", "billing", "keep", {"status": "ok"}, actor="test")
    staged, _ = materialize_namespace(ensure_instance(kolm_settings), BILLING, TINY_RUN,
                                      stages=["triaged_captures", "corpus", "recipe"])
    assert staged.success
    capsys.readouterr()
    light, full = [(distilled, 0.1), (style_cid, 0.05)], [(distilled, 1.0), (style_cid, 0.05)]
    for parts in (light, full):
        code = main(["compose", "--task", BILLING, *sum((["--adapter", f"{cid}:{w}"] for cid, w in parts), [])])
        captured = capsys.readouterr()
        assert code == 0, captured.out + captured.err
        assert "composed" in captured.out and "parts:" in captured.out
    swaps = [row for row in store.registry_rows(BILLING) if row.decision == "swap"][::-1]
    first, second = (row.to_cid for row in swaps)
    # Each one beat what served before it (the light one the bare base, the full one the light one).
    assert swaps[0].k_after > swaps[0].k_before and swaps[1].k_after > swaps[1].k_before
    assert swaps[0].from_cid is None and swaps[1].from_cid == swaps[0].to_cid
    artifact = read_kolm(read_pointer(kolm_settings.adapters_dir, BILLING))
    assert [(p["artifact_cid"], p["weight"]) for p in artifact.manifest["composition"]["parts"]] == full
    distilled_lora = read_kolm(next(kolm_settings.artifacts_dir.glob(f"{TASK}/{distilled}.kolm"))).manifest["lora"]
    assert artifact.manifest["composition"]["rank"] == distilled_lora["rank"] + 4
    assert main(["verify", "current", "--task", BILLING]) == 0
    capsys.readouterr()
    assert main(["registry", "log", "--task", BILLING]) == 0
    assert f"parts: {distilled} ({TASK}) ×1 + {style_cid} (acme.style) ×0.05" in capsys.readouterr().out

    assert main(["registry", "diff", "--task", BILLING]) == 0  # previous → current: both compositions, with parts
    out = capsys.readouterr().out
    assert f"before parts: {distilled} ({TASK}) ×{light[0][1]:g}" in out
    assert f"after parts: {distilled} ({TASK}) ×1" in out

    assert main(["rollback", "--task", BILLING]) == 0
    out = capsys.readouterr().out
    assert store.champions(BILLING)[BILLING] == first != second
    assert f"rolled back {second} → {first}" in out and f"{distilled} ({TASK}) ×{light[0][1]:g}" in out
    store.close()
