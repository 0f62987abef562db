"""`kolm tenant create|key|keys`: tenants and their kolm keys. A key is shown once, when issued; afterwards
only its public id (the first 8 hex digits of its hash) is listed, audited and used to revoke it."""

from __future__ import annotations

import argparse
from typing import Any

from kolm_pipeline.cli_verbs.common import (
    CliError,
    default_actor,
    open_store,
    open_store_for_reading,
    print_json,
    settings_for_reading,
    settings_for_writing,
    table,
)

_SHOWN_ONCE = "kolm key (shown once, store it now)"


def _when(value) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def cmd_tenant_create(args: argparse.Namespace) -> int:
    from kolm_pipeline.provenance.keys import ensure_tenant_keys

    settings = settings_for_writing(args)
    store = open_store(settings)
    key = store.create_tenant(args.name, capture_only=args.capture_only, actor=args.actor)
    signing = ensure_tenant_keys(settings.keys_dir, args.name)
    key_id = store.tenant_for_key(key).key_id
    if args.json:
        print_json({"tenant": args.name, "key_id": key_id, "kind": _kind(args.capture_only), "key": key,
                    "signing_key": signing, "keys_dir": str(settings.keys_dir)})
        return 0
    print(f"tenant {args.name} created; signing key {signing} in {settings.keys_dir}")
    print(f"{_SHOWN_ONCE}: {key}")
    print(f"key id {key_id} ({_kind(args.capture_only)}); list keys with `kolm tenant keys {args.name}`")
    return 0


def _kind(capture_only: bool) -> str:
    return "capture-only" if capture_only else "full"


def cmd_tenant_key(args: argparse.Namespace) -> int:
    """Issue one more key for an existing tenant, or revoke one by its id."""
    store = open_store(settings_for_writing(args))
    if args.revoke:
        if args.capture_only:
            raise CliError("--capture-only is for issuing a key; --revoke takes only the key id")
        revoked = store.revoke_key(args.name, args.revoke, actor=args.actor)
        if args.json:
            print_json(_key_json(revoked))
            return 0
        print(f"key {revoked.key_id} of tenant {args.name} revoked; the capture proxy and `kolm serve` refuse it "
              "once their key cache forgets it (KOLM_CAPTURE_KEY_CACHE_TTL_S, 30 s by default)")
        return 0
    issued = store.issue_key(args.name, capture_only=args.capture_only, actor=args.actor)
    if args.json:
        print_json({"tenant": issued.tenant, "key_id": issued.key_id, "kind": _kind(issued.capture_only),
                    "key": issued.key})
        return 0
    can = "it records traffic, and cannot read the inbox" if issued.capture_only else "capture, inbox and serving"
    print(f"key {issued.key_id} issued for tenant {issued.tenant} ({_kind(issued.capture_only)}: {can})")
    print(f"{_SHOWN_ONCE}: {issued.key}")
    return 0


def _key_json(key) -> dict[str, Any]:
    return {"key_id": key.key_id, "tenant": key.tenant, "kind": key.kind, "created_at": key.created_at,
            "created_by": key.created_by, "revoked_at": key.revoked_at, "revoked_by": key.revoked_by}


def cmd_tenant_keys(args: argparse.Namespace) -> int:
    """List a tenant's keys by id: kind, when and by whom issued and revoked. Never the keys themselves."""
    keys = open_store_for_reading(settings_for_reading(args)).tenant_keys(args.name)
    if args.json:
        print_json([_key_json(key) for key in keys])
        return 0
    rows = [(key.key_id, key.kind, _when(key.created_at), key.created_by,
             "-" if key.revoked_at is None else f"{_when(key.revoked_at)} by {key.revoked_by}") for key in keys]
    print(table(["key id", "kind", "created (UTC)", "by", "revoked (UTC)"], rows))
    return 0


def add_tenant_parsers(tenant_verbs: argparse._SubParsersAction) -> None:
    create = tenant_verbs.add_parser("create", help="create a tenant, its first kolm key and its signing key",
                                     description="Create a tenant, its first kolm key (printed once) and its "
                                     "Ed25519 signing key.")
    create.set_defaults(handler=cmd_tenant_create)
    create.add_argument("name")
    create.add_argument("--capture-only", action="store_true", help="the key can capture but not read the inbox")
    create.add_argument("--actor", default=default_actor(), help="who, for the audit log")
    create.add_argument("--json", action="store_true", help="print the tenant, key id and key as JSON")

    key = tenant_verbs.add_parser(
        "key", help="issue another kolm key for a tenant, or revoke one (--revoke KEYID)",
        description="Issue another kolm key for an existing tenant (printed once; only its hash is stored), "
        "or revoke one by the id `kolm tenant keys NAME` lists. Both are written to the audit log. A revoked key "
        "stops working at the capture proxy and `kolm serve` within their key cache TTL.")
    key.set_defaults(handler=cmd_tenant_key)
    key.add_argument("name", help="the tenant")
    key.add_argument("--capture-only", action="store_true",
                     help="the new key can capture but not read or triage in the inbox")
    key.add_argument("--revoke", metavar="KEYID", help="revoke this key instead of issuing one")
    key.add_argument("--actor", default=default_actor(), help="who, for the audit log")
    key.add_argument("--json", action="store_true", help="print the result as JSON")

    keys = tenant_verbs.add_parser("keys", help="list a tenant's keys: id, kind, created, revoked (never the key)",
                                   description="List a tenant's kolm keys by their public id: kind (full or "
                                   "capture-only), when and by whom each was issued and revoked. Never the keys.")
    keys.set_defaults(handler=cmd_tenant_keys)
    keys.add_argument("name", help="the tenant")
    keys.add_argument("--json", action="store_true", help="print the keys as JSON")
