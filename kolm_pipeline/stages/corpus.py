"""The corpus and recipe stages for one namespace, as the Dagster assets and the CLI run them."""

from __future__ import annotations

from dataclasses import dataclass

from kolm_pipeline.corpus.build import CorpusStats, build_corpus, corpus_cid, read_corpus
from kolm_pipeline.corpus.recipe import Recipe, synthesize_recipe
from kolm_pipeline.corpus.rotation import EVAL_ROTATION_SHARE
from kolm_pipeline.evaluate.tripwire import forget_holdout_baseline
from kolm_pipeline.provenance.atomic import write_atomic
from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.provenance.products import directory_cid
from kolm_pipeline.stages.retention import SPLIT_FILES, text_rows
from kolm_pipeline.stages.workdir import NamespaceWorkdir


class NotEnoughPairs(UserError):
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


def recipe_counts(recipe: Recipe) -> dict[str, int]:
    """What decontamination removed from training (per reason and in all) and what rotated into eval."""
    diagnostics = recipe.diagnostics
    removed = {name: value for name, value in diagnostics["decontamination"].items()
               if name.startswith("decontaminated")}
    rotation = diagnostics["eval_rotation"]
    return {**removed, "eval_candidates": rotation["candidates"], "eval_rotated_in": rotation["rotated_in"]}


def corpus_capture_ids(data: bytes) -> list[int]:
    """The captures a corpus was written from (its rows' provenance)."""
    return [row["meta"]["capture_id"] for row in read_corpus(data) if "capture_id" in row.get("meta", {})]


def run_corpus_stage(workdir: NamespaceWorkdir, store, min_pairs: int, images: bool = False) -> CorpusResult:
    """Build the corpus from kept pairs; refuse below the threshold and say how many more are needed.
    Eval candidates are written but never trained on, so they do not count towards the threshold. `images`: the
    base is a vision-language model, so conversations with stored images are kept (as placeholders)."""
    pairs = store.kept_pairs(workdir.tenant, workdir.namespace)
    data, stats = build_corpus(pairs, images=images)
    usable = stats.written - stats.eval_candidates
    if usable < min_pairs:
        candidates = f" (and {stats.eval_candidates} eval candidates)" if stats.eval_candidates else ""
        raise NotEnoughPairs(
            f"{workdir.partition}: {usable} usable kept pairs{candidates}, the distill threshold is {min_pairs}; "
            f"{min_pairs - usable} more needed"
        )
    cid = corpus_cid(data)
    write_atomic(workdir.corpus, data)
    store.mark_distilled(workdir.tenant, workdir.namespace, corpus_capture_ids(data))
    capture_ids = [pair.id for pair in pairs]
    held, unnamed = text_rows(data)
    receipt = workdir.write_receipt(
        "corpus",
        "corpus.jsonl",
        cid,
        {
            "stats": stats.as_dict(),
            "capture_range": [min(capture_ids), max(capture_ids)] if capture_ids else None,
            "counters": store.counters(workdir.tenant, workdir.namespace),
        },
        capture_ids=held,
        unnamed_rows=unnamed,
    )
    return CorpusResult(cid=cid, stats=stats, receipt_cid=receipt)


def run_recipe_stage(
    workdir: NamespaceWorkdir, seed: int = 0, eval_rotation_share: float = EVAL_ROTATION_SHARE
) -> RecipeResult:
    """Synthesise the recipe from the namespace's corpus (reusing its frozen hold-out, rotating
    `eval_rotation_share` of its eval candidates into eval). Reads the corpus its chain names and the task's
    frozen hold-out by CID, and publishes the hold-out again when this recipe drew it."""
    workdir.pull("corpus")
    workdir.pull_latest("holdout")
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
        eval_rotation_share=eval_rotation_share,
    )
    cid = directory_cid(workdir.recipe)
    if recipe.diagnostics["holdout"]["made_now"]:
        if workdir.store is not None:  # the last good cycle's hold-out score was measured on other rows
            forget_holdout_baseline(workdir.tripwire_ledger(workdir.store), workdir.task)
        holdout = workdir.frozen_holdout.read_bytes()
        ids, unnamed = text_rows(holdout)
        workdir.publish("holdout", capture_ids=ids, unnamed_rows=unnamed,
                        drawn_rows=sum(1 for line in holdout.splitlines() if line.strip()))
    # Diagnostics quote corpus rows beyond the splits: the recipe holds the text of its corpus's captures.
    held, unnamed = text_rows(data, *((workdir.recipe / name).read_bytes() for name in SPLIT_FILES))
    receipt = workdir.write_receipt(
        "recipe",
        "recipe",
        cid,
        {"corpus_cid": recipe.spec["corpus_cid"], "holdout_cid": recipe.spec["holdout_cid"],
         "output_kind": recipe.spec["output_kind"], "counts": recipe.spec["counts"],
         "k_floor": recipe.spec["k_floor"], **recipe_counts(recipe)},
        capture_ids=held,
        unnamed_rows=unnamed,
    )
    return RecipeResult(recipe=recipe, cid=cid, receipt_cid=receipt)
