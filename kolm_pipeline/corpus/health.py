"""Data health of a corpus and a recipe: the numbers the Dagster asset checks on `corpus` and `recipe` show.

Each check says pass, warn (shown, the run goes on) or fail (a blocking failure: the run stops before training
on bad data), with its measurements. Plain Python: `defs/checks.py` only turns these into check results.
Measurements name captures by id, never by their text: Dagster's event log outlives the retention window.

- **enough pairs**: the gate compares K-scores on the eval split; with fewer than `MIN_EVAL_CASES` eval cases
  a K difference of +0.01 is noise (warn). A corpus too small for any recipe fails.
- **PII in answers**: answers (the training targets) that hold a redaction placeholder such as `<EMAIL>`
  teach the student to write placeholders. Any warns; more than `PII_ANSWER_FAIL_SHARE` of them fails.
- **label balance** (categorical recipes): one label taking more than `MAJORITY_WARN_SHARE` of training, a
  label with fewer than `MIN_PER_LABEL` training answers, or a label the eval or hold-out asks for that
  training never shows: warn.
- **decontamination share**: training pairs removed because they overlap an eval, hold-out or eval-candidate
  input, as a share of the training pairs before removal. Above `DECONTAMINATION_WARN_SHARE` warns (the
  namespace's traffic repeats itself; the eval split measures little that training did not see); above
  `DECONTAMINATION_FAIL_SHARE` fails.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from kolm_pipeline.capture.redact import ENTITIES
from kolm_pipeline.corpus.kinds import MIN_PER_LABEL, answer
from kolm_pipeline.corpus.recipe import EVAL_SHARE, MIN_EVAL_PAIRS, MIN_TRAIN_PAIRS, Recipe
from kolm_pipeline.corpus.rotation import is_eval_candidate

MIN_EVAL_CASES = 30
PII_ANSWER_FAIL_SHARE = 0.10
MAJORITY_WARN_SHARE = 0.60
DECONTAMINATION_WARN_SHARE = 0.40
DECONTAMINATION_FAIL_SHARE = 0.75
_LISTED_IDS = 20
PLACEHOLDER = re.compile(r"<(" + "|".join(map(re.escape, ENTITIES)) + r")>")

Outcome = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class HealthCheck:
    """One check's verdict: ``outcome`` pass, warn or fail (fail stops the run), in words and numbers."""

    name: str
    outcome: Outcome
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    table: list[dict[str, Any]] | None = None  # rows of one table (label balance), when the check has one

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def enough_pairs(rows: list[dict]) -> HealthCheck:
    usable = sum(1 for row in rows if not is_eval_candidate(row))
    expected_eval = int(usable * EVAL_SHARE)
    metadata = {"usable_pairs": usable, "eval_candidates": len(rows) - usable, "expected_eval_cases": expected_eval,
                "min_eval_cases": MIN_EVAL_CASES}
    if usable < MIN_TRAIN_PAIRS + MIN_EVAL_PAIRS:
        return HealthCheck("corpus_enough_pairs", "fail", f"{usable} usable pairs: a recipe needs at least "
                           f"{MIN_TRAIN_PAIRS} to train on and {MIN_EVAL_PAIRS} to evaluate", metadata)
    if expected_eval < MIN_EVAL_CASES:
        return HealthCheck("corpus_enough_pairs", "warn", f"{usable} usable pairs give about {expected_eval} eval "
                           f"cases: below {MIN_EVAL_CASES} the gate's +0.01 margin is within noise; keep more pairs",
                           metadata)
    return HealthCheck("corpus_enough_pairs", "pass", f"{usable} usable pairs, about {expected_eval} eval cases",
                       metadata)


