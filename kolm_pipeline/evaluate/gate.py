"""The swap gate: a candidate replaces the current adapter only when it measurably wins."""

from __future__ import annotations

from dataclasses import dataclass

SWAP_MARGIN = 0.01
ALERT_DELTA = -0.03


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why, in words an operator can act on."""

    swap: bool
    reason: str
    alert: bool
    delta: float
    k_new: float
    k_current: float
    k_floor: float


def decide(*, k_new: float, k_current: float, k_floor: float, tripwire_clear: bool) -> GateDecision:
    """Apply the gate table of ARCHITECTURE.md. Δ is rounded to 1e-9 so the table's boundaries
    (+0.01, −0.03) are exact rather than at the mercy of float subtraction."""
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
    return GateDecision(
        swap=swap, reason=reason, alert=alert, delta=delta, k_new=k_new, k_current=k_current, k_floor=k_floor
    )
