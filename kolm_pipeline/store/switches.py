"""A namespace's switches (retention window, implicit signals, distill-ready, redacted entities, routing
and its knobs), each change audited with its old and new value."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import StoreBase
from kolm_pipeline.store.namespaces import validate_namespace, validate_tenant
from kolm_pipeline.store.records import NamespaceSettings
from kolm_pipeline.store.student_routing import MAX_COMPARED
from kolm_pipeline.store.tables import ROUTING_MODES, namespace_settings

_SWITCH_NAMES = ("retention_days", "implicit_signals", "distill_ready", "redact_entities", "routing",
                 "routing_target", "canary_share", "shadow_min", "image_bytes_limit")
_ROUTING_KNOBS = ("routing_target", "canary_share", "shadow_min")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_routing(changes: dict[str, Any]) -> None:
    if "routing" in changes and changes["routing"] not in ROUTING_MODES:
        raise InvalidInput(f"unknown routing {changes['routing']!r}: use one of {', '.join(ROUTING_MODES)}")
    target = changes.get("routing_target")
    # Below 1: a target of 1 could never be shown (the agreement's lower bound stays under 1 on any sample).
    if target is not None and not (_number(target) and 0 < target < 1):
        raise InvalidInput("routing_target must be a number above 0 and below 1")
    share = changes.get("canary_share")
    if share is not None and not (_number(share) and 0 <= share < 1):
        raise InvalidInput("canary_share must be a number from 0 up to (not including) 1")
    shadow_min = changes.get("shadow_min")
    if shadow_min is not None and (isinstance(shadow_min, bool) or not isinstance(shadow_min, int)
                                   or not 1 <= shadow_min <= MAX_COMPARED):
        raise InvalidInput(f"shadow_min must be an integer from 1 to {MAX_COMPARED}")


class SwitchQueries(StoreBase):
    """Reading and changing namespace switches."""

    def namespace_settings(self, tenant: str, namespace: str) -> NamespaceSettings:
        """The namespace's switches; defaults (retention window of the store, the rest off) until set."""
        stmt = select(namespace_settings).where(
            namespace_settings.c.tenant == tenant, namespace_settings.c.namespace == namespace
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return self._settings_of(row)

    def all_namespace_settings(self) -> dict[tuple[str, str], NamespaceSettings]:
        """Every namespace that set a switch; the others run on the defaults."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(namespace_settings)).all()
        return {(row.tenant, row.namespace): self._settings_of(row) for row in rows}

    def set_switches(self, tenant: str, namespace: str, actor: str, **changes: Any) -> NamespaceSettings:
        """Change switches (`retention_days`, `implicit_signals`, `distill_ready`, `redact_entities`, `routing`,
        `routing_target`, `canary_share`, `shadow_min`, `image_bytes_limit`); each change is written to the audit
        log with its old and new value, in the same transaction.

        `routing` `shadow` needs a deployed adapter, and `student` a routing status that is `ready` (enough
        requests compared, a confidence threshold that keeps answers at the target): otherwise InvalidInput says
        what is missing and nothing changes."""
        validate_tenant(tenant)
        validate_namespace(namespace)
        unknown = sorted(set(changes) - set(_SWITCH_NAMES))
        if unknown:
            raise InvalidInput(f"unknown switches {unknown}: allowed are {', '.join(_SWITCH_NAMES)}")
        changes = {name: value for name, value in changes.items() if value is not None or name == "redact_entities"}
        if "retention_days" in changes:
            days = changes["retention_days"]
            if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
                raise InvalidInput("retention_days must be an integer from 1 to 3650")
        limit = changes.get("image_bytes_limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 1 << 50):
            raise InvalidInput("image_bytes_limit must be a whole number of bytes (0: store no images)")
        for name in ("implicit_signals", "distill_ready"):
            if name in changes and not isinstance(changes[name], bool):
                raise InvalidInput(f"{name} must be true or false")
        if "redact_entities" in changes and changes["redact_entities"] is not None:
            entities = changes["redact_entities"]
            if not isinstance(entities, list | tuple) or not all(
                isinstance(e, str) and e.isidentifier() and e.isupper() for e in entities
            ):
                raise InvalidInput("redact_entities must be a list of entity names such as EMAIL")
            changes["redact_entities"] = tuple(sorted(set(entities)))
        _check_routing(changes)
        if changes.get("routing") in ("shadow", "student"):
            self._check_routing_ready(tenant, namespace, changes)
        key = (namespace_settings.c.tenant == tenant, namespace_settings.c.namespace == namespace)
        with self.engine.begin() as conn:
            row = conn.execute(select(namespace_settings).where(*key)).first()
            before = self._settings_of(row)
            after = {
                "retention_days": before.retention_days,
                "implicit_signals": before.implicit_signals,
                "distill_ready": before.distill_ready,
                "redact_entities": before.redact_entities,
                "routing": before.routing,
                **{name: getattr(before, name) for name in _ROUTING_KNOBS},
                "image_bytes_limit": before.image_bytes_limit,
                **changes,
            }
            stored = {
                "retention_days": after["retention_days"],
                "implicit_signals": after["implicit_signals"],
                "distill_ready": after["distill_ready"],
                "redact_entities": None if after["redact_entities"] is None else ",".join(after["redact_entities"]),
                "routing": after["routing"],
                **{name: after[name] for name in _ROUTING_KNOBS},
                "image_bytes_limit": after["image_bytes_limit"],
                "updated_at": self._now(),
            }
            if row is None:
                conn.execute(insert(namespace_settings).values(tenant=tenant, namespace=namespace, **stored))
            else:
                conn.execute(update(namespace_settings).where(*key).values(**stored))
            if after["implicit_signals"] and not before.implicit_signals:
                self._backfill_retry_digests(conn, tenant, namespace)
            for name in _SWITCH_NAMES:
                old, new = getattr(before, name), after[name]
                if old != new:
                    detail = {
                        "from": list(old) if isinstance(old, tuple) else old,
                        "to": list(new) if isinstance(new, tuple) else new,
                    }
                    self._audit(conn, tenant, namespace, f"switch.{name}", detail, actor)
        return NamespaceSettings(**after)

    def _check_routing_ready(self, tenant: str, namespace: str, changes: dict[str, Any]) -> None:
        """Refuse `shadow` without a deployed adapter, and `student` until the routing status is ready (judged
        with the target and minimum this same change sets, if it sets them)."""
        status = self.routing_status(  # type: ignore[attr-defined]
            tenant, namespace, target=changes.get("routing_target"), shadow_min=changes.get("shadow_min"))
        if status.adapter_cid is None or (changes["routing"] == "student" and not status.ready):
            raise InvalidInput(f"routing {changes['routing']} refused: {status.missing}")
