"""Routing through the capture endpoint: the requests both the teacher and a namespace's deployed adapter
answered, how far they agreed, the confidence threshold above which the adapter (the student) may answer
alone, and the figures the status shows (agreement, share answered by the student, escalations, latency,
teacher dollars avoided).

Every figure is over the adapter deployed now (the newest `swap` or `rollback` row of the task): another
adapter's agreement says nothing about this one's."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select

from kolm_pipeline.settings import price_of_call
from kolm_pipeline.store.base import StoreBase, _utc
from kolm_pipeline.store.namespaces import partition_key
from kolm_pipeline.store.tables import captures, student_comparisons

# Comparisons read for the threshold and the status: the newest ones of the adapter (so `shadow_min` ≤ this).
MAX_COMPARED = 5000
_RECENT = MAX_COMPARED


@dataclass(frozen=True)
class Comparison:
    """One request both models answered. `agreement` is the task's verifier score of the student's answer
    with the teacher's as reference (1.0: the same label, every JSON field, identical text)."""

    tenant: str
    namespace: str
    request_id: str
    adapter_cid: str
    kind: str
    agreement: float
    confidence: float
    student_output: str
    student_latency_us: int
    teacher_latency_us: int


# One-sided 95 % normal quantile: the kept answers' agreement must reach the target at this confidence, not only
# on the compared sample (the sample's mean over-promised on live traffic: docs/benchmarks.md, "Routing").
AGREEMENT_Z = 1.645


def agreement_lower_bound(mean: float, count: int, z: float = AGREEMENT_Z) -> float:
    """Wilson score lower bound of an agreement rate `mean` measured over `count` requests."""
    if count <= 0:
        return 0.0
    mean = min(1.0, max(0.0, mean))
    z2 = z * z
    centre = mean + z2 / (2 * count)
    spread = z * math.sqrt(mean * (1 - mean) / count + z2 / (4 * count * count))
    return (centre - spread) / (1 + z2 / count)


@dataclass(frozen=True)
class StudentThreshold:
    """The lowest confidence at which the student answers alone such that its kept answers agree with the
    teacher at least at the target (by the lower bound of their measured agreement); `threshold` None when no
    threshold keeps answers at the target. `kept_agreement` is the kept answers' measured mean, `kept_lower` its
    95 % lower bound."""

    threshold: float | None
    kept_share: float
    kept_agreement: float | None
    kept_lower: float | None = None


def choose_threshold(pairs: list[tuple[float, float]], target: float) -> StudentThreshold:
    """From (confidence, agreement) pairs, the threshold that keeps the most answers whose agreement is ≥
    `target` with 95 % confidence (Wilson lower bound of their mean). Cuts fall only between distinct
    confidences (equal ones are kept or escalated alike)."""
    if not pairs:
        return StudentThreshold(None, 0.0, None)
    ordered = sorted(pairs, key=lambda pair: -pair[0])
    best: StudentThreshold | None = None
    total = 0.0
    for kept, (confidence, agreement) in enumerate(ordered, start=1):
        total += agreement
        if kept < len(ordered) and ordered[kept][0] == confidence:
            continue
        lower = agreement_lower_bound(total / kept, kept)
        if lower >= target:
            best = StudentThreshold(confidence, kept / len(ordered), total / kept, lower)
    return best or StudentThreshold(None, 0.0, None)


