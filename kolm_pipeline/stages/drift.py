"""The drift check of one namespace: the requests it gets now against those its serving adapter learned from.

Reference: the requests of the champion's training corpus. The task's pointer names the serving `.kolm`;
its corpus receipt names the range of captures the corpus was built from, and the reference is the kept,
non-served requests of that range (sampled down to `max_reference`). The raw requests, not the corpus
rows: the corpus drops exact and near duplicates, which changes the density of requests, so raw traffic
against it "drifts" when nothing did (bench/drift.py shows it; docs/benchmarks.md has the run). Both
samples raw keeps them exchangeable under no drift, which is what makes the permutation test's alpha exact.
Once all reference vectors are cached their keys (sha256 of the text; no text) are kept in
`KOLM_HOME/drift/<partition>/reference-<corpus cid>.json`, so the reference survives the retention window and
later distills.

Recent: the newest `window` captures that arrived after that range and still hold their text; whatever
the triage said, since drift is about what users ask, not what was kept.

Window: one test per `window` new captures (the captured counter divided by the window), never one per tick:
re-testing an overlapping window every few minutes would multiply the false alarms that alpha bounds.

A request's text is its last user message: what is asked now, without the shared system prompt that would
make every request look alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kolm_pipeline.corpus.build import SERVED_TAG, text_content
from kolm_pipeline.corpus.embedding_cache import EmbeddingCache
from kolm_pipeline.evaluate.drift import (
    DEFAULT_ALPHA,
    DEFAULT_KERNEL,
    DEFAULT_PERMUTATIONS,
    KERNELS,
    DriftTest,
    mmd_test,
)
from kolm_pipeline.provenance.atomic import write_json_atomic
from kolm_pipeline.provenance.errors import DeployRefused, InvalidInput, RegistryError
from kolm_pipeline.provenance.receipts import read_statement
from kolm_pipeline.registry.artifact import read_kolm
from kolm_pipeline.registry.manage import artifact_cid_of, local_artifact
from kolm_pipeline.registry.swap import read_pointer
from kolm_pipeline.settings import Settings
from kolm_pipeline.stages.workdir import NamespaceWorkdir


@dataclass(frozen=True)
class DriftConfig:
    """`window`: recent captures per test, and new captures between tests; `min_samples`: fewer recent
    requests or reference rows and no test runs; `max_reference`: the champion's requests are sampled down
    to this many; `max_new_embeddings`: texts embedded per namespace per tick (a cold cache warms over
    several ticks, inside the daemon's time limit)."""

    window: int = 1000
    min_samples: int = 100
    max_reference: int = 2000
    alpha: float = DEFAULT_ALPHA
    permutations: int = DEFAULT_PERMUTATIONS
    kernel: str = DEFAULT_KERNEL
    max_new_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.window < 2 or self.min_samples < 2 or self.max_reference < 2:
            raise InvalidInput("window, min_samples and max_reference must be at least 2")
        if not 0 < self.alpha < 1 or self.permutations < 1 or self.kernel not in KERNELS:
            raise InvalidInput(f"alpha must lie in (0, 1), permutations be at least 1 and kernel one of {KERNELS}")


@dataclass(frozen=True)
class Champion:
    """The serving artifact of a task and the capture ids its corpus was built from."""

    artifact_cid: str
    corpus_cid: str
    first_capture: int
    last_capture: int


@dataclass(frozen=True)
class DriftOutcome:
    """What one check did. `tested` says a test ran (then `test` holds it); otherwise `reason` says why not.
    `memo` is what the caller keeps for the next check of this namespace (the sensor's cursor)."""

    partition: str
    tested: bool
    reason: str
    memo: dict
    window: int | None = None
    champion: Champion | None = None
    test: DriftTest | None = None
    embedded: int = 0

    @property
    def window_id(self) -> str:
        """Identifies the tested window: the same champion corpus and window never trigger twice."""
        return f"{self.champion.corpus_cid if self.champion else None}:{self.window}"


class DriftUnavailable(Exception):
    """No test this time; the message says why."""


def request_text(messages: list[dict]) -> str:
    """The text of a request's last user message (all text messages joined when there is none)."""
    texts = [(m.get("role"), text_content(m.get("content"))) for m in messages if isinstance(m, dict)]
    users = [text for role, text in texts if role == "user" and text and text.strip()]
    if users:
        return users[-1].strip()
    return "\n".join(text for _, text in texts if text).strip()


def recent_requests(store, tenant: str, namespace: str, window: int, after_capture: int) -> list[str]:
    """Texts of the newest `window` captures after capture id `after_capture` whose text is still stored."""
    texts = []
    for capture in store.list_captures(tenant, namespace, limit=window):
        if capture.id > after_capture and capture.expired_at is None:
            text = request_text(capture.messages)
            if text:
                texts.append(text)
    return texts


def seed_of(*parts: object) -> int:
    """A stable 64-bit seed: the same window is tested with the same permutations on every run."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def sample_texts(texts: list[str], limit: int, seed: int) -> list[str]:
    """At most `limit` of `texts`, uniformly at random, in their order."""
    if len(texts) <= limit:
        return texts
    picked = np.random.default_rng(seed).choice(len(texts), size=limit, replace=False)
    return [texts[index] for index in sorted(picked)]


def reference_requests(store, tenant: str, namespace: str, champion: Champion, limit: int) -> list[str]:
    """The champion's training requests: kept, non-served pairs of its corpus's capture range."""
    texts = [
        text
        for pair in store.kept_pairs(tenant, namespace)
        if champion.first_capture <= pair.id <= champion.last_capture and SERVED_TAG not in pair.tags
        and (text := request_text(pair.messages))
    ]
    return sample_texts(texts, limit, seed_of(champion.corpus_cid))


def drift_dir(settings: Settings) -> Path:
    return settings.home / "drift"


def embedding_cache(settings: Settings) -> EmbeddingCache:
    """The installation's embedding cache, `KOLM_HOME/drift/embeddings.sqlite`."""
    return EmbeddingCache(drift_dir(settings) / "embeddings.sqlite")


def _corpus_receipt(receipts: list[bytes]) -> dict:
    for envelope in receipts:
        predicate = read_statement(envelope).get("predicate") or {}
        if predicate.get("stage") == "corpus":
            return predicate
    raise DriftUnavailable("the serving artifact holds no corpus receipt")


def champion_of(settings: Settings, task: str, memo: dict, store=None) -> Champion:
    """The task's serving artifact and its corpus's capture range; the archive is read once per artifact. On a host
    without the task's pointer (the daemon's pod), the registry's champion, fetched by CID."""
    try:
        pointer = read_pointer(settings.adapters_dir, task)
    except RegistryError as exc:
        raise DriftUnavailable(f"the serving pointer is broken: {exc}") from None
    artifact = artifact_cid_of(pointer) if pointer is not None else None
    if artifact is None and store is not None:
        artifact = store.champions(task).get(task)
    if artifact is None:
        raise DriftUnavailable("no adapter is deployed yet, so there is no training corpus to compare with")
    known = memo.get("champion")
    if isinstance(known, dict) and known.get("artifact_cid") == artifact:
        return Champion(**known)
    try:
        kolm = read_kolm(pointer if pointer is not None else local_artifact(settings, task, artifact))
        receipt = _corpus_receipt(kolm.receipts)
    except (RegistryError, DeployRefused) as exc:
        raise DriftUnavailable(f"cannot read the serving artifact {artifact}: {exc}") from None
    span = receipt.get("capture_range")
    corpus = kolm.manifest.get("corpus_cid")
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) for i in span)) or not corpus:
        raise DriftUnavailable(f"the serving artifact {artifact} names no corpus capture range")
    return Champion(artifact, corpus, span[0], span[1])


