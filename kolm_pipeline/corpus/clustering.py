"""Intent clusters and how consistently similar requests get the same answer.

Requests are embedded (embeddings.py) and grouped with k-means (scikit-learn). The clusters serve two
purposes: the train/eval split is stratified by them for non-categorical outputs, so every kind of request
is represented in eval; and their purity estimates how learnable the task is, which sets the K-floor.

Purity is measured, not assumed: for each sampled request, the answer of its most similar request in
the same cluster (nearest neighbour by cosine, itself excluded) is scored against its own answer with the
kind's agreement measure, which mirrors the verifier that will judge the student. A task where similar
requests get the same answer is one a student can learn; one where they do not (noisy labels, answers
that depend on facts outside the request) is not, whatever the student. Nearest-neighbour agreement is a
leave-one-out estimate, so unlike majority-label purity it does not rise just because there are more,
smaller clusters.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from kolm_pipeline.corpus.text import token_f1

MAX_CLUSTERS = 64
# Requests embedded per recipe: embedding every request of a large corpus would dominate synthesis time
# (docs/benchmarks.md); 400 measure purity to within a few points and find the
# intents. The rest join the cluster of their most similar embedded request (character n-gram TF-IDF).
EMBED_SAMPLE = 400
_SHAPE = [(re.compile(r"[A-Z]+"), "A"), (re.compile(r"[a-z]+"), "a"), (re.compile(r"[0-9]+"), "9"),
          (re.compile(r"\s+"), " ")]


def choose_k(count: int, labels: int = 0) -> int:
    """sqrt(n/2) clusters (the usual rule of thumb), at least one per label, within [1, MAX_CLUSTERS]."""
    if count < 4:
        return 1
    return max(1, min(MAX_CLUSTERS, count - 1, max(labels, round(math.sqrt(count / 2)))))


def cluster(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels for unit vectors (cosine geometry); deterministic for a given seed."""
    if k <= 1 or len(vectors) <= k:
        return np.zeros(len(vectors), dtype=np.int64) if k <= 1 else np.arange(len(vectors), dtype=np.int64)
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100)
    return model.fit_predict(np.ascontiguousarray(vectors, dtype=np.float32)).astype(np.int64)


def embed_sample(count: int, seed: int = 0, size: int = EMBED_SAMPLE) -> list[int]:
    """Indices of the requests to embed: all of them, or a seeded sample of `size`."""
    if count <= size:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), size))


def propagate(texts: list[str], sampled: list[int], sample_labels: np.ndarray) -> np.ndarray:
    """Cluster labels for every text: a sampled text keeps its own, any other takes the label of the sampled
    text most similar to it by character 3–5-gram TF-IDF cosine."""
    labels = np.empty(len(texts), dtype=np.int64)
    labels[sampled] = sample_labels
    rest = sorted(set(range(len(texts))) - set(sampled))
    if not rest:
        return labels
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, min_df=1)
    matrix = vectorizer.fit_transform([texts[i] for i in sampled] + [texts[i] for i in rest])
    reference, others = matrix[: len(sampled)], matrix[len(sampled) :]
    for start in range(0, len(rest), 2048):
        similarity = (others[start : start + 2048] @ reference.T).toarray()
        labels[rest[start : start + 2048]] = sample_labels[similarity.argmax(axis=1)]
    return labels


def shape(text: str) -> str:
    """The form of an extracted span: runs of capitals, lowercase, digits collapsed ("ORD-4471" → "A-9")."""
    for pattern, token in _SHAPE:
        text = pattern.sub(token, text.strip())
    return text


