"""A namespace's counters (captured, kept, discarded, distilled, merged) as stored, their repair by a
recount, and the status and observation built on them.

What each counts (the README's glossary says it for users):

- captured: requests the proxy recorded (and pairs imported); kept / discarded: captures triaged so; untriaged:
  the rest. Every capture is in exactly one of kept, discarded and untriaged.
- distilled: kept pairs written into a corpus at least once: the recipe splits them into training, eval and the
  frozen hold-out and removes training pairs that overlap those, so fewer are trained on (the `recipe` asset's
  `train_pairs`).
- merged: distill runs that cleared the gate and were published (a `.kolm` deployed by the deployment stage):
  the registry's swap rows of the task `tenant.namespace` that the deployment stage wrote. Not pairs: until
  migration 8 it counted the pairs of deployed corpora, which made it read like `distilled`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, union_all, update

from kolm_pipeline.store.base import _ADD_TO_COUNTERS, _COUNTERS, StoreBase, _utc
from kolm_pipeline.store.namespaces import partition_key
from kolm_pipeline.store.tables import TRIAGE_STATES, captures, namespace_counters, registry

# A registry row the deployment stage wrote: a swap whose details name the evaluation's `current` side (the
# champion it beat, or the bare base). `kolm swap` and rollbacks write no such key. Migration 8 counts the same.
PUBLISHED_DISTILL_MARK = '%"current":%'


def published_distills(conn: Any, tenant: str, namespace: str) -> int:
    """Distill runs of the namespace that cleared the gate and were published, counted in the registry."""
    r = registry.c
    stmt = select(func.count()).where(r.task == partition_key(tenant, namespace), r.decision == "swap",
                                      r.details_json.like(PUBLISHED_DISTILL_MARK))
    return int(conn.execute(stmt).scalar_one())


class CounterQueries(StoreBase):
    """Counters, recount, status, observation and the list of namespaces."""

    def counters(self, tenant: str, namespace: str) -> dict[str, int]:
        """The counters of a namespace: captured, kept, discarded, untriaged, distilled (kept pairs that
        went into a corpus) and merged (distill runs that cleared the gate and were published; the module
        docstring says more). Retention changes none of them."""
        with self.engine.connect() as conn:
            return self._counters_in(conn, tenant, namespace)

    @staticmethod
    def _counters_in(conn: Any, tenant: str, namespace: str) -> dict[str, int]:
        c = namespace_counters.c
        stmt = select(*(c[name] for name in _COUNTERS)).where(c.tenant == tenant, c.namespace == namespace)
        row = conn.execute(stmt).first()
        counts = dict(zip(_COUNTERS, map(int, row), strict=True)) if row is not None else dict.fromkeys(_COUNTERS, 0)
        return {
            "captured": counts["captured"],
            "kept": counts["kept"],
            "discarded": counts["discarded"],
            "untriaged": counts["captured"] - counts["kept"] - counts["discarded"],
            "distilled": counts["distilled"],
            "merged": counts["merged"],
        }

    def recount(self, tenant: str, namespace: str, actor: str) -> dict[str, int]:
        """Count the namespace's captures row by row (and its published distill runs in the registry) and
        store the result as its counters; returns the counters as they were. The repair for counters a
        writer left behind: a process of a version from before migration 6 still running against an upgraded
        store inserts captures without counting them. A change is written to the audit log. Writers and
        triages may go on meanwhile: the counters row is locked first, so what they commit before the count
        is in it and what they add after waits for it."""
        c = captures.c
        with self.engine.begin() as conn:
            conn.execute(_ADD_TO_COUNTERS, {"tenant": tenant, "namespace": namespace, **dict.fromkeys(_COUNTERS, 0)})
            before = self._counters_in(conn, tenant, namespace)
            stored = {name: before[name] for name in _COUNTERS}
            rows = conn.execute(
                select(c.triage_state, func.count(c.id), func.count(c.distilled_at))
                .where(c.tenant == tenant, c.namespace == namespace)
                .group_by(c.triage_state)
            ).all()
            by_state = {state: int(count) for state, count, _ in rows}
            counted = {
                "captured": sum(by_state.values()),
                "kept": by_state.get("kept", 0),
                "discarded": by_state.get("discarded", 0),
                "distilled": sum(int(row[2]) for row in rows),
                "merged": published_distills(conn, tenant, namespace),
            }
            conn.execute(
                update(namespace_counters)
                .where(namespace_counters.c.tenant == tenant, namespace_counters.c.namespace == namespace)
                .values(**counted)
            )
            if counted != stored:
                self._audit(conn, tenant, namespace, "counters.recount", {"before": stored, "after": counted}, actor)
        return before

    def status(self, tenant: str, namespace: str,
               price_table: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
        """Counters, switches and routing of a namespace, as the status route and `kolm capture status` show
        them (`price_table` prices the teacher calls the student avoided)."""
        settings = self.namespace_settings(tenant, namespace)
        return {
            "namespace": namespace,
            "counters": self.counters(tenant, namespace),
            "switches": settings.switches(),
            "redaction": sorted(settings.redact_entities) if settings.redact_entities is not None else "all",
            "routing": self.routing_status(tenant, namespace, price_table).as_dict(),  # type: ignore[attr-defined]
        }

    def observation(self, tenant: str, namespace: str) -> dict[str, Any]:
        """What a Dagster observation of the namespace's captures reports: counters and the newest capture
        (the last stored, highest id) with the time it was made."""
        c = captures.c
        ours = (c.tenant == tenant, c.namespace == namespace)
        if self.engine.dialect.name == "sqlite":
            # The newest id of each triage state is the last entry of its part of the (tenant, namespace,
            # triage_state) index, which ends in the row id: three lookups. Ordering the namespace's rows by
            # id sorted them all (0.12 s at 200,000).
            newest = [select(func.max(c.id)).where(*ours, c.triage_state == state) for state in TRIAGE_STATES]
            newest_id = select(func.max(union_all(*newest).subquery().c[0])).scalar_subquery()
            stmt = select(c.id, c.created_at).where(c.id == newest_id)
        else:  # PostgreSQL walks its primary key backwards
            stmt = select(c.id, c.created_at).where(*ours).order_by(c.id.desc()).limit(1)
        with self.engine.connect() as conn:
            last = conn.execute(stmt).first()
        return {
            "counters": self.counters(tenant, namespace),
            "last_capture_id": last.id if last is not None else None,
            "last_capture_at": _utc(last.created_at).isoformat() if last is not None else None,
        }

    def namespaces(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """Every (tenant, namespace) with at least one capture, optionally of one tenant."""
        c = namespace_counters.c
        stmt = select(c.tenant, c.namespace).where(c.captured > 0)
        if tenant is not None:
            stmt = stmt.where(c.tenant == tenant)
        stmt = stmt.order_by(c.tenant, c.namespace)
        with self.engine.connect() as conn:
            return [(row[0], row[1]) for row in conn.execute(stmt)]
