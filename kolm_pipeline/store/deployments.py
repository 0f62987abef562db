"""Deployment state every host reads from the store: each task's champion, from the registry's newest serving row
(what `kolm serve --follow registry` replicas follow: the registry row *is* the pointer there, it moves in the
transaction that writes it), the tenants' public signing keys, published by every deployment, and each task's
collapse-tripwire state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import StoreBase
from kolm_pipeline.store.tables import SERVING_DECISIONS, registry, signing_keys, tripwire_states


class DeploymentQueries(StoreBase):
    """Champions by task, and public signing keys."""

    def champions(self, task: str | None = None) -> dict[str, str | None]:
        """Every deployed task (or only `task`) and the CID it serves now (None: its newest serving row names no
        artifact)."""
        newest = select(func.max(registry.c.id)).where(registry.c.decision.in_(SERVING_DECISIONS))
        if task is not None:
            newest = newest.where(registry.c.task == task)
        newest = newest.group_by(registry.c.task).scalar_subquery()
        with self.engine.connect() as conn:
            rows = conn.execute(select(registry.c.task, registry.c.to_cid).where(registry.c.id.in_(newest)))
            return {row.task: row.to_cid for row in rows}

    def publish_public_key(self, tenant: str, keyid: str, public_key: str) -> None:
        """Record a tenant's public key (idempotent); a keyid already recorded for another tenant, or with other
        bytes, is refused: a replica must never be told to trust a key for someone else's artifacts."""
        with self.engine.begin() as conn:
            row = conn.execute(select(signing_keys).where(signing_keys.c.keyid == keyid)).first()
            if row is None:
                conn.execute(insert(signing_keys).values(keyid=keyid, tenant=tenant, public_key=public_key,
                                                         created_at=self._now()))
            elif (row.tenant, row.public_key) != (tenant, public_key):
                raise InvalidInput(f"key {keyid} is already recorded for tenant {row.tenant!r} with other bytes")

    def public_keys(self) -> dict[str, tuple[str, str]]:
        """keyid → (tenant, base64 public key) of every published key."""
        with self.engine.connect() as conn:
            return {row.keyid: (row.tenant, row.public_key) for row in conn.execute(select(signing_keys))}

    def tripwire_state(self, task: str) -> dict[str, Any] | None:
        """The task's collapse-tripwire state (`evaluate/tripwire.py`), None before its first record."""
        with self.engine.connect() as conn:
            text = conn.execute(select(tripwire_states.c.state_json).where(tripwire_states.c.task == task)).scalar()
        return json.loads(text) if text is not None else None

    def update_tripwire_state(self, task: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
                              ) -> dict[str, Any] | None:
        """Read the task's state, apply `change` (None: leave it as it is) and write the result only if the state
        is still what was read (compare and set, on SQLite as on PostgreSQL), else read again and re-apply: two
        hosts recording a trip and a good cycle at once lose neither. Returns the state the change applied to."""
        t = tripwire_states.c
        for _attempt in range(10):
            with self.engine.connect() as conn:
                text = conn.execute(select(t.state_json).where(t.task == task)).scalar()
            before = json.loads(text) if text is not None else None
            after = change(None if before is None else dict(before))
            if after is None:
                return before
            values = {"state_json": json.dumps(after, sort_keys=True), "updated_at": self._now()}
            try:
                with self.engine.begin() as conn:
                    if text is None:
                        conn.execute(insert(tripwire_states).values(task=task, **values))
                        return before
                    if conn.execute(update(tripwire_states).where(t.task == task, t.state_json == text)
                                    .values(**values)).rowcount:
                        return before
            except IntegrityError:  # another host inserted the first state meanwhile
                pass
        raise RuntimeError(f"the tripwire state of {task} kept changing under this update; try again")
