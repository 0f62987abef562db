"""Triage: moving captures between states by hand or by a namespace's rules, tags, and explicit feedback."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import bindparam, insert, select, update

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import StoreBase, _chunks, _dumps, _utc
from kolm_pipeline.store.namespaces import validate_namespace
from kolm_pipeline.store.records import TriageRule
from kolm_pipeline.store.rules import rule_matches, validate_rule
from kolm_pipeline.store.tables import TRIAGE_STATES, captures, triage_rules
from kolm_pipeline.store.tags import split_tags, validate_tags


class TriageQueries(StoreBase):
    """Triage states, tags, triage rules and feedback on captures."""

    def set_triage(
        self,
        tenant: str,
        capture_ids: list[int],
        state: str,
        actor: str,
        add_tags: Sequence[str] = (),
        remove_tags: Sequence[str] = (),
    ) -> int:
        """Move captures to `state` and return how many changed; a capture whose status is not 'ok', or
        whose text retention already removed, is never kept: it stays as it is. `add_tags`/`remove_tags`
        change the tags of every named capture of the tenant in the same transaction (e.g. keep a pair and
        mark it `eval-candidate`, so it is held out for evaluation and never trained on)."""
        if state not in TRIAGE_STATES:
            raise InvalidInput(f"invalid triage state {state!r}: expected one of {', '.join(TRIAGE_STATES)}")
        add, remove = validate_tags(add_tags), validate_tags(remove_tags)
        ids = sorted({int(i) for i in capture_ids})
        triaged_by = None if state == "untriaged" else actor
        changed: dict[str, list[int]] = defaultdict(list)
        moved: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        with self.engine.begin() as conn:
            if add or remove:
                self._retag(conn, tenant, ids, add, remove, actor)
            for chunk in _chunks(ids):
                if conn.dialect.name == "postgresql":
                    # Lock the rows first, in id order (chunks ascend too): the updates below then see every
                    # state a concurrent triage committed, and two triages never lock each other's rows
                    # crosswise. SQLite has one writer at a time; a read here would only make its snapshot old.
                    locked = select(captures.c.id).where(captures.c.tenant == tenant, captures.c.id.in_(chunk))
                    conn.execute(locked.order_by(captures.c.id).with_for_update())
                for before in TRIAGE_STATES:  # one state at a time: the counters move from it to `state`
                    if before == state:
                        continue
                    stmt = update(captures).where(
                        captures.c.tenant == tenant,
                        captures.c.id.in_(chunk),
                        captures.c.triage_state == before,
                    )
                    if state == "kept":
                        stmt = stmt.where(captures.c.status == "ok", captures.c.expired_at.is_(None))
                    stmt = stmt.values(triage_state=state, triaged_by=triaged_by).returning(
                        captures.c.id, captures.c.namespace
                    )
                    for row in conn.execute(stmt):
                        changed[row.namespace].append(row.id)
                        counts = moved[(tenant, row.namespace)]
                        counts[before] -= 1
                        counts[state] += 1
            self._add_to_counters(conn, moved)
            for namespace, changed_ids in sorted(changed.items()):
                self._audit(conn, tenant, namespace, f"triage.{state}", {"ids": sorted(changed_ids)}, actor)
        return sum(len(v) for v in changed.values())

    def retag(
        self, tenant: str, capture_ids: Iterable[int], add: Sequence[str], remove: Sequence[str], actor: str
    ) -> int:
        """Add and remove tags on the tenant's captures (ids of other tenants are ignored); returns how many
        captures' tags changed. A tag both added and removed is added."""
        add_list, remove_list = validate_tags(add), validate_tags(remove)
        ids = sorted({int(i) for i in capture_ids})
        with self.engine.begin() as conn:
            return self._retag(conn, tenant, ids, add_list, remove_list, actor)

    def _retag(self, conn: Any, tenant: str, ids: list[int], add: list[str], remove: list[str], actor: str) -> int:
        changed: dict[str, list[int]] = defaultdict(list)
        new_tags: list[dict[str, Any]] = []
        for chunk in _chunks(ids):
            rows = conn.execute(
                select(captures.c.id, captures.c.namespace, captures.c.tags).where(
                    captures.c.tenant == tenant, captures.c.id.in_(chunk)
                )
            ).all()
            for row in rows:
                before = split_tags(row.tags)
                after = [tag for tag in before if tag not in remove or tag in add]
                after += [tag for tag in add if tag not in after]
                if after != before:
                    new_tags.append({"row_id": row.id, "new_tags": ",".join(after)})
                    changed[row.namespace].append(row.id)
        if new_tags:
            conn.execute(
                update(captures).where(captures.c.id == bindparam("row_id")).values(tags=bindparam("new_tags")),
                new_tags,
            )
        for namespace, changed_ids in sorted(changed.items()):
            detail = {"ids": sorted(changed_ids), "added": add, "removed": remove}
            self._audit(conn, tenant, namespace, "tags.update", detail, actor)
        return len(new_tags)

    def add_rule(self, tenant: str, namespace: str, action: str, match: dict[str, Any], actor: str) -> int:
        """Store a triage rule; `apply_rules` runs the namespace's rules in the order they were added."""
        validate_namespace(namespace)
        match = validate_rule(action, match)
        with self.engine.begin() as conn:
            rule_id = conn.execute(
                insert(triage_rules)
                .values(
                    tenant=tenant,
                    namespace=namespace,
                    action=action,
                    match_json=_dumps(match),
                    created_by=actor,
                    created_at=self._now(),
                )
                .returning(triage_rules.c.id)
            ).scalar_one()
            detail = {"id": rule_id, "action": action, "match": match}
            self._audit(conn, tenant, namespace, "rule.add", detail, actor)
        return rule_id

    def rules(self, tenant: str, namespace: str) -> list[TriageRule]:
        stmt = (
            select(triage_rules)
            .where(triage_rules.c.tenant == tenant, triage_rules.c.namespace == namespace)
            .order_by(triage_rules.c.id)
        )
        with self.engine.connect() as conn:
            return [
                TriageRule(
                    row.id,
                    row.tenant,
                    row.namespace,
                    row.action,
                    json.loads(row.match_json),
                    row.created_by,
                    _utc(row.created_at),
                )
                for row in conn.execute(stmt)
            ]

    def apply_rules(self, tenant: str, namespace: str) -> dict[str, int]:
        """Triage the namespace's untriaged captures by its rules; the first matching rule decides."""
        rules = self.rules(tenant, namespace)
        counts = {"kept": 0, "discarded": 0}
        if not rules:
            return counts
        decided: dict[int, list[int]] = defaultdict(list)
        for row in self._untriaged(tenant, namespace):
            tags = split_tags(row.tags)
            for rule in rules:
                if rule_matches(rule.match, row.status, row.model, tags, row.output_text, row.implicit_signal):
                    decided[rule.id].append(row.id)
                    break
        with self.engine.begin() as conn:
            for rule in rules:
                state = "kept" if rule.action == "keep" else "discarded"
                for chunk in _chunks(decided.get(rule.id, [])):
                    stmt = update(captures).where(
                        captures.c.tenant == tenant,
                        captures.c.id.in_(chunk),
                        captures.c.triage_state == "untriaged",
                    )
                    if state == "kept":
                        stmt = stmt.where(captures.c.status == "ok", captures.c.expired_at.is_(None))
                    result = conn.execute(stmt.values(triage_state=state, triaged_by=f"rule:{rule.id}"))
                    counts[state] += result.rowcount
            self._add_to_counters(conn, {(tenant, namespace): counts})
            if counts["kept"] or counts["discarded"]:
                self._audit(conn, tenant, namespace, "rules.apply", dict(counts), "rules")
        return counts

    def _untriaged(self, tenant: str, namespace: str) -> Iterable[Any]:
        """Untriaged captures whose text is still there, in id order, read a page at a time. Answers the deployed
        adapter gave (`served_by`) are left to a person: a rule keeping them would count pairs that never train
        (never train on self-output) and trigger distills of an unchanged corpus."""
        last_id = 0
        c = captures.c
        columns = (c.id, c.status, c.model, c.tags, c.output_text, c.implicit_signal)
        while True:
            stmt = (
                select(*columns)
                .where(
                    c.tenant == tenant,
                    c.namespace == namespace,
                    c.triage_state == "untriaged",
                    c.expired_at.is_(None),
                    c.served_by.is_(None),
                    c.id > last_id,
                )
                .order_by(c.id)
                .limit(1000)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            yield from rows
            last_id = rows[-1].id

    @staticmethod
    def _triage_by_rules(row: dict[str, Any], rules: list[TriageRule]) -> None:
        """The first matching rule decides a new row's state, as `apply_rules` decides an untriaged one."""
        tags = split_tags(row["tags"])
        for rule in rules:
            if rule_matches(rule.match, row["status"], row["model"], tags, row["output_text"]):
                row.update(triage_state="kept" if rule.action == "keep" else "discarded", triaged_by=f"rule:{rule.id}")
                return

    def set_feedback(
        self,
        tenant: str,
        capture_id: int,
        corrected_output: str | None,
        actor: str,
        rating: int | None = None,
    ) -> None:
        """Record explicit feedback: a correction (it replaces the teacher's output in `kept_pairs`), a
        rating from 1 to 5, or both. A capture whose text retention removed takes no correction."""
        if corrected_output is not None and not isinstance(corrected_output, str):
            raise InvalidInput("corrected output must be a string")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            raise InvalidInput("rating must be an integer from 1 to 5")
        if corrected_output is None and rating is None:
            raise InvalidInput("feedback needs a corrected output or a rating")
        values: dict[str, Any] = {}
        if corrected_output is not None:
            values["feedback_output"] = corrected_output
        if rating is not None:
            values["feedback_rating"] = rating
        with self.engine.begin() as conn:
            found = conn.execute(
                select(captures.c.namespace, captures.c.expired_at).where(
                    captures.c.tenant == tenant, captures.c.id == capture_id
                )
            ).first()
            if found is None:
                raise LookupError(f"no capture {capture_id} for tenant {tenant!r}")
            if found.expired_at is not None and corrected_output is not None:
                raise InvalidInput(f"capture {capture_id} is past its retention window; its text is gone")
            conn.execute(
                update(captures).where(captures.c.tenant == tenant, captures.c.id == capture_id).values(**values)
            )
            detail = {"id": capture_id, "correction": corrected_output is not None, "rating": rating}
            self._audit(conn, tenant, found.namespace, "feedback.set", detail, actor)
