"""The K-score: one number that says whether a student can replace its teacher.

K = 0.40·A + 0.15·S + 0.15·L + 0.15·C + 0.15·V, every component in [0, 1] (ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kolm_pipeline.settings import price_of_call

WEIGHTS = {"accuracy": 0.40, "size": 0.15, "latency": 0.15, "cost": 0.15, "coverage": 0.15}


def _clamp(value: float) -> float:
    return max(0.0, min(1.0, value))


@dataclass(frozen=True)
class KScore:
    """Every component of the K-score, plus the measurements behind them."""

    accuracy: float
    size: float
    latency: float
    cost: float
    coverage: float
    artifact_bytes: int
    student_p50_seconds: float
    teacher_p50_seconds: float
    student_cost_per_call: float
    teacher_cost_per_call: float

    @property
    def total(self) -> float:
        return sum(weight * getattr(self, part) for part, weight in WEIGHTS.items())

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "k": self.total}


def compute_kscore(
    *,
    accuracy: float,
    coverage: float,
    artifact_bytes: int,
    size_budget_bytes: int,
    teacher_p50_seconds: float,
    student_p50_seconds: float,
    teacher_cost_per_call: float,
    student_cost_per_call: float,
) -> KScore:
    """Combine measurements into a K-score; every ratio is clamped to [0, 1]."""
    size = 1.0 if artifact_bytes <= 0 else _clamp(size_budget_bytes / artifact_bytes)
    latency = 1.0 if student_p50_seconds <= 0 else _clamp(teacher_p50_seconds / student_p50_seconds)
    cost = 0.0 if teacher_cost_per_call <= 0 else _clamp(1 - student_cost_per_call / teacher_cost_per_call)
    return KScore(
        accuracy=_clamp(accuracy),
        size=size,
        latency=latency,
        cost=cost,
        coverage=_clamp(coverage),
        artifact_bytes=artifact_bytes,
        student_p50_seconds=student_p50_seconds,
        teacher_p50_seconds=teacher_p50_seconds,
        student_cost_per_call=student_cost_per_call,
        teacher_cost_per_call=teacher_cost_per_call,
    )


def teacher_cost_per_call(
    usages: list[tuple[str, int, int]], price_table: dict[str, tuple[float, float]]
) -> float:
    """Mean dollars per captured call from (model, prompt_tokens, completion_tokens) and a price table."""
    if not usages:
        return 0.0
    return sum(price_of_call(model, prompt, completion, price_table)
               for model, prompt, completion in usages) / len(usages)
