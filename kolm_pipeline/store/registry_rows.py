"""The registry's rows: each promotion decision of a task, from which artifact to which, with its scores."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert, select

from kolm_pipeline.store.base import StoreBase, _dumps, _utc
from kolm_pipeline.store.records import RegistryRow
from kolm_pipeline.store.tables import registry


class RegistryQueries(StoreBase):
    """Adding and reading registry rows."""

    def add_registry_row(
        self,
        task: str,
        from_cid: str | None,
        to_cid: str | None,
        k_before: float | None,
        k_after: float | None,
        decision: str,
        actor: str,
        details: dict[str, Any],
    ) -> int:
        with self.engine.begin() as conn:
            return conn.execute(
                insert(registry)
                .values(
                    task=task,
                    from_cid=from_cid,
                    to_cid=to_cid,
                    k_before=k_before,
                    k_after=k_after,
                    decision=decision,
                    actor=actor,
                    details_json=_dumps(details),
                    created_at=self._now(),
                )
                .returning(registry.c.id)
            ).scalar_one()

    def registry_rows(self, task: str | None = None) -> list[RegistryRow]:
        """Registry rows, newest first."""
        stmt = select(registry).order_by(registry.c.id.desc())
        if task is not None:
            stmt = stmt.where(registry.c.task == task)
        with self.engine.connect() as conn:
            return [
                RegistryRow(
                    id=row.id,
                    task=row.task,
                    from_cid=row.from_cid,
                    to_cid=row.to_cid,
                    k_before=row.k_before,
                    k_after=row.k_after,
                    decision=row.decision,
                    actor=row.actor,
                    details=json.loads(row.details_json),
                    created_at=_utc(row.created_at),
                )
                for row in conn.execute(stmt)
            ]
