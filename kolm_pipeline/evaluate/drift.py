"""Embedding drift: is a window of recent requests drawn from the distribution the serving adapter was
trained on?

The test is a two-sample permutation test on sentence embeddings. Its statistic is the squared distance
between the two samples' mean feature vectors, the maximum mean discrepancy (MMD) of a kernel whose
features are either the unit embeddings themselves (`linear`: the cosine kernel) or random Fourier
features of a Gaussian kernel (`gaussian`, bandwidth by the median heuristic on the pooled sample).
The null distribution comes from relabelling the pooled sample at random, so when nothing drifted the two
samples are exchangeable and P(p ≤ alpha) ≤ alpha exactly, whatever the embedding geometry: no
asymptotics, no tuning of the threshold. Every relabelling is a row of a (P × n) matrix of ±1/size weights,
so all P statistics are one matrix product with the pooled (n × d) features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

KERNELS = ("linear", "gaussian")
DEFAULT_ALPHA = 0.05
DEFAULT_PERMUTATIONS = 1000
DEFAULT_KERNEL = "linear"
FOURIER_FEATURES = 512
_BANDWIDTH_SAMPLE = 500


@dataclass(frozen=True)
class DriftTest:
    """One test's outcome. `threshold` is the (1 − alpha) quantile of the permutation statistics: the
    observed statistic beyond it is what `p_value ≤ alpha` means."""

    statistic: float
    p_value: float
    threshold: float
    alpha: float
    n_recent: int
    n_reference: int
    permutations: int
    kernel: str

    @property
    def drifted(self) -> bool:
        return self.p_value <= self.alpha

    def as_dict(self) -> dict:
        return {**asdict(self), "drifted": self.drifted}


def _fourier_features(pooled: np.ndarray, rng: np.random.Generator, dims: int) -> np.ndarray:
    """Random Fourier features of a Gaussian kernel whose bandwidth is the median pairwise distance of
    (a sample of) the pooled points; it depends on the pooled set only, so relabelling leaves it alone."""
    sample = pooled[rng.choice(len(pooled), size=min(len(pooled), _BANDWIDTH_SAMPLE), replace=False)]
    squared = np.sum(sample * sample, axis=1)
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * sample @ sample.T, 0))
    off_diagonal = distances[np.triu_indices(len(sample), k=1)]
    bandwidth = float(np.median(off_diagonal)) if off_diagonal.size and np.median(off_diagonal) > 0 else 1.0
    omega = rng.standard_normal((pooled.shape[1], dims)).astype(np.float32) / np.float32(bandwidth)
    phase = rng.uniform(0, 2 * np.pi, dims).astype(np.float32)
    return np.sqrt(np.float32(2.0 / dims)) * np.cos(pooled @ omega + phase)


def mmd_test(
    recent: np.ndarray,
    reference: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    permutations: int = DEFAULT_PERMUTATIONS,
    kernel: str = DEFAULT_KERNEL,
    seed: int = 0,
) -> DriftTest:
    """Test whether `recent` and `reference` (rows are embeddings) come from one distribution.

    p-value = (1 + #{relabelled statistics ≥ observed}) / (1 + P), the permutation test's exact form."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if permutations < 1:
        raise ValueError("permutations must be at least 1")
    recent = np.asarray(recent, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    if recent.ndim != 2 or reference.ndim != 2 or recent.shape[1] != reference.shape[1]:
        raise ValueError(f"samples must be matrices of one width, got {recent.shape} and {reference.shape}")
    n, m = len(recent), len(reference)
    if n < 2 or m < 2:
        raise ValueError(f"each sample needs at least 2 rows, got {n} recent and {m} reference")
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([recent, reference])
    features = _fourier_features(pooled, rng, FOURIER_FEATURES) if kernel == "gaussian" else pooled
    features = features - features.mean(axis=0)  # the weights sum to 0; centring only helps float32 precision
    labels = np.concatenate([np.full(n, 1.0 / n, np.float32), np.full(m, -1.0 / m, np.float32)])
    # Row 0 is the observed labelling; the others are relabellings. One product gives every statistic,
    # computed the same way, so ties and rounding treat the observed one like the rest.
    weights = np.vstack([labels, rng.permuted(np.tile(labels, (permutations, 1)), axis=1)])
    differences = weights @ features
    statistics = np.einsum("ij,ij->i", differences, differences, dtype=np.float64)
    observed, null = statistics[0], statistics[1:]
    return DriftTest(
        statistic=float(observed),
        p_value=float((1 + np.count_nonzero(null >= observed)) / (1 + permutations)),
        threshold=float(np.quantile(null, 1 - alpha, method="higher")),
        alpha=alpha,
        n_recent=n,
        n_reference=m,
        permutations=permutations,
        kernel=kernel,
    )
