"""LoRA adapters side by side on one base model, for evaluation and serving: load, select and unload without PEFT.

PEFT's multi-adapter model builds new submodules and walks the whole module tree on every load (0.3 to
0.9 s for a rank-16 all-linear adapter on the embedded base, nearly all of it Python), and that sits on
the hot swap's critical path. Serving needs only the adapters' matrices: each targeted ``nn.Linear`` is
wrapped once in a ``SlotLinear`` that keeps every loaded adapter's weights and applies the selected one's.
Loading reads the PEFT files (``adapter_config.json``, ``adapter_model.safetensors``) and fills those slots; the
artifacts stay plain PEFT, which vLLM and PEFT load as they are. ``test_lora_slots.py`` checks the logits against
PEFT's own.

Evaluation runs the adapters through the same slots (``evaluate/evaluation.py``), so an adapter is served with the
arithmetic it was evaluated with.

On a CPU each slot holds the adapter merged into a copy of the layer's weight (``W + scale * B @ A``, summed in
float32): a decoding pass there reads a few tokens a row, where each of the update's two small matmuls costs about
what the layer's own does (docs/benchmarks.md, session 20). That costs one copy of the targeted weights per loaded
adapter (infra/README.md sizes it). On a GPU, where memory is what is short, a slot holds only A and B and adds the
low-rank update.

Served: LoRA on linear layers, scale alpha/r (alpha/sqrt(r) with rsLoRA), per-module ``alpha_pattern``.
Refused with the reason: DoRA, trained biases, ``modules_to_save``, LoRA on embeddings or convolutions.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kolm_pipeline.provenance.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


class AdapterFormatError(UserError, ValueError):
    """The adapter directory is not a LoRA this runtime can serve; the message says what and why."""


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's update of one linear layer, in the base layer's dtype: either ``merged``, the layer's weight
    with the update added, or the update ``x @ down.T @ up.T`` itself, the LoRA scale folded into ``up`` (a bfloat16
    base reads them without casting the activations to float32 and back; vLLM also runs LoRA in the base's dtype;
    docs/benchmarks.md, session 19)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    merged: torch.Tensor | None = None


class Selection:
    """The adapter the next forward pass uses, shared by every wrapped layer (switching is one assignment)."""

    def __init__(self) -> None:
        self.name: str | None = None


class SlotLinear(nn.Module):
    """A base ``nn.Linear`` plus the LoRA updates of every loaded adapter; only the selected one applies."""

    def __init__(self, base: nn.Linear, selection: Selection) -> None:
        super().__init__()
        self.base = base
        self.selection = selection
        self.adapters: dict[str, LoraWeights] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.adapters.get(self.selection.name)
        if weights is not None and weights.merged is not None:
            return F.linear(x, weights.merged, self.base.bias)
        out = self.base(x)
        if weights is None:
            return out
        return out + F.linear(F.linear(x, weights.down), weights.up)


def _pattern_value(pattern: dict, module_path: str, default: float) -> float:
    """PEFT's per-module override: a key matches the module path or a dotted suffix of it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default


