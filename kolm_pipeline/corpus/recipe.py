"""Recipes: what to train, how to check it, and on which splits.

A recipe directory holds `spec.json` (validated against the schema shipped next to this module),
`train.jsonl`, `eval.jsonl`, `holdout.jsonl` and `diagnostics.json`. The pipeline synthesises one from
observations (recipe-from-observations: output kind, verifier, intent clusters, splits, K-floor); people
can write one by hand in the same format and `kolm compile` accepts it. A directory is written under a
`.partial` name and renamed into place, so a reader never sees half a recipe.

No input the student is judged on is trained on: eval candidates (rotation.py) never reach train.jsonl, and
decontamination (decontaminate.py) removes every training pair that overlaps a hold-out, eval or candidate
input. A row may carry a provenance `"weight"` (a number >= 0, default 1.0) that the trainer scales its loss by.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path

import jsonschema

from kolm_pipeline.corpus.build import input_key
from kolm_pipeline.corpus.clustering import choose_k, cluster, embed_sample, neighbour_purity, propagate
from kolm_pipeline.corpus.decontaminate import EMBEDDING_COSINE, MIN_NGRAM_TOKENS, NGRAM, Decontaminator
from kolm_pipeline.corpus.json_grammar import LAYOUT_KEY, JsonSchemaProblem, json_grammar, json_layout
from kolm_pipeline.corpus.kfloor import k_floor
from kolm_pipeline.corpus.kinds import (
    GROUNDED_SHARE,
    MAX_LABELS,
    VERIFIER_FOR_KIND,
    KindDecision,
    answer,
    detect_output_kind,
    infer_json_schema,
    json_objects,
    mark_grounded,
    prompt_text,
)
from kolm_pipeline.corpus.pairs import scan_pair_file
from kolm_pipeline.corpus.rotation import EVAL_ROTATION_SHARE, capture_ids, check_share, is_eval_candidate, rotate
from kolm_pipeline.corpus.text import intent_text, template_messages
from kolm_pipeline.corpus.train_config import TrainConfig
from kolm_pipeline.provenance.atomic import write_atomic
from kolm_pipeline.provenance.cid import cid_for_bytes
from kolm_pipeline.provenance.errors import UserError

__all__ = [
    "DEFAULT_K_FLOOR", "MAX_LABELS", "RECIPE_FORMAT", "SPEC_SCHEMA", "VERIFIER_FOR_KIND", "DryRunReport", "Recipe",
    "RecipeError", "answer", "detect_output_kind", "dry_run", "dry_run_report", "infer_json_schema", "load_recipe",
    "prompt_text", "read_jsonl", "synthesize_recipe",
]

# The shipped schema; its `training` is TrainConfig's JSON Schema, generated into the file (a test keeps them equal).
SPEC_SCHEMA = json.loads((Path(__file__).with_name("recipe_spec.schema.json")).read_text())
# spec.json is checked with `training` only required to be an object: TrainConfig.problems then checks the settings
# with lines that name the setting and what it expects, clearer than a JSON Schema validator's.
_SPEC_VALIDATOR = jsonschema.Draft202012Validator(
    {**SPEC_SCHEMA, "properties": {**SPEC_SCHEMA["properties"], "training": {"type": "object"}}})
RECIPE_FORMAT = "kolm-recipe/1"
DEFAULT_K_FLOOR = 0.50
HOLDOUT_SHARE = 0.15
EVAL_SHARE = 0.20
# The splits take their share of a small corpus but stop growing at what the gate needs, so a large corpus trains
# on the rest: the gate mostly compares a candidate with the champion it would replace, two adapters that differ
# on few cases; at 5 % of cases answered differently, 400 paired cases put the 95 % interval of their accuracy
# difference at ±0.022, i.e. ±0.009 of K (A weighs 0.40): enough to resolve a +0.01 K margin.
SPLIT_MAX_CASES = 400
GATE_DISCORDANCE = 0.05
MIN_CORPUS_PAIRS = 10
MIN_TRAIN_PAIRS = 10
MIN_EVAL_PAIRS = 3
SPLIT_FILES = ("train.jsonl", "eval.jsonl", "holdout.jsonl")
_MAX_REPORTED = 5
_MAX_LISTED = 50  # removals named one by one in diagnostics.json; the counts cover all of them


class RecipeError(UserError):
    """A recipe is invalid; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Recipe:
    """A loaded, validated recipe directory."""

    path: Path
    spec: dict
    train: list[dict]
    eval: list[dict]
    holdout: list[dict]
    diagnostics: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str] | None:
        return self.spec.get("labels")


