"""The swap gate: a candidate replaces the current adapter only when it measurably wins."""

from __future__ import annotations

from dataclasses import dataclass

SWAP_MARGIN = 0.01
ALERT_DELTA = -0.03


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why, in words an operator can act on. The accuracies (the K-score's A) ride
    along so every place that shows the decision shows accuracy beside K; decisions recorded before they did
    read back with None."""

    swap: bool
    reason: str
    alert: bool
    delta: float
    k_new: float
    k_current: float
    k_floor: float
    accuracy_new: float | None = None
    accuracy_current: float | None = None


def _scores(k_new: float, k_current: float, accuracy_new: float | None, accuracy_current: float | None) -> str:
    """``accuracy 18.1% → 92.5%, K 0.6012 → 0.8534``: the two sides, accuracy first."""
    k = f"K {k_current:.4f} → {k_new:.4f}"
    if accuracy_new is None or accuracy_current is None:
        return k
    return f"accuracy {100 * accuracy_current:.1f}% → {100 * accuracy_new:.1f}%, {k}"


def decide(*, k_new: float, k_current: float, k_floor: float, tripwire_clear: bool,
           accuracy_new: float | None = None, accuracy_current: float | None = None) -> GateDecision:
    """Apply the gate table of ARCHITECTURE.md. Δ is rounded to 1e-9 so the table's boundaries
    (+0.01, −0.03) are exact rather than at the mercy of float subtraction. The reason ends with both sides'
    accuracy and K (current → new), so it reads on its own wherever it is shown."""
    delta = round(k_new - k_current, 9)
    alert = delta <= ALERT_DELTA
    if delta >= SWAP_MARGIN:
        if not tripwire_clear:
            reason, swap = "refused: collapse tripwire tripped", False
        elif k_new < k_floor:
            reason, swap = f"refused: K {k_new:.4f} is below the K-floor {k_floor:.4f}", False
        else:
            reason, swap = f"swap: K improves by {delta:+.4f}", True
    elif delta >= 0:
        reason, swap = f"refused: within noise ({delta:+.4f} < +{SWAP_MARGIN})", False
    elif not alert:
        reason, swap = f"refused: regression ({delta:+.4f})", False
    else:
        reason, swap = f"refused and alerted: regression ({delta:+.4f} <= {ALERT_DELTA})", False
    reason = f"{reason}; {_scores(k_new, k_current, accuracy_new, accuracy_current)}"
    return GateDecision(
        swap=swap, reason=reason, alert=alert, delta=delta, k_new=k_new, k_current=k_current, k_floor=k_floor,
        accuracy_new=accuracy_new, accuracy_current=accuracy_current,
    )