def read_lora(adapter_dir: Path, model: nn.Module, merge: bool = False,
              compute: Callable[[Callable[[], torch.Tensor]], torch.Tensor] = lambda work: work()
              ) -> dict[str, LoraWeights]:
    """Every (module path -> weights) pair of the PEFT LoRA adapter in ``adapter_dir``, checked against
    ``model``'s layers, each merged into a copy of its layer's weight if ``merge`` (each layer's merge run by
    ``compute``). Raises AdapterFormatError naming the file, key or setting that cannot be served."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{adapter_dir / CONFIG_FILE}: cannot read the adapter config: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA")
    for setting, refused in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(setting) is refused:
            raise AdapterFormatError(f"{CONFIG_FILE}: {setting}={refused} is not served by this runtime")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterFormatError(f"{CONFIG_FILE}: trained biases (bias={config.get('bias')!r}) are not served")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"{CONFIG_FILE}: modules_to_save {config['modules_to_save']} is not served")
    try:
        tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise AdapterFormatError(f"{adapter_dir / WEIGHTS_FILE}: cannot read the weights: {exc}") from exc

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.lora_(A|B)\.weight", key)
        if found is None:
            raise AdapterFormatError(f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B weight of a linear layer")
        halves.setdefault(found.group(1), {})[found.group(2)] = tensor
    if not halves:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: no LoRA weights")

    alpha = config.get("lora_alpha", 8)
    layers: dict[str, LoraWeights] = {}
    for path, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"{WEIGHTS_FILE}: {path} has lora_{''.join(pair)} but not both A and B")
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise AdapterFormatError(f"{WEIGHTS_FILE}: the base model has no layer {path}") from exc
        linear = module.base if isinstance(module, SlotLinear) else module
        if not isinstance(linear, nn.Linear):
            raise AdapterFormatError(f"{WEIGHTS_FILE}: {path} is a {type(linear).__name__}, not a linear layer")
        down, up = pair["A"], pair["B"]
        rank = down.shape[0]
        if down.shape != (rank, linear.in_features) or up.shape != (linear.out_features, rank):
            raise AdapterFormatError(
                f"{WEIGHTS_FILE}: {path} has A {tuple(down.shape)} and B {tuple(up.shape)}, which do not fit "
                f"a {linear.in_features}->{linear.out_features} layer (another base model?)")
        layer_alpha = _pattern_value(config.get("alpha_pattern"), path, alpha)
        scale = layer_alpha / math.sqrt(rank) if config.get("use_rslora") else layer_alpha / rank
        device, dtype = linear.weight.device, linear.weight.dtype
        if merge:  # summed in float32, as PEFT merges, then rounded once to the layer's dtype
            def merged(linear=linear, up=up, down=down, scale=scale, device=device, dtype=dtype) -> torch.Tensor:
                update = up.to(device, torch.float32) @ down.to(device, torch.float32) * float(scale)
                return (linear.weight.detach().float() + update).to(dtype)

            layers[path] = LoraWeights(merged=compute(merged))
        else:
            layers[path] = LoraWeights(down=down.to(device, dtype),
                                       up=(up.to(device, torch.float32) * float(scale)).to(dtype))
    return layers


class LoraSlots:
    """The adapters loaded into one base model. Thread safety: ``load`` and ``unload`` may run beside
    forward passes (wrapping a layer keeps its output until an adapter that uses it is selected; slots
    are dict entries a running pass never iterates); ``select`` must not run during a forward pass.

    ``compute`` runs each layer's merge: `kolm serve` hands it to its model thread, where every pass runs, so that
    one thread of the process does all torch work (see ``serve/backends.py``) and passes go on between layers."""

    def __init__(self, model: nn.Module, merge: bool | None = None,
                 compute: Callable[[Callable[[], torch.Tensor]], torch.Tensor] = lambda work: work()) -> None:
        self.model = model
        self._compute = compute
        # Merged weights by default on a CPU (see the module's docstring).
        self.merge = next(model.parameters()).device.type == "cpu" if merge is None else merge
        self.selection = Selection()
        self._layers: dict[str, SlotLinear] = {}
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def load(self, name: str, adapter_dir: Path) -> None:
        """Read and check the whole adapter first, then install it; a bad adapter changes nothing."""
        layers = read_lora(adapter_dir, self.model, self.merge, self._compute)
        with self._lock:
            if name in self._names:
                return
            for path, weights in layers.items():
                self._slot(path).adapters[name] = weights
            self._names.add(name)

    def unload(self, name: str) -> None:
        with self._lock:
            for layer in self._layers.values():
                layer.adapters.pop(name, None)
            self._names.discard(name)
            if self.selection.name == name:
                self.selection.name = None

    def select(self, name: str | None) -> None:
        """Make ``name`` (None: the bare base) the adapter of the next forward pass."""
        with self._lock:
            if name is not None and name not in self._names:
                raise KeyError(name)
            self.selection.name = name

    def _slot(self, path: str) -> SlotLinear:
        """The wrapper of the layer at ``path``, wrapping it on first use; called holding ``_lock``."""
        layer = self._layers.get(path)
        if layer is None:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            layer = SlotLinear(getattr(parent, child), self.selection)
            setattr(parent, child, layer)
            self._layers[path] = layer
        return layer
