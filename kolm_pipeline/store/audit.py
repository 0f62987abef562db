"""The audit log: writing a row outside another query's transaction, and reading a tenant's log."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from kolm_pipeline.store.base import StoreBase, _utc
from kolm_pipeline.store.records import AuditRow
from kolm_pipeline.store.tables import audit_log


class AuditQueries(StoreBase):
    """Writing and reading the audit log."""

    def audit(self, tenant: str, namespace: str | None, action: str, detail: dict[str, Any], actor: str) -> None:
        with self.engine.begin() as conn:
            self._audit(conn, tenant, namespace, action, detail, actor)

    def audit_rows(self, tenant: str, namespace: str | None = None) -> list[AuditRow]:
        """A tenant's audit log, newest first."""
        stmt = select(audit_log).where(audit_log.c.tenant == tenant).order_by(audit_log.c.id.desc())
        if namespace is not None:
            stmt = stmt.where(audit_log.c.namespace == namespace)
        with self.engine.connect() as conn:
            return [
                AuditRow(
                    row.id,
                    row.tenant,
                    row.namespace,
                    row.action,
                    json.loads(row.detail_json),
                    row.actor,
                    _utc(row.created_at),
                )
                for row in conn.execute(stmt)
            ]
