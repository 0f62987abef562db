"""The training settings a recipe carries (`spec.json`'s `training`), declared once.

The recipe owns them because it is the contract between the corpus and the trainer: `kolm compile
--dry-run` checks them before any run, the trainer reads them, the Dagster `adapter` config derives its
fields and defaults from this model, and the recipe spec's JSON Schema embeds `TrainConfig.model_json_schema()`.
Values are strict (a recipe's `"packing": 1` is refused, not read as true) and unknown names are refused, so a
typo never trains with a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kolm_pipeline.provenance.errors import InvalidInput

ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
ModuleName = Annotated[str, Field(min_length=1)]


def _setting(default: Any, expects: str, description: str, **constraints: Any) -> Any:
    """A field whose `expects` phrase ("a whole number >= 1") completes the problem a bad value is reported as."""
    return Field(default, description=description, json_schema_extra={"expects": expects}, **constraints)


class TrainConfig(BaseModel):
    """LoRA and optimisation settings; defaults suit small (100M–1B) bases."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rank: int = _setting(16, "a whole number >= 1", "LoRA rank", ge=1)
    alpha: int | float = _setting(32, "a number > 0", "LoRA alpha (scaling is alpha / rank)", gt=0)
    dropout: float = _setting(0.0, "a number from 0 up to (not including) 1", "LoRA dropout", ge=0, lt=1)
    target_modules: ModuleName | Annotated[list[ModuleName], Field(min_length=1)] = _setting(
        "all-linear", "a module name pattern or a list of module names",
        "modules that get LoRA weights: a pattern such as 'all-linear' or a list of names")
    modules_to_save: list[ModuleName] | None = _setting(
        None, "a list of module names or null", "modules trained in full and saved with the adapter")
    epochs: float = _setting(2.0, "a number > 0", "passes over train.jsonl", gt=0)
    # A budget, not a schedule: a large corpus needs fewer passes, and the distill's time grows with the pairs seen.
    # 4,400 chosen by measurement on CLINC150's 2,929 training pairs (docs/benchmarks.md, session 18); a corpus under
    # 2,200 pairs gets its full `epochs` either way.
    max_examples: int | None = _setting(
        4400, "a whole number >= 1 or null",
        "most pairs seen in all (epochs × train pairs); a larger corpus gets fewer epochs; null: no cap", ge=1)
    learning_rate: float = _setting(2e-3, "a number between 0 and 1", "peak learning rate", gt=0, lt=1)
    # 4, not 8: the same pairs seen in twice the optimiser steps, at about the same cost on a CPU (a step's cost is
    # its tokens); a small corpus learns from the steps, a large one did as well (docs/benchmarks.md, session 16).
    batch_size: int = _setting(4, "a whole number >= 1", "pairs per optimiser step", ge=1)
    max_length: int = _setting(256, "a whole number >= 8", "tokens per pair; longer pairs are truncated", ge=8)
    warmup_steps: int = _setting(2, "a whole number >= 0", "linear warm-up steps", ge=0)
    seed: int = _setting(0, "a whole number", "seed of the adapter's initialisation and the data order")
    # Off by default: on the loop test's small corpus it cost hold-out accuracy (batches whose lengths
    # correlate with their labels) for a speed gain within noise on short pairs.
    length_grouped: bool = _setting(False, "true or false", "batch pairs of similar lengths together")
    attention: Literal[ATTENTION_KERNELS] | None = _setting(
        None, f"null or one of {list(ATTENTION_KERNELS)}",
        "attention kernel; null: plain matmul attention on CPU, SDPA on CUDA")
    # Packing suits GPUs with varlen attention; on CPU the packed row's masked attention is slower.
    packing: bool = _setting(False, "true or false", "pack several pairs into one row")
    bf16: bool | None = _setting(None, "true, false or null",
                                 "bf16 autocast; null: where the hardware has bf16 matmuls")
    # trl turns activation checkpointing on by default; a small base fits without it and trains faster without
    # it (bench/train.py). Turn it on when memory is short.
    activation_checkpointing: bool = _setting(False, "true or false", "recompute activations to save memory")
    # Closed-vocabulary recipes only (those with `labels`). Off by default: on CLINC150's 150 intents it gained on
    # the recipe's own eval and hold-out and lost on the bench's held-out set, each within noise (docs/benchmarks.md,
    # session 15).
    label_loss: bool = _setting(
        False, "true or false",
        "a recipe with labels: each answer token's loss is over the tokens the label set allows there (what "
        "constrained decoding chooses among), so only the choices between labels are trained; false: the whole "
        "vocabulary")
    # Off by default until a public set shows it wins (docs/benchmarks.md, session 17).
    neftune_alpha: float | None = _setting(
        None, "a number > 0 or null",
        "NEFTune: uniform noise of this scale (divided by the square root of tokens × width) added to the input "
        "embeddings while training, a regulariser for small corpora (5 is the paper's usual value); null: none; "
        "text bases only", gt=0)
    # Vision-language bases only: the language model is always adapted; the vision tower too when asked.
    vision_tower: bool = _setting(False, "true or false",
                                  "a vision-language base: give the vision tower LoRA weights too")

    @classmethod
    def parse(cls, values: dict | None) -> TrainConfig:
        """Settings from a recipe's `training` or a job's config; raises InvalidInput listing every problem."""
        found = cls.problems(values or {})
        if found:
            raise InvalidInput("training settings: " + "; ".join(found))
        return cls.model_validate(values or {})

    @classmethod
    def problems(cls, values: object) -> list[str]:
        """What is wrong with `values` as training settings, one line each, in field order; empty when none."""
        if not isinstance(values, dict):
            return [f"expected an object of settings, got {type(values).__name__}"]
        try:
            cls.model_validate(values)
        except ValidationError as exc:
            errors = exc.errors()
        else:
            return []
        unknown = sorted(str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden")
        found = [f"unknown setting(s) {unknown}; known: {sorted(cls.model_fields)}"] if unknown else []
        bad = {str(error["loc"][0]) for error in errors if error["type"] != "extra_forbidden"}
        for name in values:
            if name in bad:
                expects = cls.model_fields[name].json_schema_extra["expects"]
                found.append(f"{name}: {values[name]!r} is not {expects}")
        return found


if __name__ == "__main__":  # the JSON Schema the recipe spec schema embeds as `training`
    import json

    print(json.dumps(TrainConfig.model_json_schema(), indent=2, ensure_ascii=False))
