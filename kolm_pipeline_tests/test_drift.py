"""The drift test's calibration and power, the request text it embeds, and the on-disk embedding cache.

Statistics run on synthetic embeddings (unit vectors around topic centres) so hundreds of trials take a
second; the cache runs the real MiniLM. bench/drift.py measures the full-size goals on real embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from kolm_pipeline.corpus import embeddings
from kolm_pipeline.corpus.embedding_cache import EmbeddingCache
from kolm_pipeline.evaluate.drift import mmd_test
from kolm_pipeline.stages.drift import DriftConfig, request_text, sample_texts

DIMENSIONS = 24


def _topics(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.standard_normal((count, DIMENSIONS))


def _requests(rng: np.random.Generator, centres: np.ndarray, count: int, spread: float = 0.6) -> np.ndarray:
    """Unit vectors scattered around randomly chosen topic centres, like sentence embeddings of a mix."""
    picked = centres[rng.integers(0, len(centres), count)]
    points = picked + spread * rng.standard_normal((count, DIMENSIONS))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("kernel", ["linear", "gaussian"])
def test_false_alarm_rate_is_alpha_when_nothing_drifted(kernel):
    rng = np.random.default_rng(1)
    centres = _topics(rng, 6)
    trials, alpha = 200, 0.05
    p_values = np.array([
        mmd_test(_requests(rng, centres, 60), _requests(rng, centres, 90), alpha=alpha, permutations=199,
                 kernel=kernel, seed=trial).p_value
        for trial in range(trials)
    ])
    # Exact test: the rate is alpha; 3 binomial standard errors of 200 trials allow 0.096.
    assert np.mean(p_values <= alpha) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert 0.4 < p_values.mean() < 0.6  # p-values are uniform under no drift, not merely rarely small


def test_a_new_topic_in_a_tenth_of_the_window_is_detected():
    rng = np.random.default_rng(2)
    centres, new_topic = _topics(rng, 6), _topics(rng, 1)
    detected = quiet = 0
    for trial in range(20):
        reference = _requests(rng, centres, 600)
        drifted = np.vstack([_requests(rng, centres, 540), _requests(rng, new_topic, 60)])
        detected += mmd_test(drifted, reference, permutations=199, seed=trial).drifted
        quiet += not mmd_test(_requests(rng, centres, 600), reference, permutations=199, seed=trial).drifted
    assert detected >= 16
    assert quiet >= 16


def test_gaussian_kernel_sees_a_change_that_leaves_the_mean_alone():
    """Two opposite topics give the same mean as two other opposite topics: only the Gaussian kernel
    (every moment, not just the mean) tells them apart."""
    rng = np.random.default_rng(3)
    axes = np.eye(DIMENSIONS)
    reference = _requests(rng, np.stack([axes[0], -axes[0]]) * 5, 300, spread=0.5)
    recent = _requests(rng, np.stack([axes[1], -axes[1]]) * 5, 300, spread=0.5)
    assert mmd_test(recent, reference, kernel="gaussian", permutations=199).drifted
    assert not mmd_test(recent, reference, kernel="linear", permutations=199).drifted


def test_the_test_reports_what_it_measured():
    rng = np.random.default_rng(4)
    sample = _requests(rng, _topics(rng, 3), 50)
    same = mmd_test(sample, sample.copy(), permutations=99)
    assert same.statistic == pytest.approx(0.0, abs=1e-9) and same.p_value == 1.0 and not same.drifted
    far = mmd_test(sample, -sample, permutations=99)
    assert far.p_value == pytest.approx(1 / 100) and far.statistic > far.threshold
    assert far.as_dict()["drifted"] is True
    assert (far.n_recent, far.n_reference, far.permutations, far.kernel) == (50, 50, 99, "linear")


@pytest.mark.parametrize("kwargs, message", [
    ({"kernel": "cosine"}, "kernel"),
    ({"alpha": 1.5}, "alpha"),
    ({"permutations": 0}, "permutations"),
])
def test_bad_parameters_are_refused(kwargs, message):
    sample = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        mmd_test(sample, sample, **kwargs)


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"alpha": 0.0}, {"permutations": 0}, {"kernel": "rbf"}])
def test_a_bad_drift_config_fails_when_the_sensor_is_defined(kwargs):
    with pytest.raises(ValueError):
        DriftConfig(**kwargs)


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="one width"):
        mmd_test(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_test(np.zeros((1, 3)), np.zeros((5, 3)))


def test_request_text_is_the_last_user_message():
    assert request_text([{"role": "system", "content": "Route it."}, {"role": "user", "content": " Refund? "}]) == (
        "Refund?")
    parts = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "turn"}]}]
    assert request_text(parts) == "second\nturn"
    assert request_text([{"role": "system", "content": "only a system prompt"}]) == "only a system prompt"
    assert sample_texts(list("abcdef"), 3, seed=1) == sample_texts(list("abcdef"), 3, seed=1)
    assert len(sample_texts(list("abcdef"), 3, seed=1)) == 3


def test_embedding_cache_embeds_each_text_once_and_persists(tmp_path):
    calls: list[list[str]] = []

    def counting_embed(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return embeddings.embed(texts)

    texts = ["My invoice is wrong.", "The app crashes on login.", "Where is my parcel?", "My invoice is wrong."]
    cache = EmbeddingCache(tmp_path / "cache.sqlite", embedder=counting_embed)
    warming = cache.embed(texts, max_new=1)
    assert warming.vectors is None and (warming.embedded, warming.missing) == (1, 2)
    done = cache.embed(texts)
    assert done.vectors.shape == (4, embeddings.DIMENSIONS) and (done.embedded, done.missing) == (2, 0)
    assert np.allclose(done.vectors, embeddings.embed(texts), atol=1e-5)
    assert np.array_equal(done.vectors[0], done.vectors[3])

    reopened = EmbeddingCache(tmp_path / "cache.sqlite", embedder=counting_embed)
    again = reopened.embed(list(reversed(texts)))
    assert again.embedded == 0 and np.array_equal(again.vectors, done.vectors[::-1])
    assert sum(len(call) for call in calls) == 3  # three distinct texts, each embedded once
    assert np.array_equal(reopened.by_keys([reopened.key(texts[1])]), done.vectors[1:2])
    assert reopened.by_keys([reopened.key("never embedded")]) is None


def test_embedding_cache_refuses_vectors_of_the_wrong_width(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache.sqlite", embedder=lambda texts: np.zeros((len(texts), 3)))
    with pytest.raises(ValueError, match="shape"):
        cache.embed(["a text"])