@dataclass(frozen=True)
class RoutingStatus:
    """What the status route, `kolm capture status` and the Dagster observation show of a namespace's routing."""

    mode: str
    target: float
    canary_share: float
    shadow_min: int
    adapter_cid: str | None
    compared: int
    agreement: float | None
    threshold: float | None
    kept_share: float
    kept_agreement: float | None
    kept_agreement_lower: float | None
    disagreements: int
    student_answered: int
    escalated: int
    canaries: int
    student_share: float | None
    escalation_rate: float | None
    student_p50_ms: float | None
    teacher_p50_ms: float | None
    dollars_avoided: float
    ready: bool
    missing: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StudentRoutingQueries(StoreBase):
    """Recording compared requests and reading a namespace's routing status."""

    def deployed_cid(self, tenant: str, namespace: str) -> str | None:
        """The CID of the adapter the namespace's task serves now (`DeploymentQueries.champions`)."""
        task = partition_key(tenant, namespace)
        return self.champions(task).get(task)  # type: ignore[attr-defined]

    def add_comparisons(self, comparisons: list[Comparison]) -> None:
        if not comparisons:
            return
        now = self._now()
        with self.engine.begin() as conn:
            conn.execute(insert(student_comparisons), [{**asdict(c), "created_at": now} for c in comparisons])

    def comparisons(self, tenant: str, namespace: str, adapter_cid: str, limit: int = _RECENT) -> list[Comparison]:
        """The adapter's compared requests in the namespace, newest first."""
        c = student_comparisons.c
        stmt = (
            select(student_comparisons)
            .where(c.tenant == tenant, c.namespace == namespace, c.adapter_cid == adapter_cid)
            .order_by(c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [Comparison(**{name: getattr(row, name) for name in Comparison.__dataclass_fields__})
                    for row in conn.execute(stmt)]

    def student_threshold(self, tenant: str, namespace: str, adapter_cid: str, target: float,
                          shadow_min: int) -> float | None:
        """The adapter's confidence threshold at `target` (`choose_threshold`), reading only the two numbers of
        its newest compared requests: what the proxy's router re-reads every few seconds. None until `shadow_min`
        requests were compared (a new adapter earns its threshold as the first one had to)."""
        c = student_comparisons.c
        stmt = (
            select(c.confidence, c.agreement)
            .where(c.tenant == tenant, c.namespace == namespace, c.adapter_cid == adapter_cid)
            .order_by(c.id.desc())
            .limit(_RECENT)
        )
        with self.engine.connect() as conn:
            pairs = [(row.confidence, row.agreement) for row in conn.execute(stmt)]
        if len(pairs) < shadow_min:
            return None
        return choose_threshold(pairs, target).threshold

    def disagreements(self, tenant: str, namespace: str, limit: int = 100) -> list[dict[str, Any]]:
        """The deployed adapter's compared requests where it did not fully agree with the teacher, newest first,
        with the capture they belong to (its id for triage, the input and the teacher's answer)."""
        cid = self.deployed_cid(tenant, namespace)
        if cid is None:
            return []
        c, k = student_comparisons.c, captures.c
        stmt = (
            select(c.request_id, c.kind, c.agreement, c.confidence, c.student_output, c.created_at,
                   k.id.label("capture_id"), k.output_text, k.triage_state)
            .join(captures, (k.request_id == c.request_id) & (k.tenant == c.tenant))
            .where(c.tenant == tenant, c.namespace == namespace, c.adapter_cid == cid, c.agreement < 1.0)
            .order_by(c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [{"capture_id": row.capture_id, "request_id": row.request_id, "kind": row.kind,
                     "agreement": row.agreement, "confidence": row.confidence,
                     "student_output": row.student_output, "teacher_output": row.output_text,
                     "triage_state": row.triage_state, "created_at": _utc(row.created_at).isoformat()}
                    for row in conn.execute(stmt)]

    def routing_status(self, tenant: str, namespace: str, price_table: dict[str, tuple[float, float]] | None = None,
                       *, target: float | None = None, shadow_min: int | None = None) -> RoutingStatus:
        """The namespace's routing now; `target` and `shadow_min` judge readiness with other values than the
        namespace's own (a switch change that sets them is judged by what it sets)."""
        settings = self.namespace_settings(tenant, namespace)  # type: ignore[attr-defined]
        target = settings.routing_target if target is None else target
        shadow_min = settings.shadow_min if shadow_min is None else shadow_min
        cid = self.deployed_cid(tenant, namespace)
        compared = self.comparisons(tenant, namespace, cid) if cid else []
        chosen = choose_threshold([(c.confidence, c.agreement) for c in compared], target)
        student_answered, teacher_usage = self._answered(tenant, namespace, cid)
        escalated = sum(1 for c in compared if c.kind == "escalated")
        canaries = sum(1 for c in compared if c.kind == "canary")
        routed = student_answered + escalated + canaries
        dollars = 0.0
        if price_table and teacher_usage is not None:
            dollars = student_answered * price_of_call(*teacher_usage, price_table)
        missing = None
        if cid is None:
            missing = "no adapter is deployed for this namespace: deploy one first (kolm swap, or a distill)"
        elif len(compared) < shadow_min:
            missing = (f"{len(compared)} of {shadow_min} requests compared with adapter {cid[:16]}…: "
                       "keep routing `shadow` until enough traffic has been compared")
        elif chosen.threshold is None:
            missing = (f"no confidence threshold keeps answers of adapter {cid[:16]}… at agreement {target} "
                       f"(with 95 % confidence, over {len(compared)} compared requests): compare more traffic, "
                       "distill a better adapter or lower the target")
        return RoutingStatus(
            mode=settings.routing, target=target, canary_share=settings.canary_share, shadow_min=shadow_min,
            adapter_cid=cid, compared=len(compared),
            agreement=statistics.fmean(c.agreement for c in compared) if compared else None,
            threshold=chosen.threshold, kept_share=chosen.kept_share, kept_agreement=chosen.kept_agreement,
            kept_agreement_lower=chosen.kept_lower,
            disagreements=sum(1 for c in compared if c.agreement < 1.0),
            student_answered=student_answered, escalated=escalated, canaries=canaries,
            student_share=student_answered / routed if routed else None,
            escalation_rate=escalated / routed if routed else None,
            student_p50_ms=statistics.median(c.student_latency_us for c in compared) / 1000 if compared else None,
            teacher_p50_ms=statistics.median(c.teacher_latency_us for c in compared) / 1000 if compared else None,
            dollars_avoided=round(dollars, 6), ready=missing is None, missing=missing,
        )

    def _answered(self, tenant: str, namespace: str, cid: str | None) -> tuple[int, tuple[str, float, float] | None]:
        """(captures the adapter answered, the teacher's typical call: its model and mean token counts)."""
        k = captures.c
        ours = (k.tenant == tenant, k.namespace == namespace)
        with self.engine.connect() as conn:
            answered = 0
            if cid is not None:
                answered = conn.execute(select(func.count()).where(*ours, k.served_by == cid)).scalar_one()
            usage = conn.execute(
                select(k.model, func.avg(k.prompt_tokens), func.avg(k.completion_tokens))
                .where(*ours, k.served_by.is_(None), k.status == "ok", k.prompt_tokens.is_not(None),
                       k.completion_tokens.is_not(None), k.expired_at.is_(None))
                .group_by(k.model).order_by(func.count().desc()).limit(1)
            ).first()
        return answered, (usage[0], float(usage[1]), float(usage[2])) if usage is not None else None

    def expire_comparisons(self, tenant: str, namespace: str, cutoff: datetime) -> int:
        """Delete the namespace's compared requests made before `cutoff` (its retention window)."""
        c = student_comparisons.c
        with self.engine.begin() as conn:
            return conn.execute(
                delete(student_comparisons).where(c.tenant == tenant, c.namespace == namespace, c.created_at < cutoff)
            ).rowcount

    def comparison_namespaces(self) -> list[tuple[str, str]]:
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(
                select(student_comparisons.c.tenant, student_comparisons.c.namespace).distinct())]