def _reference(store, settings: Settings, workdir: NamespaceWorkdir, champion: Champion, config: DriftConfig,
               cache: EmbeddingCache) -> tuple[np.ndarray | None, int]:
    """The reference vectors (None while the cache still warms) and how many texts were embedded now."""
    snapshot = drift_dir(settings) / workdir.partition / f"reference-{champion.corpus_cid}.json"
    if snapshot.is_file():
        try:
            keys = [bytes.fromhex(key) for key in json.loads(snapshot.read_text())["keys"]]
        except (ValueError, KeyError, TypeError):  # a damaged snapshot is rebuilt below
            keys = []
        vectors = cache.by_keys(keys) if keys else None
        if vectors is not None:
            return vectors, 0
    texts = reference_requests(store, workdir.tenant, workdir.namespace, champion, config.max_reference)
    found = cache.embed(texts, max_new=config.max_new_embeddings)
    if found.vectors is not None and texts:
        for stale in snapshot.parent.glob("reference-*.json"):
            stale.unlink(missing_ok=True)
        write_json_atomic(snapshot, {"corpus_cid": champion.corpus_cid, "keys": [cache.key(t).hex() for t in texts]})
    return found.vectors, found.embedded


def _warming(embedded: int) -> str:
    return (f"warming the embedding cache ({embedded} texts embedded this tick); the test runs when every text "
            "is embedded")


