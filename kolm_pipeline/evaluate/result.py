"""The evaluation result, declared once: what `evaluation.json` holds, what the deployment stage, `kolm registry
diff`, `kolm compile` and `kolm demo` read from it, and the regression alert built from it. Its case texts are
apart, in `CasePreviews` (`case_previews.json`): the result ships in every `.kolm`, the texts stay in the work
directory, where retention removes them with their captures.

The evaluation stage validates the result against `EvaluationResult` before it writes the file, so every
reader can trust its shape; readers parse it back with `EvaluationResult.read`. The K-score table that
`kolm compile` and `kolm demo` print is formatted here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from kolm_pipeline.evaluate.gate import GateDecision
from kolm_pipeline.evaluate.tripwire import TripwireResult
from kolm_pipeline.provenance.errors import UserError

# The K-score parts side by side, as printed: (label, key of a model summary).
KSCORE_ROWS = (
    ("A accuracy", "accuracy"), ("S size", "size"), ("L latency", "latency"), ("C cost", "cost"),
    ("V coverage", "coverage"), ("K", "k"), ("hold-out accuracy", "holdout_accuracy"),
    ("p50 latency (s)", "student_p50_seconds"),
)
# What a person reads first: accuracy, as a percentage, then K and the parts it is made of (with weights).
_HEADLINE_ROWS = (("accuracy on eval", "accuracy"), ("accuracy on hold-out", "holdout_accuracy"))
_PART_ROWS = (("  A accuracy   ×0.40", "accuracy"), ("  S size       ×0.15", "size"),
              ("  L latency    ×0.15", "latency"), ("  C cost       ×0.15", "cost"),
              ("  V coverage   ×0.15", "coverage"))
KSCORE_LEGEND = ("K = 0.40·A + 0.15·(S + L + C + V): size, latency, cost and coverage alone give up to 0.60 to a "
                 "model whose every answer is wrong, so read accuracy first (README: Glossary)")


def side_by_side_lines(columns: list[tuple[str, dict[str, Any]]], width: int = 14) -> list[str]:
    """Models side by side (name, summary with the keys of ``KSCORE_ROWS``): accuracy on eval and hold-out as
    percentages first, then K and its parts, then the student's p50 latency when known. Shared by `kolm demo`,
    `kolm compile` and `kolm eval`."""
    def cells(key: str, form: str) -> str:
        values = [summary.get(key) for _, summary in columns]
        return "".join(f"{'-':>{width}}" if not isinstance(value, int | float) else
                       f"{format(100 * value if form == '%' else value, '.1f' if form == '%' else '.4f')}"
                       f"{'%' if form == '%' else ''}".rjust(width) for value in values)

    lines = [f"{'':<22}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    lines += [f"{label:<22}{cells(key, '%')}" for label, key in _HEADLINE_ROWS]
    lines.append(f"{'K-score':<22}{cells('k', 'f')}")
    lines += [f"{label:<22}{cells(key, 'f')}" for label, key in _PART_ROWS]
    if all("student_p50_seconds" in summary for _, summary in columns):
        lines.append(f"{'p50 latency (s)':<22}{cells('student_p50_seconds', 'f')}")
    return lines


class EvaluationError(UserError):
    """An `evaluation.json` is missing, unreadable or not an evaluation."""


class ModelSummary(BaseModel):
    """One model's K-score parts and measurements on the eval split and the hold-out."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    k: float
    accuracy: float
    size: float
    latency: float
    cost: float
    coverage: float
    holdout_accuracy: float
    holdout_coverage: float
    student_p50_seconds: float
    artifact_bytes: float
    eval_seconds: float


class EvaluationResult(BaseModel):
    """Candidate against current (the champion or the bare base), measured in one run on one eval split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    decision: GateDecision
    current_name: str
    current_cid: str | None
    adapter_cid: str
    recipe_cid: str
    candidate: ModelSummary
    current: ModelSummary
    tripwire: TripwireResult
    eval_cases: int
    holdout_cases: int
    case_verdicts: dict[str, Any]
    recipe_spec: dict[str, Any]
    corpus: dict[str, Any]
    # How the regression alert was delivered; None when the gate did not alert.
    alert: str | None
    # Set once the evaluation's receipt is signed; not part of the signed file itself.
    receipt_cid: str | None = None

    @classmethod
    def read(cls, path: Path) -> EvaluationResult:
        """The evaluation a file holds; a missing or malformed one is an `EvaluationError` naming it."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise EvaluationError(f"{path}: no evaluation (materialize up to `evaluation` first)") from None
        except ValidationError as exc:
            where = ", ".join(".".join(str(part) for part in error["loc"]) or "(top level)"
                              for error in exc.errors()[:3])
            raise EvaluationError(f"{path}: not an evaluation ({where})") from None

    def document(self) -> dict[str, Any]:
        """The plain JSON document (`evaluation.json`, `evals.json` in a `.kolm`); `receipt_cid` only once signed."""
        return self.model_dump(mode="json", exclude={"receipt_cid"} if self.receipt_cid is None else None)

    def kscore_table(self) -> str:
        """Current and candidate side by side, accuracy first, then K and its parts; the gate's reason."""
        lines = side_by_side_lines([(side.name, side.model_dump()) for side in (self.current, self.candidate)])
        tripwire = "clear" if self.tripwire.clear else "TRIPPED"
        lines.append(f"gate: {self.decision.reason} (K-floor {self.decision.k_floor:.2f}, tripwire {tripwire})")
        lines.append(KSCORE_LEGEND)
        return "\n".join(lines)


class CasePreview(BaseModel):
    """The texts of one eval case: previews of its input, expected answer and each side's output."""

    model_config = ConfigDict(frozen=True)

    key: str
    capture_id: int | None
    input: str
    expected: str
    outputs: dict[str, str]


class CasePreviews(BaseModel):
    """The texts behind one evaluation's `case_verdicts`, in the same order; `adapter_cid` and `current_name`
    name the evaluation they belong to."""

    model_config = ConfigDict(frozen=True)

    adapter_cid: str
    current_name: str
    cases: list[CasePreview]

    @classmethod
    def read(cls, path: Path) -> CasePreviews | None:
        """The previews a file holds; None when there are none (never written, swept by retention, unreadable)."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except (FileNotFoundError, ValidationError):
            return None

    def belongs_to(self, evaluation: dict[str, Any]) -> bool:
        return (self.adapter_cid, self.current_name) == (evaluation.get("adapter_cid"), evaluation.get("current_name"))


class RegressionAlert(BaseModel):
    """The body POSTed to `KOLM_ALERT_WEBHOOK` when the gate refuses at Δ ≤ −0.03: what regressed, by how much,
    against what."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["kolm.regression"] = "kolm.regression"
    task: str
    reason: str | None
    delta: float | None
    k_new: float | None
    k_current: float | None
    current: str | None
    adapter_cid: str | None
    recipe_cid: str | None

    @classmethod
    def of(cls, evaluation: EvaluationResult) -> RegressionAlert:
        decision = evaluation.decision
        return cls(task=evaluation.task, reason=decision.reason, delta=decision.delta, k_new=decision.k_new,
                   k_current=decision.k_current, current=evaluation.current_name,
                   adapter_cid=evaluation.adapter_cid, recipe_cid=evaluation.recipe_cid)
