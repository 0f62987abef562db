"""Tenants and their keys (only a sha256 of each kolm key is kept; the plaintext is shown once, when it is
issued), and the HMAC digests taken under a tenant's secret."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import StoreBase, _utc, _utc_or_none, canonical_messages
from kolm_pipeline.store.namespaces import validate_tenant
from kolm_pipeline.store.records import IssuedKey, Tenant, TenantKey
from kolm_pipeline.store.tables import tenant_keys, tenants

KEY_PREFIX = "kolm_"
_KEY_PREFIX_LEN = len(KEY_PREFIX) + 8
KEY_ID_LENGTH = 8
_KEY_ID = re.compile(r"^[0-9a-f]{8,16}$")


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_key() -> tuple[str, str]:
    """A fresh kolm key and its sha256."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, _hash_key(key)


def _tenant_key(row: Any) -> TenantKey:
    return TenantKey(row.key_id, row.tenant, bool(row.capture_only), row.created_by, _utc(row.created_at),
                     row.revoked_by, _utc_or_none(row.revoked_at))


class TenantQueries(StoreBase):
    """Creating tenants, issuing, listing, revoking and checking their keys, digesting under their secret.

    A tenant may hold several keys (one per application, say); each is listed by a public id (the first 8 hex
    digits of its hash) and revoked alone. Every issue and revocation is written to the audit log."""

    def create_tenant(self, name: str, capture_only: bool = False, actor: str = "store") -> str:
        """Create a tenant and return its kolm key; this is the only time the key is visible."""
        validate_tenant(name)
        key, key_hash = _new_key()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(tenants).values(
                        name=name,
                        key_hash=key_hash,
                        key_prefix=key[:_KEY_PREFIX_LEN],
                        capture_only=capture_only,
                        created_at=self._now(),
                    )
                )
                key_id = self._insert_key(conn, name, key, key_hash, capture_only, actor)
                self._audit(conn, name, None, "tenant.create", {"capture_only": capture_only, "key_id": key_id}, actor)
        except IntegrityError as exc:
            raise InvalidInput(f"tenant {name!r} already exists") from exc
        return key

    def issue_key(self, name: str, capture_only: bool = False, actor: str = "store") -> IssuedKey:
        """Issue one more kolm key for the existing tenant `name`; its earlier keys keep working."""
        validate_tenant(name)
        with self.engine.begin() as conn:
            self._require_tenant(conn, name)
            key, key_hash = _new_key()
            key_id = self._insert_key(conn, name, key, key_hash, capture_only, actor)
            self._audit(conn, name, None, "key.issue", {"key_id": key_id, "capture_only": capture_only}, actor)
        return IssuedKey(key, key_id, name, capture_only)

    def revoke_key(self, name: str, key_id: str, actor: str) -> TenantKey:
        """Revoke one of the tenant's keys by its id; the proxy and `kolm serve` stop taking it once their key
        cache forgets it (`KOLM_CAPTURE_KEY_CACHE_TTL_S`, 30 s by default)."""
        validate_tenant(name)
        wanted = key_id.strip().lower() if isinstance(key_id, str) else ""
        if not _KEY_ID.fullmatch(wanted):
            raise InvalidInput(f"invalid key id {key_id!r}: 8 hex digits, as `kolm tenant keys {name}` lists them")
        with self.engine.begin() as conn:
            self._require_tenant(conn, name)
            row = conn.execute(
                select(tenant_keys).where(tenant_keys.c.tenant == name, tenant_keys.c.key_id == wanted)
            ).first()
            if row is None:
                raise InvalidInput(f"tenant {name!r} has no key {wanted}; `kolm tenant keys {name}` lists its keys")
            if row.revoked_at is not None:
                raise InvalidInput(f"key {wanted} of tenant {name!r} was revoked already, "
                                   f"at {_utc(row.revoked_at):%Y-%m-%d %H:%M:%S} UTC by {row.revoked_by}")
            conn.execute(
                update(tenant_keys)
                .where(tenant_keys.c.key_id == wanted, tenant_keys.c.revoked_at.is_(None))
                .values(revoked_at=self._now(), revoked_by=actor)
            )
            self._audit(conn, name, None, "key.revoke", {"key_id": wanted}, actor)
            row = conn.execute(select(tenant_keys).where(tenant_keys.c.key_id == wanted)).one()
        return _tenant_key(row)

    def tenant_keys(self, name: str) -> list[TenantKey]:
        """Every key the tenant was issued, oldest first, revoked ones included."""
        validate_tenant(name)
        with self.engine.connect() as conn:
            self._require_tenant(conn, name)
            rows = conn.execute(
                select(tenant_keys)
                .where(tenant_keys.c.tenant == name)
                .order_by(tenant_keys.c.created_at, tenant_keys.c.key_id)
            ).all()
        return [_tenant_key(row) for row in rows]

    def create_tenant_key(self, name: str, capture_only: bool = False, actor: str = "store") -> str:
        """Issue a fresh key for `name` as `actor`, creating the tenant if needed; the keys `actor` issued it
        before are revoked (keys others issued keep working).

        Lets a rerunnable tool (the demo) obtain a usable key without ever having stored one, and without
        leaving one more live key behind on every run."""
        validate_tenant(name)
        try:
            return self.create_tenant(name, capture_only, actor)
        except ValueError:
            pass
        key, key_hash = _new_key()
        with self.engine.begin() as conn:
            revoked = conn.execute(
                update(tenant_keys)
                .where(tenant_keys.c.tenant == name, tenant_keys.c.created_by == actor,
                       tenant_keys.c.revoked_at.is_(None))
                .values(revoked_at=self._now(), revoked_by=actor)
                .returning(tenant_keys.c.key_id)
            ).scalars().all()
            key_id = self._insert_key(conn, name, key, key_hash, capture_only, actor)
            detail = {"key_id": key_id, "capture_only": capture_only, "revoked": sorted(revoked)}
            self._audit(conn, name, None, "tenant.rotate_key", detail, actor)
        return key

    def tenant_for_key(self, key: str) -> Tenant | None:
        """The tenant owning `key` (unless the key was revoked), or None; hashes are compared in constant time."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) <= _KEY_PREFIX_LEN:
            return None
        digest = _hash_key(key)
        stmt = (
            select(tenant_keys, tenants.c.created_at.label("tenant_created_at"))
            .join(tenants, tenants.c.name == tenant_keys.c.tenant)
            .where(tenant_keys.c.key_prefix == key[:_KEY_PREFIX_LEN], tenant_keys.c.revoked_at.is_(None))
        )
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        for row in rows:
            if hmac.compare_digest(row.key_hash, digest):
                return Tenant(row.tenant, row.key_prefix, bool(row.capture_only), _utc(row.tenant_created_at),
                              row.key_id)
        return None

    def _require_tenant(self, conn: Any, name: str) -> None:
        if conn.execute(select(tenants.c.name).where(tenants.c.name == name)).first() is None:
            raise InvalidInput(f"no tenant {name!r}; create it first with `kolm tenant create {name}`")

    def _insert_key(self, conn: Any, name: str, key: str, key_hash: str, capture_only: bool, actor: str) -> str:
        """Store a key's hash under the shortest free id (8 hex digits unless two keys' hashes share them)."""
        taken = set(
            conn.execute(
                select(tenant_keys.c.key_id).where(tenant_keys.c.key_id.startswith(key_hash[:KEY_ID_LENGTH]))
            ).scalars()
        )
        length = KEY_ID_LENGTH
        while key_hash[:length] in taken:
            length += 2
        conn.execute(
            insert(tenant_keys).values(
                key_id=key_hash[:length],
                tenant=name,
                key_hash=key_hash,
                key_prefix=key[:_KEY_PREFIX_LEN],
                capture_only=capture_only,
                created_by=actor,
                created_at=self._now(),
            )
        )
        return key_hash[:length]

    def input_digest(self, tenant: str, messages: list[dict[str, Any]]) -> str:
        """HMAC-SHA256 of a conversation's canonical text under the tenant's secret."""
        with self.engine.begin() as conn:
            return self._secret(conn, tenant).hexdigest(canonical_messages(messages))

    def keyed_digests(self, tenant: str, texts: Iterable[str]) -> list[str]:
        """HMAC-SHA256 of each exact text under the tenant's secret: stable ids derived from content that
        cannot be checked against a guessed text without the secret."""
        with self.engine.begin() as conn:
            secret = self._secret(conn, tenant)
        return [secret.hexdigest(text) for text in texts]
