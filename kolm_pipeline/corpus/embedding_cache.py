"""Sentence embeddings kept on disk by text hash, so a text is embedded once per installation.

A drift check compares the same champion corpus with a window that moves by a few captures between
ticks; with the vectors on disk a tick costs a table lookup instead of a MiniLM pass. The cache is one
SQLite file (stdlib, WAL, safe for the sensor daemon and a bench at once) under `KOLM_HOME`. A key is the
sha256 of the model tag and the text, so a different model or cut-off never reads another's vectors.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kolm_pipeline.corpus import embeddings

MODEL_TAG = f"all-MiniLM-L6-v2/max{embeddings.MAX_TOKENS}"
_LOOKUP_CHUNK = 500


def text_key(text: str, model_tag: str = MODEL_TAG) -> bytes:
    return hashlib.sha256(f"{model_tag}\x00{text}".encode()).digest()


@dataclass(frozen=True)
class CachedEmbeddings:
    """`vectors` (one row per text, in order) when every text is cached, else None; `embedded` is how many
    texts this call embedded and `missing` how many still wait for a later call."""

    vectors: np.ndarray | None
    embedded: int
    missing: int


class EmbeddingCache:
    """Unit-length float32 vectors by text, on disk; `embedder` makes the ones not cached yet."""

    def __init__(
        self,
        path: Path,
        embedder: Callable[[list[str]], np.ndarray] = embeddings.embed,
        model_tag: str = MODEL_TAG,
        dimensions: int = embeddings.DIMENSIONS,
    ) -> None:
        self.path = Path(path)
        self.embedder = embedder
        self.model_tag = model_tag
        self.dimensions = dimensions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS embeddings (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def _read(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._connect() as conn:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, blob in conn.execute(f"SELECT key, vector FROM embeddings WHERE key IN ({marks})", chunk):
                    found[bytes(key)] = np.frombuffer(blob, dtype=np.float32)
        return found

    def _write(self, keys: list[bytes], vectors: np.ndarray) -> None:
        rows = [(key, np.ascontiguousarray(vector, dtype=np.float32).tobytes())
                for key, vector in zip(keys, vectors, strict=True)]
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO embeddings (key, vector) VALUES (?, ?)", rows)

    def key(self, text: str) -> bytes:
        return text_key(text, self.model_tag)

    def by_keys(self, keys: list[bytes]) -> np.ndarray | None:
        """Vectors for keys (one row each, in order), or None when any of them is not cached."""
        found = self._read(list(dict.fromkeys(keys)))
        if any(key not in found for key in keys):
            return None
        return np.stack([found[key] for key in keys]) if keys else np.zeros((0, self.dimensions), np.float32)

    def embed(self, texts: list[str], max_new: int | None = None) -> CachedEmbeddings:
        """Vectors of `texts`, embedding at most `max_new` uncached ones now (None: all of them).

        Capping the new work keeps a sensor tick inside the daemon's time limit on a cold cache: the
        cache warms over a few ticks and the check runs once it is complete."""
        keys = [text_key(text, self.model_tag) for text in texts]
        unique = list(dict.fromkeys(keys))
        found = self._read(unique)
        text_of = dict(zip(keys, texts, strict=True))
        missing = [key for key in unique if key not in found]
        batch = missing if max_new is None else missing[: max(0, max_new)]
        if batch:
            made = np.asarray(self.embedder([text_of[key] for key in batch]), dtype=np.float32)
            if made.shape != (len(batch), self.dimensions):
                raise ValueError(f"embedder returned shape {made.shape}, expected ({len(batch)}, {self.dimensions})")
            self._write(batch, made)
            found.update(zip(batch, made, strict=True))
        left = len(missing) - len(batch)
        if left:
            return CachedEmbeddings(None, len(batch), left)
        matrix = np.stack([found[key] for key in keys]) if keys else np.zeros((0, self.dimensions), np.float32)
        return CachedEmbeddings(matrix, len(batch), 0)