def check_drift(store, settings: Settings, partition: str, cache: EmbeddingCache, config: DriftConfig,
                memo: dict | None = None) -> DriftOutcome:
    """Test the namespace's newest window against its champion's training requests, once per window."""
    memo = dict(memo or {})
    workdir = NamespaceWorkdir(settings, partition)
    captured = store.counters(workdir.tenant, workdir.namespace)["captured"]
    window = captured // config.window
    try:
        champion = champion_of(settings, workdir.task, memo, store)
    except DriftUnavailable as exc:
        return DriftOutcome(partition, False, str(exc), memo, window)
    memo["champion"] = asdict(champion)
    done = {"partition": partition, "memo": memo, "window": window, "champion": champion}
    if memo.get("tested") == f"{champion.corpus_cid}:{window}":
        left = (window + 1) * config.window - captured
        return DriftOutcome(tested=False, reason=f"window {window} is tested; the next test comes in {left} "
                            "captures", **done)
    reference, embedded = _reference(store, settings, workdir, champion, config, cache)
    recent_texts = recent_requests(store, workdir.tenant, workdir.namespace, config.window, champion.last_capture)
    if len(recent_texts) < config.min_samples:
        warming = f"; {_warming(embedded)}" if reference is None else ""
        return DriftOutcome(tested=False, embedded=embedded, reason=(
            f"{len(recent_texts)} requests since the champion's corpus; a test needs {config.min_samples}"
            f"{warming}"), **done)
    recent = cache.embed(recent_texts, max_new=config.max_new_embeddings - embedded)
    embedded += recent.embedded
    if reference is None or recent.vectors is None:
        return DriftOutcome(tested=False, embedded=embedded, reason=_warming(embedded), **done)
    if len(reference) < config.min_samples:
        return DriftOutcome(tested=False, embedded=embedded, reason=(
            f"{len(reference)} training requests of the champion still hold their text; a test needs "
            f"{config.min_samples}"), **done)
    test = mmd_test(recent.vectors, reference, alpha=config.alpha, permutations=config.permutations,
                    kernel=config.kernel, seed=seed_of(partition, champion.corpus_cid, window))
    memo["tested"] = f"{champion.corpus_cid}:{window}"
    verdict = "drift" if test.drifted else "no drift"
    return DriftOutcome(tested=True, embedded=embedded, test=test, reason=(
        f"{verdict}: p = {test.p_value:.4f} at alpha {test.alpha} ({test.n_recent} recent vs {test.n_reference} "
        "training requests)"), **done)
