"""The corpus and recipe stages for one namespace, as the Dagster assets and the CLI run them."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kolm_pipeline.corpus.build import CorpusStats, build_corpus, corpus_cid, read_corpus
from kolm_pipeline.corpus.recipe import Recipe, synthesize_recipe
from kolm_pipeline.workdir import NamespaceWorkdir, directory_cid


class NotEnoughPairs(Exception):
    """The namespace has fewer kept pairs than its distill threshold."""


@dataclass(frozen=True)
class CorpusResult:
    cid: str
    stats: CorpusStats
    receipt_cid: str


@dataclass(frozen=True)
class RecipeResult:
    recipe: Recipe
    cid: str
    receipt_cid: str


def corpus_capture_ids(data: bytes) -> list[int]:
    """The captures a corpus was written from (its rows' provenance)."""
    return [row["meta"]["capture_id"] for row in read_corpus(data) if "capture_id" in row.get("meta", {})]


def run_corpus_stage(workdir: NamespaceWorkdir, store, min_pairs: int) -> CorpusResult:
    """Build the corpus from kept pairs; refuse below the threshold and say how many more are needed."""
    pairs = store.kept_pairs(workdir.tenant, workdir.namespace)
    data, stats = build_corpus(pairs)
    if stats.written < min_pairs:
        raise NotEnoughPairs(
            f"{workdir.partition}: {stats.written} usable kept pairs, the distill threshold is {min_pairs}; "
            f"{min_pairs - stats.written} more needed"
        )
    cid = corpus_cid(data)
    workdir.root.mkdir(parents=True, exist_ok=True)
    tmp = workdir.corpus.with_name(workdir.corpus.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, workdir.corpus)
    store.mark_distilled(workdir.tenant, workdir.namespace, corpus_capture_ids(data))
    capture_ids = [pair.id for pair in pairs]
    receipt = workdir.write_receipt(
        "corpus",
        "corpus.jsonl",
        cid,
        {
            "stats": stats.as_dict(),
            "capture_range": [min(capture_ids), max(capture_ids)] if capture_ids else None,
            "counters": store.counters(workdir.tenant, workdir.namespace),
        },
    )
    return CorpusResult(cid=cid, stats=stats, receipt_cid=receipt)


def run_recipe_stage(workdir: NamespaceWorkdir, seed: int = 0) -> RecipeResult:
    """Synthesise the recipe from the namespace's corpus (reusing its frozen hold-out)."""
    data = workdir.corpus.read_bytes()
    rows = read_corpus(data, source=str(workdir.corpus))
    recipe = synthesize_recipe(
        rows,
        workdir.recipe,
        task=workdir.task,
        tenant=workdir.tenant,
        namespace=workdir.namespace,
        corpus_cid=corpus_cid(data),
        frozen_holdout=workdir.frozen_holdout,
        seed=seed,
    )
    cid = directory_cid(workdir.recipe)
    receipt = workdir.write_receipt(
        "recipe",
        "recipe",
        cid,
        {"corpus_cid": recipe.spec["corpus_cid"], "holdout_cid": recipe.spec["holdout_cid"],
         "output_kind": recipe.spec["output_kind"], "counts": recipe.spec["counts"],
         "k_floor": recipe.spec["k_floor"]},
    )
    return RecipeResult(recipe=recipe, cid=cid, receipt_cid=receipt)
