"""Tenants and their keys (only a sha256 of each kolm key is kept; the plaintext is shown once, at
creation), and the HMAC digests taken under a tenant's secret."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store.base import StoreBase, _utc, canonical_messages
from kolm_pipeline.store.namespaces import validate_tenant
from kolm_pipeline.store.records import Tenant
from kolm_pipeline.store.tables import tenants

KEY_PREFIX = "kolm_"
_KEY_PREFIX_LEN = len(KEY_PREFIX) + 8


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class TenantQueries(StoreBase):
    """Creating tenants, issuing and checking their keys, digesting under their secret."""

    def create_tenant(self, name: str, capture_only: bool = False) -> str:
        """Create a tenant and return its kolm key; this is the only time the key is visible."""
        validate_tenant(name)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(tenants).values(
                        name=name,
                        key_hash=_hash_key(key),
                        key_prefix=key[:_KEY_PREFIX_LEN],
                        capture_only=capture_only,
                        created_at=self._now(),
                    )
                )
                self._audit(conn, name, None, "tenant.create", {"capture_only": capture_only}, "store")
        except IntegrityError as exc:
            raise InvalidInput(f"tenant {name!r} already exists") from exc
        return key

    def create_tenant_key(self, name: str, capture_only: bool = False) -> str:
        """Issue a fresh key for `name`, creating the tenant if needed; any earlier key stops working.

        Lets a rerunnable tool (the demo) obtain a usable key without ever having stored one."""
        validate_tenant(name)
        try:
            return self.create_tenant(name, capture_only)
        except ValueError:
            pass
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                update(tenants)
                .where(tenants.c.name == name)
                .values(key_hash=_hash_key(key), key_prefix=key[:_KEY_PREFIX_LEN], capture_only=capture_only)
            )
            self._audit(conn, name, None, "tenant.rotate_key", {"capture_only": capture_only}, "store")
        return key

    def tenant_for_key(self, key: str) -> Tenant | None:
        """The tenant owning `key`, or None; hashes are compared in constant time."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX) or len(key) <= _KEY_PREFIX_LEN:
            return None
        digest = _hash_key(key)
        with self.engine.connect() as conn:
            rows = conn.execute(select(tenants).where(tenants.c.key_prefix == key[:_KEY_PREFIX_LEN])).all()
        for row in rows:
            if hmac.compare_digest(row.key_hash, digest):
                return Tenant(row.name, row.key_prefix, bool(row.capture_only), _utc(row.created_at))
        return None

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
