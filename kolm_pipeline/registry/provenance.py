"""What a deployer needs to know about an artifact, gathered from its manifest and receipts.

Copied into every registry row that puts an artifact into service, so ``kolm registry log`` answers
"what task, what data, what code, what score, what it replaced" from the registry alone, even after
the artifact file itself is gone from this machine.
"""

from __future__ import annotations

import re
from typing import Any

from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.receipts import read_statement
from kolm_pipeline.registry.artifact import KolmArtifact

# The scores a gate reason ends with (evaluate/gate.py), which the score line already shows.
_SCORES_SUFFIX = re.compile(r"; (accuracy [0-9.]+% → [0-9.]+%, )?K [0-9.]+ → [0-9.]+$")


def _stage_predicates(artifact: KolmArtifact) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for envelope in artifact.receipts:
        try:
            predicate = read_statement(envelope).get("predicate")
        except RegistryError:
            continue
        if isinstance(predicate, dict) and isinstance(predicate.get("stage"), str):
            found.setdefault(predicate["stage"], predicate)
    return found


def _k(side: Any, part: str = "k") -> float | None:
    value = side.get(part) if isinstance(side, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def candidate_k(manifest: dict[str, Any]) -> float | None:
    """The artifact's own K, as measured by the evaluation that let it through."""
    evals = manifest.get("evals")
    return _k(evals.get("candidate")) if isinstance(evals, dict) else None


def candidate_accuracy(manifest: dict[str, Any]) -> float | None:
    """The artifact's own accuracy (the K-score's A: mean verifier score on the eval split), as measured by the
    evaluation that let it through."""
    evals = manifest.get("evals")
    return _k(evals.get("candidate"), "accuracy") if isinstance(evals, dict) else None


def percent(value: float | None) -> str:
    """An accuracy as people read it: ``18.1%``; ``-`` when unknown."""
    return "-" if value is None else f"{100 * value:.1f}%"


def provenance(artifact: KolmArtifact, artifact_cid: str) -> dict[str, Any]:
    """Task, data, code, score and lineage of an artifact, as plain JSON."""
    manifest = artifact.manifest
    stages = _stage_predicates(artifact)
    corpus = stages.get("corpus", {})
    adapter = stages.get("adapter", {})
    evals = manifest.get("evals") if isinstance(manifest.get("evals"), dict) else {}
    decision = evals.get("decision") if isinstance(evals.get("decision"), dict) else {}
    base = manifest.get("base_model") if isinstance(manifest.get("base_model"), dict) else {}
    return {
        "artifact_cid": artifact_cid,
        "task": manifest.get("task"),
        "tenant": manifest.get("tenant"),
        "data": {
            "namespace": manifest.get("namespace"),
            "corpus_cid": manifest.get("corpus_cid"),
            "capture_range": corpus.get("capture_range"),
            "counters": manifest.get("counters"),
        },
        "code": {
            "recipe_cid": manifest.get("recipe_cid"),
            "adapter_cid": manifest.get("adapter_cid"),
            "trainer_version": manifest.get("trainer_version") or adapter.get("trainer_version"),
            "base_model": base.get("id"),
            "base_digest": base.get("digest"),
        },
        "score": {
            "accuracy": candidate_accuracy(manifest),
            "accuracy_replaced": _k(evals.get("current"), "accuracy"),
            "k": candidate_k(manifest),
            "k_replaced": _k(evals.get("current")),
            "k_floor": decision.get("k_floor"),
            "gate": decision.get("reason"),
        },
        "output_kind": manifest.get("output_kind"),
        "labels": manifest.get("labels"),
        "parent_cid": manifest.get("parent_cid"),
        "composition": manifest.get("composition"),
        "receipts": [stage for stage in stages],
    }


def composition_line(composition: Any) -> str | None:
    """A composition's parts as people read them: `parts: bafk…(acme.style) ×0.5 + bafk…(acme.support) ×1`."""
    if not isinstance(composition, dict) or not isinstance(composition.get("parts"), list):
        return None
    parts = " + ".join(f"{part.get('artifact_cid')} ({part.get('task')}) ×{part.get('weight'):g}"
                       for part in composition["parts"] if isinstance(part, dict))
    return f"parts: {parts} ({composition.get('combination')}, rank {composition.get('rank')})"


def summary_lines(info: dict[str, Any]) -> list[str]:
    """The provenance block as a few readable lines (``kolm registry log``)."""
    data, code, score = info.get("data") or {}, info.get("code") or {}, info.get("score") or {}
    captures = data.get("capture_range")
    capture_text = f"captures {captures[0]}–{captures[1]}" if isinstance(captures, list) and captures else "captures ?"
    k = score.get("k")
    k_replaced = score.get("k_replaced")
    parts = composition_line(info.get("composition"))
    return [*([parts] if parts else []),
        f"data:  namespace {data.get('namespace')}, corpus {data.get('corpus_cid')}, {capture_text}",
        f"code:  recipe {code.get('recipe_cid')}, trainer {code.get('trainer_version')}, base {code.get('base_model')}",
        f"score: accuracy {percent(score.get('accuracy'))}, K {k if k is None else f'{k:.4f}'} (what it replaced "
        f"scored {percent(score.get('accuracy_replaced'))}, K "
        f"{k_replaced if k_replaced is None else f'{k_replaced:.4f}'} in the same evaluation); "
        f"{_SCORES_SUFFIX.sub('', str(score.get('gate')))}",
    ]
