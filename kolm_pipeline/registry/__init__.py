"""The registry: content IDs, tenant keys, signed receipts, the ``.kolm`` archive and per-task swaps."""

from kolm_pipeline.provenance.cid import cid_for_bytes, cid_for_file, sha256_of_cid
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.keys import (
    create_tenant_keys,
    ensure_tenant_keys,
    keyid_for,
    load_private_key,
    load_public_keys,
)
from kolm_pipeline.provenance.receipts import (
    ChainReport,
    make_receipt,
    read_statement,
    receipt_cid,
    verify_chain,
)
from kolm_pipeline.registry.artifact import (
    KolmArtifact,
    VerifyReport,
    build_kolm,
    extract_adapter,
    read_kolm,
    verify_kolm,
)
from kolm_pipeline.registry.swap import publish_artifact, read_pointer, swap_pointer

__all__ = [
    "ChainReport",
    "KolmArtifact",
    "RegistryError",
    "VerifyReport",
    "build_kolm",
    "cid_for_bytes",
    "cid_for_file",
    "create_tenant_keys",
    "ensure_tenant_keys",
    "extract_adapter",
    "keyid_for",
    "load_private_key",
    "load_public_keys",
    "make_receipt",
    "publish_artifact",
    "read_kolm",
    "read_pointer",
    "read_statement",
    "receipt_cid",
    "sha256_of_cid",
    "swap_pointer",
    "verify_chain",
    "verify_kolm",
]
