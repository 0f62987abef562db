"""Names of tenants and namespaces, and the Dagster partition key built from them.

Both names are slugs without dots, so `tenant.namespace` splits back unambiguously and is already a
valid partition key (`[a-z0-9_.-]`).
"""

from __future__ import annotations

import re

from kolm_pipeline.provenance.errors import InvalidInput

NAMESPACE_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_SLUG = re.compile(NAMESPACE_RE)


def _validate_slug(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise InvalidInput(
            f"invalid {what} {value!r}: use 1-63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_namespace(ns: object) -> str:
    """Return `ns` unchanged if it is a valid namespace slug, else raise ValueError."""
    return _validate_slug(ns, "namespace")


def validate_tenant(name: object) -> str:
    """Tenant names follow the namespace rule so that partition keys stay splittable."""
    return _validate_slug(name, "tenant name")


def partition_key(tenant: str, namespace: str) -> str:
    """The Dagster partition key of one tenant's namespace."""
    return f"{validate_tenant(tenant)}.{validate_namespace(namespace)}"


def split_partition_key(key: str) -> tuple[str, str]:
    """Inverse of `partition_key`."""
    if not isinstance(key, str) or key.count(".") != 1:
        raise InvalidInput(f"invalid partition key {key!r}: expected 'tenant.namespace'")
    tenant, namespace = key.split(".")
    return validate_tenant(tenant), validate_namespace(namespace)