def pii_in_answers(rows: list[dict]) -> HealthCheck:
    by_entity: Counter[str] = Counter()
    with_placeholder: list[Any] = []
    for row in rows:
        found = PLACEHOLDER.findall(str(answer(row)))
        if found:
            by_entity.update(found)
            with_placeholder.append((row.get("meta") or {}).get("capture_id"))
    share = _share(len(with_placeholder), len(rows))
    metadata = {"answers": len(rows), "answers_with_placeholders": len(with_placeholder), "share": share,
                "fail_share": PII_ANSWER_FAIL_SHARE, "by_entity": dict(sorted(by_entity.items())),
                "capture_ids": [cid for cid in with_placeholder if cid is not None][:_LISTED_IDS]}
    if not with_placeholder:
        return HealthCheck("corpus_no_pii_in_answers", "pass", "no answer holds a redaction placeholder", metadata)
    entities = ", ".join(f"<{name}>" for name in sorted(by_entity))
    text = (f"{len(with_placeholder)} of {len(rows)} answers ({share:.1%}) hold redaction placeholders ({entities}): "
            "the student would learn to write them; correct or discard those captures")
    return HealthCheck("corpus_no_pii_in_answers", "fail" if share > PII_ANSWER_FAIL_SHARE else "warn", text, metadata)


def corpus_health(rows: list[dict]) -> list[HealthCheck]:
    """The checks on a corpus's rows."""
    return [enough_pairs(rows), pii_in_answers(rows)]


def label_balance(recipe: Recipe) -> HealthCheck:
    labels = recipe.labels
    if not labels:
        return HealthCheck("recipe_label_balance", "pass",
                           f"not a closed vocabulary ({recipe.spec.get('output_kind')}): no labels to balance")
    counts = {split: Counter(str(answer(row)).strip() for row in rows)
              for split, rows in (("train", recipe.train), ("eval", recipe.eval), ("holdout", recipe.holdout))}
    train_total = sum(counts["train"].values())
    table = [{"label": label, **{split: counts[split].get(label, 0) for split in counts},
              "train_share": _share(counts["train"].get(label, 0), train_total)} for label in labels]
    majority = max(table, key=lambda row: row["train"])
    rare = [row["label"] for row in table if 0 < row["train"] < MIN_PER_LABEL]
    unseen = [row["label"] for row in table if row["train"] == 0 and (row["eval"] or row["holdout"])]
    metadata = {"labels": len(labels), "train_pairs": train_total, "majority_label": majority["label"],
                "majority_share": majority["train_share"], "majority_warn_share": MAJORITY_WARN_SHARE,
                "rare_labels": rare, "labels_never_trained": unseen}
    problems = []
    if majority["train_share"] > MAJORITY_WARN_SHARE:
        problems.append(f"{majority['label']!r} is {majority['train_share']:.0%} of training (a student that always "
                        "answers it scores that much)")
    if rare:
        problems.append(f"fewer than {MIN_PER_LABEL} training answers for {', '.join(map(repr, rare))}")
    if unseen:
        problems.append(f"eval or hold-out ask for {', '.join(map(repr, unseen))}, which training never shows")
    if problems:
        return HealthCheck("recipe_label_balance", "warn", "; ".join(problems), metadata, table)
    return HealthCheck("recipe_label_balance", "pass", f"{len(labels)} labels; the largest, {majority['label']!r}, "
                       f"is {majority['train_share']:.0%} of training", metadata, table)


def decontamination_share(recipe: Recipe) -> HealthCheck:
    report = recipe.diagnostics.get("decontamination") or {}
    removed = int(report.get("decontaminated") or 0)
    before = len(recipe.train) + removed
    share = _share(removed, before)
    metadata = {"removed": removed, "train_pairs_before": before, "train_pairs": len(recipe.train), "share": share,
                "warn_share": DECONTAMINATION_WARN_SHARE, "fail_share": DECONTAMINATION_FAIL_SHARE,
                **{name: int(value) for name, value in sorted(report.items())
                   if name.startswith("decontaminated_") and isinstance(value, int)}}
    text = (f"{removed} of {before} training pairs ({share:.0%}) overlapped an eval, hold-out or eval-candidate "
            "input and were removed")
    if share > DECONTAMINATION_FAIL_SHARE:
        return HealthCheck("recipe_decontamination", "fail", f"{text}: what is left cannot be told apart from the "
                           "eval split; the traffic repeats itself, capture more varied requests", metadata)
    if share > DECONTAMINATION_WARN_SHARE:
        return HealthCheck("recipe_decontamination", "warn", f"{text}: the traffic repeats itself a lot", metadata)
    return HealthCheck("recipe_decontamination", "pass", text, metadata)


def recipe_health(recipe: Recipe) -> list[HealthCheck]:
    """The checks on a recipe's splits."""
    return [label_balance(recipe), decontamination_share(recipe)]
