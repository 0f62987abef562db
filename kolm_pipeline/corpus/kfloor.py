"""The K-floor: the least K-score a candidate must reach to ship, derived from how learnable the task is.

K = 0.40·A + 0.15·(S + L + C + V). The floor predicts each part for a student that learned what the data
can teach, on the pessimistic side, and subtracts the noise of measuring A on a small eval split:

    A₀ = purity · n / (n + N_HALF)    purity: within-cluster nearest-neighbour agreement (clustering.py);
                                      n: training pairs. A learning curve: a student reaches half of the
                                      task's consistency from N_HALF = 100 examples, ~87 % from 680 (a
                                      1,000-pair corpus after hold-out and eval)
    S₀ = 1                            a LoRA adapter on a ≤ 1B base is far below the 64 MiB budget
    L₀ = 0.5 if the proxy measured the teacher's latency, else 0 (the student's side is only known
                                      after evaluation on the serving hardware: half credit)
    C₀ = 0.5 if the proxy recorded the teacher's token usage, else 0 (same reason)
    V₀ = 1 for categorical (decoding is constrained to the labels), 0.9 otherwise
    noise = 0.40 · 2 · sqrt(A₀ (1 − A₀) / n_eval)       two standard errors of A, at A's weight
    K-floor = clamp(0.40·A₀ + 0.15·(S₀ + L₀ + C₀ + V₀) − noise, 0.50, 0.95)

Why these terms: a floor that a student who learned the task misses is worse than none (the gate already
demands a win over the current model), so every term leans low. Purity measures consistency, the part of
the answers that follows from the request at all; noisy or context-dependent answers lower it, and with
it the floor. Small corpora teach less, which the learning curve accounts for; on the first fixtures
a student with 83 training pairs reached 0.56 accuracy on a task of purity 0.96 (A₀ = 0.44). Without
teacher measurements (a hand-written recipe) only S and V are credited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOOR_MIN = 0.50
FLOOR_MAX = 0.95
N_HALF = 100
S_EXPECTED = 1.0
MEASURED_CREDIT = 0.5
V_EXPECTED = {"categorical": 1.0, "json": 0.9, "extractive": 0.9, "free_text": 0.9}
WEIGHT_A, WEIGHT_REST = 0.40, 0.15
FORMULA = ("A0 = purity * n_train / (n_train + 100); "
           "clamp(0.40*A0 + 0.15*(S0 + L0 + C0 + V0) - 0.40*2*sqrt(A0*(1-A0)/n_eval), 0.50, 0.95)")


@dataclass(frozen=True)
class KFloor:
    """The floor, every term that produced it, and the reasoning in words."""

    value: float
    raw: float
    purity: float
    expected_accuracy: float
    size: float
    latency: float
    cost: float
    coverage: float
    noise: float
    train_pairs: int
    eval_cases: int
    reasoning: list[str]

    def as_dict(self) -> dict:
        return {
            "value": self.value,
            "raw": round(self.raw, 4),
            "formula": FORMULA,
            "terms": {
                "purity": round(self.purity, 4),
                "n_train": self.train_pairs,
                "N_HALF": N_HALF,
                "A0": round(self.expected_accuracy, 4),
                "S0": self.size,
                "L0": self.latency,
                "C0": self.cost,
                "V0": self.coverage,
                "noise": round(self.noise, 4),
                "n_eval": self.eval_cases,
            },
            "reasoning": self.reasoning,
        }


def k_floor(
    *,
    kind: str,
    purity: float,
    train_pairs: int,
    eval_cases: int,
    teacher_latency_measured: bool,
    teacher_usage_measured: bool,
) -> KFloor:
    """Compute the floor for a recipe; see the module docstring for the formula and why."""
    purity = min(1.0, max(0.0, purity))
    learned = train_pairs / (train_pairs + N_HALF)
    accuracy = purity * learned
    latency = MEASURED_CREDIT if teacher_latency_measured else 0.0
    cost = MEASURED_CREDIT if teacher_usage_measured else 0.0
    coverage = V_EXPECTED[kind]
    noise = WEIGHT_A * 2 * math.sqrt(accuracy * (1 - accuracy) / max(1, eval_cases))
    raw = WEIGHT_A * accuracy + WEIGHT_REST * (S_EXPECTED + latency + cost + coverage) - noise
    value = round(min(FLOOR_MAX, max(FLOOR_MIN, raw)), 4)
    reasoning = [
        f"similar requests agree on their answer {purity:.1%} of the time (within-cluster nearest neighbour); "
        f"from {train_pairs} training pairs a student is expected to learn {learned:.0%} of that "
        f"(n / (n + {N_HALF})): A0 = {accuracy:.3f}",
        f"S0 = {S_EXPECTED}: a LoRA adapter is far below the size budget",
        f"L0 = {latency}, C0 = {cost}: "
        + ("the teacher's latency and usage were measured at capture; half credit because the student's are "
           "only known after evaluation" if latency and cost else
           "the teacher's latency or usage was not measured, so those parts may score 0"),
        f"V0 = {coverage}: " + ("decoding is constrained to the label set" if kind == "categorical" else
                                "most answers are expected in format"),
        f"eval noise: two standard errors of A on {eval_cases} cases at weight 0.40 = {noise:.3f}",
        f"raw floor {raw:.4f}, clamped to [{FLOOR_MIN}, {FLOOR_MAX}]: {value}",
    ]
    return KFloor(value=value, raw=raw, purity=purity, expected_accuracy=accuracy, size=S_EXPECTED,
                  latency=latency, cost=cost, coverage=coverage, noise=noise, train_pairs=train_pairs,
                  eval_cases=eval_cases, reasoning=reasoning)
