"""Several LoRA adapters of one base as one: an ordered, weighted composition.

The parts are combined with PEFT's `add_weighted_adapter(combination_type="cat")`: each part's A matrices are
scaled by its weight and its own LoRA scale and stacked, its B matrices stacked beside them, so the combined
adapter's update is exactly the weighted sum of the parts' updates (`Σ wᵢ·sᵢ·Bᵢ·Aᵢ`, rank the sum of the parts'
ranks, scale 1). Applying it is applying every part at once: the transformers backend serves it like any adapter,
and vLLM, which takes one LoRA per request, loads the same PEFT directory (its `--max-lora-rank` must cover the
summed rank). Nothing is approximated, so the composition's evaluation is the evaluation of the parts together.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.provenance.errors import InvalidInput, RegistryError
from kolm_pipeline.train.base_model import BaseModel, load_causal_lm

COMBINATION = "cat"
COMPOSED_NAME = "composed"
# Beyond this the summed rank makes every request pay for a very wide update; compose fewer or smaller parts.
MAX_PARTS = 8


@dataclass(frozen=True)
class PartRef:
    """One `CID[:weight]` of `kolm compose --adapter`: an artifact (CID, unique prefix, `current`, ...) and its
    weight (default 1)."""

    ref: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> PartRef:
        ref, sep, weight_text = text.rpartition(":") if ":" in text else (text, "", "")
        if not sep:
            return cls(ref=text.strip())
        try:
            weight = float(weight_text)
        except ValueError:
            raise InvalidInput(f"--adapter {text!r}: the weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight) or weight == 0:
            raise InvalidInput(f"--adapter {text!r}: the weight must be a finite number other than 0")
        if not ref.strip():
            raise InvalidInput(f"--adapter {text!r}: no artifact before the weight")
        return cls(ref=ref.strip(), weight=weight)


def exactness_problem(adapter_dir: Path) -> str | None:
    """Why the adapter cannot be part of an exact `cat` composition, None when it can: PEFT would keep only the
    first part's fully trained modules, and DoRA or trained biases are no low-rank update to stack."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"its adapter_config.json cannot be read ({exc})"
    if config.get("modules_to_save"):
        return f"it trains modules in full (modules_to_save {config['modules_to_save']})"
    if config.get("use_dora"):
        return "it is a DoRA adapter"
    if config.get("bias", "none") != "none":
        return f"it trains biases (bias {config['bias']!r})"
    return None


def combine_adapters(base: BaseModel, parts: list[tuple[Path, float]], output: Path) -> dict:
    """Write the weighted `cat` combination of the PEFT adapters `parts` (directory, weight) to `output` (which must
    not exist: it appears whole or not at all); returns the combined adapter's `adapter_config.json`."""
    from peft import PeftModel

    if not 2 <= len(parts) <= MAX_PARTS:
        raise InvalidInput(f"a composition takes 2 to {MAX_PARTS} adapters, not {len(parts)}")
    for index, (directory, _weight) in enumerate(parts):
        problem = exactness_problem(directory)
        if problem:
            raise InvalidInput(f"adapter {index + 1} of the composition cannot be composed exactly: {problem}")
    names = [f"part{index}" for index in range(len(parts))]
    model = None
    try:
        model = PeftModel.from_pretrained(load_causal_lm(base, "float32"), str(parts[0][0]), adapter_name=names[0])
        for name, (directory, _weight) in zip(names[1:], parts[1:], strict=True):
            model.load_adapter(str(directory), adapter_name=name)
        model.add_weighted_adapter(names, [weight for _, weight in parts], COMPOSED_NAME, combination_type=COMBINATION)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise RegistryError(f"these adapters cannot be composed: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="kolm-compose-", dir=output.parent) as scratch:
        model.save_pretrained(scratch, selected_adapters=[COMPOSED_NAME])
        saved = Path(scratch) / COMPOSED_NAME
        config = json.loads((saved / "adapter_config.json").read_text())
        shutil.move(str(saved), output)
    return config
