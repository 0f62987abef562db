"""Retention: past a namespace's window the bodies, the correction and the model name are replaced by their
HMAC-SHA256 digests, the tags are dropped and the text is deleted; the row, its counters and its digests stay.

On SQLite an update leaves the old text behind twice over: in the write-ahead file until it is reused, and in
the unallocated gap of live b-tree pages (left there when SQLite rebuilt a page while balancing it), which
secure_delete (set on every connection) does not zero: it clears only what it frees. So a sweep that expired
anything ends with VACUUM, which writes every page afresh, and a TRUNCATE checkpoint. PostgreSQL keeps the old
row versions until VACUUM reclaims their space and they are overwritten; its WAL, archives and backups are the
operator's (docs/security.md, item 4)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import OperationalError

from kolm_pipeline.store.base import _CHUNK, HMAC_PREFIX, StoreBase, _chunks, _utc, canonical_messages, canonical_text
from kolm_pipeline.store.tables import captures


class RetentionQueries(StoreBase):
    """Expiring the text of captures past their namespace's retention window."""

    def apply_retention(self, now: datetime | None = None, scrub: bool = True) -> dict[str, int]:
        """Past each namespace's window, replace bodies, correction and model name by their HMAC-SHA256, drop
        the tags, and delete the text (`scrub`: on SQLite from the file's free space and write-ahead file too;
        a caller that scrubs later itself passes False).

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
        # The student's answers compared with the teacher's go with the window of the captures they belong to.
        deleted = 0
        for tenant, namespace in self.comparison_namespaces():  # type: ignore[attr-defined]
            settings = custom.get((tenant, namespace)) or self._settings_of(None)
            cutoff = now - timedelta(days=settings.retention_days)
            deleted += self.expire_comparisons(tenant, namespace, cutoff)  # type: ignore[attr-defined]
        if (expired or deleted) and scrub:
            self.scrub()
        return expired

    def scrub(self) -> bool:
        """On SQLite, rewrite the database (VACUUM) and empty the write-ahead file, so no byte of a replaced text
        is left in either; True when both were done. VACUUM takes time in proportion to the file and holds the
        write lock meanwhile (the proxy's writer spools until it is done); another connection in the middle of a
        transaction makes it wait, then give up until the next sweep. Nothing to do on PostgreSQL."""
        if self.engine.dialect.name != "sqlite":
            return True
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("VACUUM")
                busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        except OperationalError:
            return False
        return busy == 0

    def captures_with_text(self, tenant: str, namespace: str, capture_ids: Iterable[int]) -> set[int]:
        """Those of `capture_ids` that exist in the namespace and still hold their text: what a work file may
        keep rows of. Any other id was expired or deleted."""
        ids = sorted({int(i) for i in capture_ids})
        found: set[int] = set()
        with self.engine.connect() as conn:
            for chunk in _chunks(ids):
                found.update(conn.execute(
                    select(captures.c.id).where(
                        captures.c.tenant == tenant,
                        captures.c.namespace == namespace,
                        captures.c.id.in_(chunk),
                        captures.c.expired_at.is_(None),
                    )
                ).scalars())
        return found

    def _expire(self, tenant: str, namespace: str, cutoff: datetime, now: datetime) -> int:
        c = captures.c
        total = 0
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(c.id, c.input_json, c.output_text, c.feedback_output, c.input_hmac, c.output_hmac, c.model)
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
                            # A client names the model; what it sends is its text like the body is.
                            "new_model": row.model
                            if row.model.startswith(HMAC_PREFIX)
                            else HMAC_PREFIX + secret.hexdigest(canonical_text(row.model)),
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
                        model=bindparam("new_model"),
                        tags="",
                        expired_at=now,
                    ),
                    params,
                )
                self._audit(conn, tenant, namespace, "retention.expire", {"captures": len(rows)}, "retention")
                total += len(rows)
        return total