def _json_or_none(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def agreement(kind: str, reference: str, other: str) -> float:
    """How far `other` would pass as the answer for `reference`'s request, in [0, 1], per output kind:
    categorical — same label; JSON — share of the reference's top-level fields with equal values (the
    json_schema verifier's field match); extractive — same span shape (similar requests extract the same
    kind of thing); free text — token F1 (the text_match verifier)."""
    if kind == "categorical":
        return float(reference.strip() == other.strip())
    if kind == "json":
        expected, value = _json_or_none(reference), _json_or_none(other)
        if expected is None or value is None:
            return 0.0
        if not expected:
            return float(not value)
        return sum(1 for key, wanted in expected.items() if value.get(key) == wanted) / len(expected)
    if kind == "extractive":
        return float(shape(reference) == shape(other))
    return token_f1(other, reference)


@dataclass(frozen=True)
class ClusterSummary:
    cluster: int
    size: int
    purity: float | None  # None when no member was sampled
    sampled: int
    top_answers: list[tuple[str, int]]
    examples: list[str]
    top_fields: dict[str, list[tuple[str, int]]] | None = None  # JSON outputs: common values per field

    def as_dict(self) -> dict:
        summary = {
            "cluster": self.cluster,
            "size": self.size,
            "purity": None if self.purity is None else round(self.purity, 4),
            "sampled": self.sampled,
            "examples": [_clip(text, 120) for text in self.examples],
        }
        if self.top_fields is not None:
            summary["top_field_values"] = {key: [[_clip(value, 60), count] for value, count in values]
                                           for key, values in self.top_fields.items()}
        else:
            summary["top_answers"] = [[_clip(text, 80), count] for text, count in self.top_answers]
        return summary


@dataclass(frozen=True)
class PurityReport:
    """Overall and per-cluster agreement of similar requests' answers."""

    purity: float
    sampled: int
    clusters: list[ClusterSummary]


def _top_fields(answers: list[str]) -> dict[str, list[tuple[str, int]]]:
    """The two most common values of each top-level field, for fields where some value repeats."""
    counts: dict[str, Counter] = {}
    for text in answers:
        for key, value in (_json_or_none(text) or {}).items():
            counts.setdefault(key, Counter())[json.dumps(value, sort_keys=True, ensure_ascii=False)] += 1
    return {key: counter.most_common(2) for key, counter in sorted(counts.items())
            if counter.most_common(1)[0][1] > 1}


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def neighbour_purity(
    kind: str,
    vectors: np.ndarray,
    labels: np.ndarray,
    answers: list[str],
    texts: list[str],
    sizes: dict[int, int] | None = None,
) -> PurityReport:
    """Within-cluster nearest-neighbour agreement of the embedded requests. A request alone in its
    cluster is compared with its nearest neighbour anywhere. `sizes` gives each cluster's size over the
    whole corpus when only a sample was embedded."""
    count = len(answers)
    if count < 2:
        return PurityReport(purity=1.0, sampled=0, clusters=[])
    sampled = range(count)
    scores: dict[int, float] = {}
    members_of: dict[int, np.ndarray] = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    for index in sampled:
        members = members_of[int(labels[index])]
        candidates = members[members != index]
        if candidates.size == 0:
            candidates = np.array([j for j in range(count) if j != index])
        similarity = vectors[candidates] @ vectors[index]
        nearest = int(candidates[int(np.argmax(similarity))])
        scores[index] = agreement(kind, answers[index], answers[nearest])
    summaries = []
    sizes = sizes or {cluster_id: len(members) for cluster_id, members in members_of.items()}
    for cluster_id, members in sorted(members_of.items(), key=lambda item: (-sizes[item[0]], item[0])):
        member_scores = [scores[int(i)] for i in members]
        top = Counter(answers[int(i)].strip() for i in members).most_common(3)
        fields = _top_fields([answers[int(i)] for i in members]) if kind == "json" else None
        summaries.append(
            ClusterSummary(
                cluster=cluster_id,
                size=sizes[cluster_id],
                purity=sum(member_scores) / len(member_scores) if member_scores else None,
                sampled=len(member_scores),
                top_answers=top,
                examples=[texts[int(i)] for i in members[:2]],
                top_fields=fields,
            )
        )
    return PurityReport(purity=sum(scores.values()) / len(scores), sampled=len(scores), clusters=summaries)
