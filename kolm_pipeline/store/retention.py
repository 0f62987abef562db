"""Retention: past a namespace's window the bodies are replaced by their HMAC-SHA256 digests and the text is
deleted; the row, its counters and its digests stay."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update

from kolm_pipeline.store.base import _CHUNK, HMAC_PREFIX, StoreBase, _utc, canonical_messages, canonical_text
from kolm_pipeline.store.tables import captures


class RetentionQueries(StoreBase):
    """Expiring the text of captures past their namespace's retention window."""

    def apply_retention(self, now: datetime | None = None) -> dict[str, int]:
        """Past each namespace's window, replace bodies by their HMAC-SHA256 and delete the text.

        The row stays (counters, triage state, token usage and latency keep working) and so do the
        digests taken at insert, so a later identical input is still recognised. Returns the number of
        captures expired per `tenant.namespace`."""
        now = _utc(now) if now is not None else self._now()
        custom = self.all_namespace_settings()
        expired: dict[str, int] = {}
        with self.engine.connect() as conn:
            pairs = conn.execute(
                select(captures.c.tenant, captures.c.namespace).where(captures.c.expired_at.is_(None)).distinct()
            ).all()
        for tenant, namespace in pairs:
            settings = custom.get((tenant, namespace)) or self._settings_of(None)
            cutoff = now - timedelta(days=settings.retention_days)
            count = self._expire(tenant, namespace, cutoff, now)
            if count:
                expired[f"{tenant}.{namespace}"] = count
        return expired

    def _expire(self, tenant: str, namespace: str, cutoff: datetime, now: datetime) -> int:
        c = captures.c
        total = 0
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(c.id, c.input_json, c.output_text, c.feedback_output, c.input_hmac, c.output_hmac)
                    .where(
                        c.tenant == tenant,
                        c.namespace == namespace,
                        c.expired_at.is_(None),
                        c.created_at < cutoff,
                    )
                    .order_by(c.id)
                    .limit(_CHUNK)
                ).all()
                if not rows:
                    break
                secret = self._secret(conn, tenant)
                params = []
                for row in rows:
                    feedback = row.feedback_output
                    params.append(
                        {
                            "row_id": row.id,
                            "new_input_hmac": row.input_hmac
                            or secret.hexdigest(canonical_messages(json.loads(row.input_json))),
                            "new_output_hmac": row.output_hmac or secret.hexdigest(canonical_text(row.output_text)),
                            "new_feedback": None
                            if feedback is None
                            else HMAC_PREFIX + secret.hexdigest(canonical_text(feedback)),
                        }
                    )
                conn.execute(
                    update(captures)
                    .where(c.id == bindparam("row_id"))
                    .values(
                        input_json="[]",
                        output_text="",
                        feedback_output=bindparam("new_feedback"),
                        input_hmac=bindparam("new_input_hmac"),
                        output_hmac=bindparam("new_output_hmac"),
                        expired_at=now,
                    ),
                    params,
                )
                self._audit(conn, tenant, namespace, "retention.expire", {"captures": len(rows)}, "retention")
                total += len(rows)
        return total
