"""What the later stages read and mark: the kept pairs a corpus is built from, and the distilled and merged
marks the corpus and a deployment put on them (the `merged` counter counts published distill runs: see
counters.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import or_, select, update

from kolm_pipeline.store.base import _ADD_TO_COUNTERS, _COUNTERS, StoreBase, _chunks, _utc
from kolm_pipeline.store.counters import published_distills
from kolm_pipeline.store.records import KeptPair
from kolm_pipeline.store.tables import captures, namespace_counters
from kolm_pipeline.store.tags import split_tags


class KeptPairQueries(StoreBase):
    """Kept pairs for the corpus, and their distilled and merged marks."""

    def kept_pairs(self, tenant: str, namespace: str) -> list[KeptPair]:
        """Kept, complete pairs whose text is still there, in id order.

        Each pair's `source` is where its output came from: a person's feedback correction counts as
        `human` whatever the capture's own source, since a person wrote that output; otherwise the
        capture's source. Its `weight` is that source's weight in `source_weights`."""
        stmt = (
            select(captures)
            .where(
                captures.c.tenant == tenant,
                captures.c.namespace == namespace,
                captures.c.triage_state == "kept",
                captures.c.status == "ok",
                captures.c.expired_at.is_(None),
                # Never train on self-output: an answer the deployed adapter gave in the teacher's place is
                # no pair, unless a person corrected it.
                or_(captures.c.served_by.is_(None), captures.c.feedback_output.is_not(None)),
            )
            .order_by(captures.c.id)
        )
        with self.engine.connect() as conn:
            return [
                KeptPair(
                    id=row.id,
                    messages=json.loads(row.input_json),
                    output=row.feedback_output if row.feedback_output is not None else row.output_text,
                    model=row.model,
                    latency_us=row.latency_us,
                    prompt_tokens=row.prompt_tokens,
                    completion_tokens=row.completion_tokens,
                    created_at=_utc(row.created_at),
                    tags=split_tags(row.tags),
                    source=self._output_source(row),
                    weight=self.source_weights[self._output_source(row)],
                )
                for row in conn.execute(stmt)
            ]

    @staticmethod
    def _output_source(row: Any) -> str:
        return "human" if row.feedback_output is not None else row.source

    def mark_distilled(self, tenant: str, namespace: str, capture_ids: Iterable[int], actor: str = "corpus") -> int:
        """Record that these kept pairs went into a corpus (the `distilled` counter); returns how many
        were newly marked. Ids of other tenants or namespaces, or not kept, are ignored."""
        with self.engine.begin() as conn:
            marked = self._mark(conn, tenant, namespace, capture_ids, captures.c.distilled_at)
            self._add_to_counters(conn, {(tenant, namespace): {"distilled": marked}})
            if marked:
                self._audit(conn, tenant, namespace, "corpus.distilled", {"captures": marked}, actor)
        return marked

    def mark_merged(self, tenant: str, namespace: str, capture_ids: Iterable[int], actor: str = "deployment") -> int:
        """After the deployment stage published a distill run (its registry row is written): record that these
        pairs are in a deployed artifact (each capture's `merged_at`; they count as distilled too) and bring
        the `merged` counter, which counts published distill runs, not pairs, to the registry's count. Returns
        how many pairs were newly marked."""
        with self.engine.begin() as conn:
            distilled = self._mark(conn, tenant, namespace, capture_ids, captures.c.distilled_at)
            marked = self._mark(conn, tenant, namespace, capture_ids, captures.c.merged_at)
            self._add_to_counters(conn, {(tenant, namespace): {"distilled": distilled}})
            runs = published_distills(conn, tenant, namespace)
            conn.execute(_ADD_TO_COUNTERS, {"tenant": tenant, "namespace": namespace, **dict.fromkeys(_COUNTERS, 0)})
            conn.execute(update(namespace_counters)
                         .where(namespace_counters.c.tenant == tenant, namespace_counters.c.namespace == namespace)
                         .values(merged=runs))
            self._audit(conn, tenant, namespace, "artifact.merged", {"captures": marked, "merged_runs": runs}, actor)
        return marked

    def _mark(self, conn: Any, tenant: str, namespace: str, capture_ids: Iterable[int], column: Any) -> int:
        """Set `column` (distilled_at or merged_at) on kept captures of the namespace that lack it, in the
        caller's transaction; returns how many it was set on."""
        ids = sorted({int(i) for i in capture_ids})
        now = self._now()
        marked = 0
        for chunk in _chunks(ids):
            marked += conn.execute(
                update(captures)
                .where(
                    captures.c.tenant == tenant,
                    captures.c.namespace == namespace,
                    captures.c.id.in_(chunk),
                    captures.c.triage_state == "kept",
                    column.is_(None),
                )
                .values({column.name: now})
            ).rowcount
        return marked
