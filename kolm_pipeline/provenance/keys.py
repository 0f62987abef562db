"""Ed25519 tenant keys: one signing key per tenant, public halves collected for offline verification."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kolm_pipeline.provenance.atomic import write_atomic, write_new
from kolm_pipeline.provenance.errors import RegistryError

_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_KEYID_PREFIX = "ed25519:"


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a safe file-name stem; tenant names become key file names."""
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise RegistryError(f"invalid tenant name {tenant!r}: must match {_TENANT_RE.pattern}")
    return tenant


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid_for(public_key: Ed25519PublicKey | bytes) -> str:
    """``ed25519:`` + the first 16 hex chars of sha256(raw public key): short, stable, key-derived."""
    raw = public_key if isinstance(public_key, bytes) else _raw_public(public_key)
    if len(raw) != 32:
        raise RegistryError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return _KEYID_PREFIX + hashlib.sha256(raw).hexdigest()[:16]


def _key_paths(keys_dir: Path, tenant: str) -> tuple[Path, Path]:
    validate_tenant(tenant)
    return keys_dir / f"{tenant}.key", keys_dir / f"{tenant}.pub"


def _public_text(public_key: Ed25519PublicKey) -> bytes:
    return base64.b64encode(_raw_public(public_key)) + b"\n"


def create_tenant_keys(keys_dir: Path, tenant: str) -> str:
    """Generate a tenant's key pair; refuses to replace an existing key, which would orphan its receipts."""
    key_path, pub_path = _key_paths(keys_dir, tenant)
    for path in (key_path, pub_path):
        if path.exists():
            raise RegistryError(f"{path} already exists; refusing to overwrite tenant {tenant!r} keys")
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_new(key_path, pem, mode=0o600)
    write_new(pub_path, _public_text(private_key.public_key()), mode=0o644)
    return keyid_for(private_key.public_key())


def ensure_tenant_keys(keys_dir: Path, tenant: str) -> str:
    """Create the tenant's keys unless a private key exists; restore a missing public half. Returns keyid."""
    key_path, pub_path = _key_paths(keys_dir, tenant)
    if not key_path.exists():
        return create_tenant_keys(keys_dir, tenant)
    public_key = load_private_key(keys_dir, tenant).public_key()
    if not pub_path.exists():
        write_atomic(pub_path, _public_text(public_key), mode=0o644)
    return keyid_for(public_key)


def load_private_key(keys_dir: Path, tenant: str) -> Ed25519PrivateKey:
    """The tenant's signing key."""
    key_path, _ = _key_paths(keys_dir, tenant)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RegistryError(f"no key for tenant {tenant!r} at {key_path}") from None
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"{key_path} is not a readable unencrypted PKCS8 key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise RegistryError(f"{key_path} is not an Ed25519 key")
    return key


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    """Read one ``.pub`` file (base64 of the 32 raw public bytes)."""
    try:
        raw = base64.b64decode(path.read_bytes().strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise RegistryError(f"{path} is not a base64 Ed25519 public key: {exc}") from exc


@dataclass(frozen=True)
class TenantKey:
    """A public key and the tenant it belongs to (its file is ``<tenant>.pub``). A receipt counts only when
    signed by a key of the tenant it is about: another tenant's key never satisfies a chain."""

    tenant: str
    key: Ed25519PublicKey

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raises ``InvalidSignature`` unless ``signature`` is this key's over ``message``."""
        self.key.verify(signature, message)


def public_key_text(keys_dir: Path, tenant: str) -> tuple[str, str]:
    """(keyid, base64 public key) of the tenant's key in ``keys_dir``: what a deployment publishes to the store."""
    _, pub_path = _key_paths(keys_dir, tenant)
    key = load_public_key_file(pub_path) if pub_path.is_file() else load_private_key(keys_dir, tenant).public_key()
    return keyid_for(key), _public_text(key).decode("ascii").strip()


def tenant_key_from_text(tenant: str, text: str) -> tuple[str, TenantKey]:
    """(keyid, key) from a published base64 public key; RegistryError when it is not one."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise RegistryError(f"the published key of tenant {tenant!r} is not a base64 Ed25519 public key") from exc
    return keyid_for(key), TenantKey(validate_tenant(tenant), key)


def load_public_keys(keys_dir: Path) -> dict[str, TenantKey]:
    """Every public key in ``keys_dir`` by keyid, with its tenant: all that offline verification needs."""
    if not keys_dir.is_dir():
        return {}
    keys: dict[str, TenantKey] = {}
    for path in sorted(keys_dir.glob("*.pub")):
        public_key = load_public_key_file(path)
        keys[keyid_for(public_key)] = TenantKey(validate_tenant(path.stem), public_key)
    return keys
