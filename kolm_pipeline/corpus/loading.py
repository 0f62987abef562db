"""Loading Hugging Face models (the embedding model here, the base model and adapters in `train/` and `evaluate/`):
quietly, and in bfloat16 where the hardware multiplies it natively (``fast_bf16``, the one place that asks).

transformers draws a progress bar for every load (`Loading weights`), for the GGUF conversion and for the shards
it writes, and peft's PeftModel asks transformers a deprecated property (`is_gradient_checkpointing`, a
FutureWarning each time). kolm says per stage what it does and shows one bar per stage (training's), so these
are off while loading and restored after.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers progress bars and no peft FutureWarning inside the block."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_loading, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_bar is not None:
        gguf_loading.tqdm = lambda iterable=None, *args, **kwargs: iterable  # its GGUF bar is plain tqdm
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if gguf_bar is not None:
            gguf_loading.tqdm = gguf_bar
        if bars_were_on:
            hf_logging.enable_progress_bar()


def fast_bf16(use_cuda: bool) -> bool:
    """Whether the hardware has bf16 matmuls: CUDA, or a CPU with AVX512-BF16/AMX (oneDNN's bf16 kernels). Elsewhere
    bfloat16 is emulated and slower than float32."""
    import torch

    if use_cuda:
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
