"""Near-duplicate detection with MinHash and locality-sensitive hashing.

Two requests are near-duplicates when the 5-gram sets of their normalised intent texts overlap by at
least NEAR_DUPLICATE_JACCARD (Jaccard similarity): the same request with another greeting, a trailing
"thanks", a retry with different punctuation. MinHash signatures banded into LSH buckets find the
candidates; the exact Jaccard of the shingle sets decides, so the result does not depend on the hash
family. Everything is seeded from fixed strings, so the same input gives the same answer on every
machine, which the corpus needs: its bytes (and CID) must be reproducible by the HTTP route too.

MinHash rather than embedding similarity: on templated traffic (the demo's tickets) MiniLM puts the
median nearest neighbour at cosine 0.986, so an embedding threshold either drops most of a corpus or
nothing, and float results differ across CPUs; shingle overlap does neither.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from kolm_pipeline.corpus.text import normalise

NEAR_DUPLICATE_JACCARD = 0.85
SHINGLE = 5
NUM_PERM = 128
BANDS = 32  # 32 bands of 4 rows: a pair at Jaccard 0.85 becomes a candidate with probability 1 - 1e-10
_PRIME = 4_294_967_311  # smallest prime above 2**32: (a·x + b) mod p stays exact in uint64


def _stable_u32(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


_A = np.array([_stable_u32(f"minhash-a-{i}") | 1 for i in range(NUM_PERM)], dtype=np.uint64)
_B = np.array([_stable_u32(f"minhash-b-{i}") for i in range(NUM_PERM)], dtype=np.uint64)
_FOLD = np.uint64(4_294_967_291)  # largest prime below 2**32: folds a 40-bit shingle into 32 bits


def shingle_values(text: str) -> np.ndarray:
    """The distinct byte 5-grams of the normalised UTF-8 text, each read as a 40-bit integer (exact: no
    hashing, so no collisions); the whole text when it is shorter."""
    data = np.frombuffer(normalise(text).encode(), dtype=np.uint8).astype(np.uint64)
    if data.size < SHINGLE:
        value = 0
        for byte in data.tolist():
            value = (value << 8) | byte
        return np.array([value + (1 << 40)], dtype=np.uint64)  # apart from every full 5-gram
    grams = np.zeros(data.size - SHINGLE + 1, dtype=np.uint64)
    for offset in range(SHINGLE):
        grams = (grams << np.uint64(8)) | data[offset : offset + grams.size]
    return np.unique(grams)


def shingles(text: str) -> frozenset[int]:
    return frozenset(shingle_values(text).tolist())


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


def signature(values: np.ndarray) -> np.ndarray:
    """MinHash signature: the minimum of NUM_PERM universal hashes (a·x + b mod p) over the shingles."""
    folded = values % _FOLD
    return ((folded[:, None] * _A[None, :] + _B[None, :]) % np.uint64(_PRIME)).min(axis=0)


class NearDuplicateIndex:
    """Greedy near-duplicate filter: `add` keeps an item unless it is a near-duplicate of one kept earlier.

    Items are compared only within the same `group` (the corpus groups by normalised answer, so two
    similar requests with different answers both stay: they teach something). Templated traffic puts
    hundreds of items in one LSH bucket, so candidates are first screened by the share of equal MinHash
    values (an unbiased Jaccard estimate, standard error 0.032 at Jaccard 0.85 with 128 values) and only
    those within ESTIMATE_MARGIN of the threshold get the exact comparison."""

    ESTIMATE_MARGIN = 0.15  # 4.7 standard errors at Jaccard 0.85: a true near-duplicate is not screened out

    def __init__(self, threshold: float = NEAR_DUPLICATE_JACCARD) -> None:
        self.threshold = threshold
        self._buckets: dict[tuple, list[int]] = defaultdict(list)
        self._sets: list[frozenset[int]] = []
        self._signatures = np.zeros((64, NUM_PERM), dtype=np.uint64)

    def add(self, text: str, group: str = "") -> bool:
        """Keep `text` (True) unless it nearly duplicates a kept item in its group (False)."""
        values = shingle_values(text)
        sig = signature(values)
        items, keys = frozenset(values.tolist()), self._band_keys(sig, group)
        if self._match(items, sig, keys) is not None:
            return False
        index = len(self._sets)
        self._sets.append(items)
        if index == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
        self._signatures[index] = sig
        for key in keys:
            self._buckets[key].append(index)
        return True

    def _match(self, items: frozenset[int], sig: np.ndarray, keys: list[tuple]) -> int | None:
        buckets = [self._buckets[key] for key in keys if key in self._buckets]
        if not buckets:
            return None
        candidates = set().union(*buckets)
        indices = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
        estimate = (self._signatures[indices] == sig).mean(axis=1)
        for index in np.sort(indices[estimate >= self.threshold - self.ESTIMATE_MARGIN]).tolist():
            if jaccard(items, self._sets[index]) >= self.threshold:
                return index
        return None

    @staticmethod
    def _band_keys(sig: np.ndarray, group: str) -> list[tuple]:
        width = NUM_PERM // BANDS
        return [(group, band, sig[band * width : (band + 1) * width].tobytes()) for band in range(BANDS)]