# ---------------------------------------------------------------------------------------------------------
# Reading and validating


def scan_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a chat-pair JSONL file and a problem line ("FILE:LINE: why") for every bad line."""
    return scan_pair_file(path)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a recipe split; any bad line refuses the file, naming the file and line."""
    rows, problems = scan_jsonl(Path(path))
    if problems:
        extra = len(problems) - 1
        more = f" (and {extra} more bad line{'s' if extra > 1 else ''})" if extra else ""
        raise RecipeError(problems[0] + more)
    return rows


def _spec_problem(spec_path: Path, spec: object) -> str | None:
    error = jsonschema.exceptions.best_match(_SPEC_VALIDATOR.iter_errors(spec))
    if error is None:
        return None
    where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"{spec_path}: {where}: {error.message}"


def _load_spec(path: Path) -> dict:
    """spec.json, valid against the shipped schema, with a json_schema that is itself a valid schema."""
    spec_path = path / "spec.json"
    if not spec_path.is_file():
        raise RecipeError(f"{spec_path}: missing (a recipe directory needs spec.json)")
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{spec_path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    problem = _spec_problem(spec_path, spec)
    if problem:
        raise RecipeError(problem)
    if "json_schema" in spec:
        try:
            jsonschema.Draft202012Validator.check_schema(spec["json_schema"])
        except jsonschema.SchemaError as exc:
            where = "/".join(str(part) for part in exc.absolute_path)
            raise RecipeError(f"{spec_path}: json_schema/{where}: not a valid JSON Schema ({exc.message})") from exc
        if spec.get("output_kind") == "json":
            try:  # answers are decoded held to it: it must compile into a grammar
                json_grammar(spec["json_schema"])
            except JsonSchemaProblem as exc:
                raise RecipeError(f"{spec_path}: {exc}") from None
    return spec


def _load_diagnostics(path: Path) -> dict:
    diagnostics_path = path / "diagnostics.json"
    if not diagnostics_path.is_file():
        return {}
    try:
        return json.loads(diagnostics_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{diagnostics_path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def load_recipe(path: Path) -> Recipe:
    """Load and validate a recipe directory (synthesised or hand-written); `holdout.jsonl` and
    `diagnostics.json` are optional in a hand-written one."""
    path = Path(path)
    spec = _load_spec(path)
    return Recipe(
        path=path,
        spec=spec,
        train=read_jsonl(path / "train.jsonl"),
        eval=read_jsonl(path / "eval.jsonl"),
        holdout=read_jsonl(path / "holdout.jsonl") if (path / "holdout.jsonl").exists() else [],
        diagnostics=_load_diagnostics(path),
    )


@dataclass
class DryRunReport:
    """What a compile would meet: problems stop it, notes do not."""

    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recipe: Recipe | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.recipe is None:
            return f"{self.path}: not a loadable recipe"
        spec = self.recipe.spec
        labels = f", {len(spec['labels'])} labels" if spec.get("labels") else ""
        return (f"{self.path}: {spec['output_kind']} → {spec['verifier']}{labels}; train {len(self.recipe.train)}, "
                f"eval {len(self.recipe.eval)}, holdout {len(self.recipe.holdout)}; K-floor {spec['k_floor']}")


def _verifier_problems(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Whether the recipe's verifier can judge its own reference answers (the teacher would score V = 1)."""
    spec = recipe.spec
    verifier = spec["verifier"]
    problems, notes = [], []
    splits = [(recipe.path / name, rows) for name, rows in
              zip(SPLIT_FILES, (recipe.train, recipe.eval, recipe.holdout), strict=True)]
    failures: list[str] = []
    grounded = total = 0
    validator = jsonschema.Draft202012Validator(spec["json_schema"]) if verifier == "json_schema" else None
    for path, rows in splits:
        for number, row in enumerate(rows, start=1):
            reference = answer(row)
            total += 1
            if verifier == "closed_vocab" and reference.strip() not in spec["labels"]:
                failures.append(f"{path}:{number}: answer {reference.strip()!r} is not one of the labels")
            elif verifier == "json_schema":
                try:
                    value = json.loads(reference)
                except json.JSONDecodeError as exc:
                    failures.append(f"{path}:{number}: answer is not JSON ({exc.msg})")
                    continue
                error = jsonschema.exceptions.best_match(validator.iter_errors(value))
                if error is not None:
                    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
                    failures.append(f"{path}:{number}: answer fails json_schema at {where}: {error.message}")
            elif verifier == "byte_grounded":
                grounded += reference.strip() != "" and reference.strip() in prompt_text(row)
            elif verifier == "text_match" and not reference.strip():
                failures.append(f"{path}:{number}: empty answer")
    problems.extend(failures[:_MAX_REPORTED])
    if len(failures) > _MAX_REPORTED:
        problems.append(f"... and {len(failures) - _MAX_REPORTED} more answers the {verifier} verifier rejects")
    if verifier == "byte_grounded" and total:
        share = grounded / total
        line = f"{grounded} of {total} answers occur verbatim in their input ({share:.0%})"
        if share < GROUNDED_SHARE:
            problems.append(f"{recipe.path}: byte_grounded does not fit: only {line}; need {GROUNDED_SHARE:.0%}")
        elif grounded < total:
            notes.append(f"{recipe.path}: {line}; the others cap accuracy")
    return problems, notes


def dry_run_report(path: Path, min_train: int | None = None) -> DryRunReport:
    """Validate a recipe without training: spec against its schema, every JSONL line, enough pairs, the
    verifier applicable to the recipe's own answers, and no hold-out input in train or eval."""
    path = Path(path)
    report = DryRunReport(path=path)
    spec_path = path / "spec.json"
    try:
        spec = _load_spec(path)
        diagnostics = _load_diagnostics(path)
    except RecipeError as exc:
        report.problems.append(str(exc))
        return report
    splits = {}
    for name in SPLIT_FILES:
        if name == "holdout.jsonl" and not (path / name).exists():
            splits[name] = []
            continue
        splits[name], bad = scan_jsonl(path / name)
        report.problems.extend(bad)
    if report.problems:
        return report
    recipe = Recipe(path=path, spec=spec, train=splits["train.jsonl"], eval=splits["eval.jsonl"],
                    holdout=splits["holdout.jsonl"], diagnostics=diagnostics)
    report.recipe = recipe
    for number, row in enumerate(recipe.train, start=1):
        if is_eval_candidate(row):
            report.problems.append(f"{path / 'train.jsonl'}:{number}: an eval candidate (meta.eval_candidate) "
                                   "is never trained on")
    spec = recipe.spec
    need_train = spec.get("min_train_pairs", min_train if min_train is not None else MIN_TRAIN_PAIRS)
    need_eval = spec.get("min_eval_pairs", 1)
    if len(recipe.train) < need_train:
        report.problems.append(f"{path / 'train.jsonl'}: {len(recipe.train)} pairs, need at least {need_train}")
    if len(recipe.eval) < need_eval:
        report.problems.append(f"{path / 'eval.jsonl'}: {len(recipe.eval)} pairs, need at least {need_eval}")
    report.problems.extend(f"{spec_path}: training: {problem}"
                           for problem in TrainConfig.problems(spec.get("training") or {}))
    problems, notes = _verifier_problems(recipe)
    report.problems.extend(problems)
    report.notes.extend(notes)
    # A hold-out input in train or eval inflates hold-out accuracy and blinds the collapse tripwire. Named
    # here as a note, not a problem, until the shipped example recipe is free of it.
    held = {input_key(row["messages"][:-1]): number for number, row in enumerate(recipe.holdout, start=1)}
    for name, rows in (("train.jsonl", recipe.train), ("eval.jsonl", recipe.eval)):
        for number, row in enumerate(rows, start=1):
            line = held.get(input_key(row["messages"][:-1]))
            if line is not None:
                report.notes.append(f"{path / name}:{number}: same input as holdout.jsonl:{line}; the hold-out "
                                    "should never be trained or tuned on")
    counts = spec.get("counts") or {}
    actual = {"train": len(recipe.train), "eval": len(recipe.eval), "holdout": len(recipe.holdout)}
    stale = {split: (counts[split], actual[split]) for split in counts if counts[split] != actual[split]}
    if stale:
        report.notes.append(f"{spec_path}: counts differ from the files (spec, files): {stale}")
    return report


def dry_run(path: Path, min_train: int = MIN_TRAIN_PAIRS) -> list[str]:
    """Problems that would stop a compile, without training; empty when the recipe is ready."""
    return dry_run_report(path, min_train).problems


# ---------------------------------------------------------------------------------------------------------
# Synthesis


def content_order(row: dict) -> str:
    """A pair's place in the split order: a digest of its conversation, so arrival order does not matter
    and no alphabetical bias reaches the strata."""
    return hashlib.sha256(json.dumps(row["messages"], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _stratified_split(
    indices: list[int], share: float, stratum: Callable[[int], Hashable], rng: random.Random
) -> tuple[list[int], list[int]]:
    """Take `share` of every stratum (at least one from strata with two or more members)."""
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for index in indices:
        strata[stratum(index)].append(index)
    taken, rest = [], []
    for name in sorted(strata, key=str):
        group = strata[name][:]
        rng.shuffle(group)
        count = round(len(group) * share)
        if count == 0 and len(group) >= 2:
            count = 1
        taken.extend(group[:count])
        rest.extend(group[count:])
    return sorted(taken), sorted(rest)


def _capped_share(share: float, size: int) -> float:
    """`share` of `size` rows, but no more than SPLIT_MAX_CASES of them."""
    return min(share, SPLIT_MAX_CASES / size) if size else share


def gate_resolution(eval_cases: int) -> float:
    """Half-width (95 %) of the K difference two adapters' eval scores can resolve, at GATE_DISCORDANCE."""
    return round(0.40 * 1.96 * math.sqrt(GATE_DISCORDANCE / eval_cases), 4) if eval_cases else 1.0


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


def _share_with(rows: list[dict], key: str) -> float:
    return sum(1 for row in rows if (row.get("meta") or {}).get(key)) / max(1, len(rows))


def _max_new_tokens(rows: list[dict]) -> int:
    """Room for the longest observed answer: 0.75 tokens per character (English runs about four characters
    a token, digits one each) plus 16, so a student that does not stop is cut off early and its latency
    stays measurable."""
    longest = max((len(answer(row)) for row in rows), default=0)
    return min(512, max(16, math.ceil(0.75 * longest) + 16))


def _canonical_answer(row: dict, text: str) -> dict:
    messages = [*row["messages"][:-1], {**row["messages"][-1], "content": text}]
    return {**row, "messages": messages}


def synthesize_recipe(
    corpus_rows: list[dict],
    out_dir: Path,
    *,
    task: str,
    tenant: str,
    namespace: str,
    corpus_cid: str,
    frozen_holdout: Path,
    seed: int = 0,
    eval_rotation_share: float = EVAL_ROTATION_SHARE,
    embedding_cosine: float = EMBEDDING_COSINE,
) -> Recipe:
    """Write a recipe directory for a corpus. The hold-out is made once per namespace at
    `frozen_holdout` and reused unchanged afterwards; neither its inputs nor overlaps of them reach train
    or eval. Eval candidates never reach train; `eval_rotation_share` of them, newest first, join eval.
    Training pairs overlapping any eval, hold-out or candidate input are removed (decontaminate.py;
    `embedding_cosine` is its embedding threshold)."""
    from kolm_pipeline.corpus.embeddings import embed

    try:
        eval_rotation_share = check_share(eval_rotation_share)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    if len(corpus_rows) < MIN_CORPUS_PAIRS:
        raise RecipeError(f"corpus has {len(corpus_rows)} pairs; a recipe needs at least {MIN_CORPUS_PAIRS}")
    rng = random.Random(seed)
    decision: KindDecision = detect_output_kind(corpus_rows)
    kind = decision.kind
    misfit_set = set(decision.misfits)
    misfits = [
        {"capture_id": (row.get("meta") or {}).get("capture_id"), "answer": answer(row)[:120]}
        for index, row in enumerate(corpus_rows) if index in misfit_set
    ]
    fitting = [row for index, row in enumerate(corpus_rows) if index not in misfit_set]
    if kind == "categorical":
        fitting = [_canonical_answer(row, answer(row).strip()) for row in fitting]
    # Splits are drawn from the pairs in content order, not arrival order: the same pairs captured by
    # concurrent clients in another order make the same hold-out, eval and train splits.
    rows = sorted((row for row in fitting if not is_eval_candidate(row)), key=content_order)
    candidates = [row for row in fitting if is_eval_candidate(row)]

    holdout_made = not frozen_holdout.is_file()
    holdout = [] if holdout_made else read_jsonl(frozen_holdout)
    template = template_messages(row["messages"][:-1] for row in fitting + holdout)
    # One index space for every input: the corpus's rows, then its eval candidates, then the frozen hold-out.
    inputs = rows + candidates + holdout
    texts = [intent_text(row["messages"][:-1], template) for row in inputs]
    vectors = embed(texts)
    answers = [answer(row) for row in rows]

    # Intent clusters from MiniLM embeddings of a seeded sample (all requests in a small corpus); the rest
    # join their most similar embedded request's cluster.
    embedded = embed_sample(len(rows), seed=seed)
    sample_vectors = vectors[embedded]
    k = choose_k(len(embedded), labels=len(decision.labels or []))
    sample_clusters = cluster(sample_vectors, k, seed=seed)
    cluster_ids = propagate(texts[: len(rows)], embedded, sample_clusters)
    purity = neighbour_purity(kind, sample_vectors, sample_clusters, [answers[i] for i in embedded],
                              [texts[i] for i in embedded], sizes=Counter(int(c) for c in cluster_ids))
    stratum = (lambda i: answers[i]) if kind == "categorical" else (lambda i: f"cluster {cluster_ids[i]}")

    all_indices = list(range(len(rows)))
    if holdout_made:
        held, pool = _stratified_split(all_indices, _capped_share(HOLDOUT_SHARE, len(all_indices)), stratum, rng)
        holdout = [rows[i] for i in held]
        holdout_inputs = held
    else:
        held_keys = {input_key(row["messages"][:-1]) for row in holdout}
        pool = [i for i in all_indices if input_key(rows[i]["messages"][:-1]) not in held_keys]
        held = []
        holdout_inputs = list(range(len(rows) + len(candidates), len(inputs)))
    # Overlaps of the hold-out and of the eval candidates go first, so they reach neither train nor eval;
    # then training pairs that overlap the eval split drawn from what is left.
    decontaminator = Decontaminator(texts, vectors, embed, cosine=embedding_cosine)
    candidate_inputs = range(len(rows), len(rows) + len(candidates))
    pool = decontaminator.clean(pool, {**dict.fromkeys(holdout_inputs, "holdout"),
                                       **dict.fromkeys(candidate_inputs, "eval_candidate")})
    eval_indices, train_indices = _stratified_split(pool, _capped_share(EVAL_SHARE, len(pool)), stratum, rng)
    train_indices = decontaminator.clean(train_indices, dict.fromkeys(eval_indices, "eval"))
    rng.shuffle(train_indices)
    rotated, waiting = rotate(candidates, eval_rotation_share)
    train_rows = [rows[i] for i in train_indices]
    eval_rows = [rows[i] for i in eval_indices] + [candidates[c] for c in rotated]
    removed = decontaminator.counts()
    if len(train_rows) < MIN_TRAIN_PAIRS or len(eval_rows) < MIN_EVAL_PAIRS:
        raise RecipeError(
            f"corpus of {len(corpus_rows)} pairs leaves {len(train_rows)} train and {len(eval_rows)} eval pairs "
            f"after the hold-out ({len(holdout)}) and decontamination ({removed['decontaminated']} removed); "
            f"a recipe needs at least {MIN_TRAIN_PAIRS} train and {MIN_EVAL_PAIRS} eval pairs"
        )

    kind_fields = decision.spec_fields()
    if kind == "categorical":
        kind_fields["labels"] = sorted({answer(row).strip() for row in fitting + holdout})
    if kind == "json" and not holdout_made:
        # The schema must admit the frozen hold-out's answers too, or a perfect student would fail them.
        parsed, misfit = json_objects([answer(row) for row in holdout])
        if misfit:
            raise RecipeError(
                f"{frozen_holdout}:{misfit[0] + 1}: the frozen hold-out has {len(misfit)} answers that are not "
                "JSON objects, but the namespace now answers in JSON: its task changed. The hold-out is never "
                "changed automatically; delete the file to make a new one"
            )
        kind_fields["json_schema"] = infer_json_schema([json.loads(answer(row)) for row in fitting] + parsed)
    if kind == "json":
        # How the teacher lays out its JSON, so constrained decoding writes what the adapter learned (json_grammar.py).
        kind_fields["json_schema"] = {**kind_fields["json_schema"],
                                      LAYOUT_KEY: json_layout([answer(row) for row in fitting + holdout])}
        answered = [(json.loads(answer(row)), row["messages"][:-1]) for row in fitting]
        kind_fields["json_schema"] = mark_grounded(kind_fields["json_schema"], answered)
    latency_measured = _share_with(rows, "latency_us") >= 0.5
    usage_measured = max(_share_with(rows, "prompt_tokens"), _share_with(rows, "completion_tokens")) >= 0.5
    floor = k_floor(kind=kind, purity=purity.purity, train_pairs=len(train_rows), eval_cases=len(eval_rows),
                    teacher_latency_measured=latency_measured, teacher_usage_measured=usage_measured)
    holdout_bytes = _jsonl_bytes(holdout)
    spec = {
        "format": RECIPE_FORMAT,
        "task": task,
        "tenant": tenant,
        "namespace": namespace,
        **kind_fields,
        "k_floor": floor.value,
        "corpus_cid": corpus_cid,
        "holdout_cid": cid_for_bytes(holdout_bytes),
        "counts": {"train": len(train_rows), "eval": len(eval_rows), "holdout": len(holdout)},
        "min_train_pairs": MIN_TRAIN_PAIRS,
        "min_eval_pairs": MIN_EVAL_PAIRS,
        "max_new_tokens": _max_new_tokens(fitting),
    }
    split_counts: dict[str, Counter] = defaultdict(Counter)
    for split, indices in (("holdout", held), ("eval", eval_indices), ("train", train_indices)):
        for i in indices:
            split_counts[stratum(i)][split] += 1
    input_ids = capture_ids(inputs)
    diagnostics = {
        "output_kind": kind,
        "verifier": decision.verifier,
        "why": decision.reason,
        "evidence": decision.evidence,
        "dropped": {"answers_not_fitting_the_kind": misfits, "decontaminated": removed["decontaminated"]},
        "decontamination": {
            "method": f"a training pair is removed when its intent text has the words of a protected one in "
                      f"the same order (exact), shares a run of {NGRAM} words with it, or the whole of either "
                      f"when shorter and at least {MIN_NGRAM_TOKENS} words (ngram13), or has all-MiniLM-L6-v2 "
                      f"cosine >= {embedding_cosine} (embedding); protected: the hold-out, eval and every eval "
                      f"candidate; {NGRAM}-grams in a quarter of all inputs are template and left out first",
            "embedding_cosine": embedding_cosine,
            "inputs_with_template_left_out": len(decontaminator.template_stripped),
            **removed,
            "by_source": decontaminator.by_source(),
            "removed": [{"capture_id": input_ids[r.row], "reason": r.reason, "source": r.source,
                         "overlaps_capture_id": input_ids[r.protected]}
                        for r in decontaminator.removals[:_MAX_LISTED]],
        },
        "eval_rotation": {
            "share": eval_rotation_share,
            "candidates": len(candidates),
            "rotated_in": len(rotated),
            "rotated_in_capture_ids": [input_ids[len(rows) + c] for c in rotated],
            "waiting_capture_ids": [input_ids[len(rows) + c] for c in waiting],
            "rule": "the newest ceil(share x candidates) by capture id join eval; none is ever trained on; "
                    "the frozen hold-out does not rotate",
        },
        "clusters": {
            "method": "k-means (scikit-learn) on all-MiniLM-L6-v2 embeddings of the intent text "
            "(messages shared by many requests left out)",
            "k": k,
            "embedded_requests": len(embedded),
            "purity": round(purity.purity, 4),
            "purity_sampled": purity.sampled,
            "purity_measure": "within-cluster nearest-neighbour answer agreement",
            "per_cluster": [summary.as_dict() for summary in purity.clusters[:MAX_LABELS]],
        },
        "k_floor": floor.as_dict(),
        "teacher": {"latency_measured": latency_measured, "usage_measured": usage_measured},
        "holdout": {"file": frozen_holdout.name, "made_now": holdout_made, "size": len(holdout),
                    "cid": spec["holdout_cid"]},
        "split": {
            "strategy": "stratified by label" if kind == "categorical" else "stratified by intent cluster",
            "eval_share": EVAL_SHARE,
            "holdout_share": HOLDOUT_SHARE,
            "max_cases": SPLIT_MAX_CASES,
            "gate_resolution": {
                "k_margin": gate_resolution(len(eval_rows)),
                "why": f"95 % half-width of the K difference between two adapters on {len(eval_rows)} eval cases "
                       f"when they answer {GATE_DISCORDANCE:.0%} of them differently; each split takes its share "
                       f"of the corpus up to {SPLIT_MAX_CASES} cases, the rest is trained on",
            },
            "seed": seed,
            "strata": {name: dict(sorted(counts.items())) for name, counts in sorted(split_counts.items())},
        },
    }
    if kind == "json":
        diagnostics["json_schema"] = kind_fields["json_schema"]
    return _write_recipe(out_dir, spec, train_rows, eval_rows, holdout_bytes, diagnostics,
                         frozen_holdout if holdout_made else None)


def _write_recipe(
    out_dir: Path,
    spec: dict,
    train_rows: list[dict],
    eval_rows: list[dict],
    holdout_bytes: bytes,
    diagnostics: dict,
    freeze_to: Path | None,
) -> Recipe:
    """Write under `<out_dir>.partial`, validate, freeze the hold-out, then rename into place."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        (staging / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        (staging / "train.jsonl").write_bytes(_jsonl_bytes(train_rows))
        (staging / "eval.jsonl").write_bytes(_jsonl_bytes(eval_rows))
        (staging / "holdout.jsonl").write_bytes(holdout_bytes)
        (staging / "diagnostics.json").write_text(
            json.dumps(diagnostics, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
        recipe = load_recipe(staging)
        if freeze_to is not None:
            write_atomic(freeze_to, holdout_bytes)
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(recipe, path=out_dir)
