"""Collapse tripwire: refuse a candidate whose answers lost diversity or whose frozen hold-out score
fell compared with the last good cycle of its namespace (a model trained on its own outputs does both).

A trip halts the namespace: every later candidate is refused, and the serving adapter stays the last
good one, until an operator clears the halt (`kolm tripwire clear --namespace NS`). The state (last good cycle,
halt) is kept per task in the capture store, so every run on every host sees the same."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

HOLDOUT_TOLERANCE = 0.05
MIN_DIVERSITY_RATIO = 0.5


@dataclass(frozen=True)
class TripwireResult:
    clear: bool
    reasons: list[str]
    diversity_ratio: float
    holdout_score: float
    previous_holdout_score: float | None


def entropy(outputs: list[str]) -> float:
    """Shannon entropy (bits) of the answer distribution."""
    counts = Counter(outputs)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def check_collapse(
    candidate_outputs: list[str],
    reference_outputs: list[str],
    holdout_score: float,
    previous: dict | None,
    tolerance: float = HOLDOUT_TOLERANCE,
) -> TripwireResult:
    """Compare the candidate's hold-out answers with the references and the last good cycle."""
    reference_entropy = entropy(reference_outputs)
    ratio = 1.0 if reference_entropy == 0 else entropy(candidate_outputs) / reference_entropy
    reasons = []
    if ratio < MIN_DIVERSITY_RATIO:
        reasons.append(f"answer diversity collapsed to {ratio:.2f} of the references' (min {MIN_DIVERSITY_RATIO})")
    if previous and previous.get("halted"):
        reasons.append(
            f"namespace halted by an earlier trip ({'; '.join(previous.get('halt_reasons', []))}); "
            "an operator must clear it"
        )
    previous_score = (previous or {}).get("last_good", {}).get("holdout_score")
    if previous_score is not None and holdout_score < previous_score - tolerance:
        reasons.append(
            f"hold-out score {holdout_score:.3f} fell more than {tolerance} below the last good {previous_score:.3f}"
        )
    return TripwireResult(
        clear=not reasons,
        reasons=reasons,
        diversity_ratio=ratio,
        holdout_score=holdout_score,
        previous_holdout_score=previous_score,
    )


class TripwireLedger(Protocol):
    """Where a task's tripwire state is kept: the capture store (`store/deployments.py`), or a `MemoryLedger`."""

    def tripwire_state(self, task: str) -> dict | None: ...

    def update_tripwire_state(self, task: str, change: Callable[[dict | None], dict | None]) -> dict | None: ...


class MemoryLedger:
    """A ledger that keeps nothing past the process: `kolm compile` evaluates outside any namespace."""

    def __init__(self, states: dict[str, dict] | None = None) -> None:
        """`states`: what to compare with (a copy of another ledger's), changed here only."""
        self._states: dict[str, dict] = dict(states or {})

    def tripwire_state(self, task: str) -> dict | None:
        return self._states.get(task)

    def update_tripwire_state(self, task: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        before = self._states.get(task)
        after = change(None if before is None else dict(before))
        if after is not None:
            self._states[task] = after
        return before


def read_state(ledger: TripwireLedger, task: str) -> dict | None:
    return ledger.tripwire_state(task)


def record_good_cycle(ledger: TripwireLedger, task: str, result: TripwireResult, artifact_cid: str) -> None:
    """Remember the deployed cycle's hold-out score and diversity for the next comparison."""
    good = {**asdict(result), "artifact_cid": artifact_cid, "at": time.time()}
    ledger.update_tripwire_state(task, lambda state: {**(state or {}), "last_good": good})


def record_trip(ledger: TripwireLedger, task: str, result: TripwireResult) -> None:
    """Halt the namespace; only a collapse (not an earlier halt) adds reasons."""

    def halt(state: dict | None) -> dict | None:
        if (state or {}).get("halted"):
            return None
        return {**(state or {}), "halted": True, "halt_reasons": result.reasons, "halted_at": time.time()}

    ledger.update_tripwire_state(task, halt)


def clear_halt(ledger: TripwireLedger, task: str) -> dict | None:
    """Lift a halt; returns the state as it was, or None when the namespace was not halted."""

    def lift(state: dict | None) -> dict | None:
        if not state or not state.get("halted"):
            return None
        return {**state, "halted": False, "halt_reasons": [], "cleared_at": time.time()}

    before = ledger.update_tripwire_state(task, lift)
    return before if before and before.get("halted") else None


def forget_holdout_baseline(ledger: TripwireLedger, task: str) -> bool:
    """Stop comparing with the last good cycle's hold-out score: it was measured on a frozen hold-out that
    retention removed, and a new one will be drawn (the next deployment records a new baseline). True when
    there was a baseline to forget."""

    def forget(state: dict | None) -> dict | None:
        last_good = (state or {}).get("last_good")
        if not isinstance(last_good, dict) or last_good.get("holdout_score") is None:
            return None
        return {**state, "last_good": {**last_good, "holdout_score": None}}

    before = ledger.update_tripwire_state(task, forget)
    last_good = (before or {}).get("last_good")
    return isinstance(last_good, dict) and last_good.get("holdout_score") is not None
