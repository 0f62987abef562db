"""The deployment receipt: the last link of the chain, signed when an artifact is put into service.

It cannot live inside the ``.kolm`` (it names the archive's own CID), so it is stored next to the
published artifact as ``<cid>.kolm.deployment.dsse.json`` and copied into the registry row. It names
the archive's final (``artifact``) receipt as its previous link, so ``kolm verify`` checks corpus →
recipe → adapter → evaluation → artifact → deployment as one chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kolm_pipeline.provenance.atomic import write_atomic
from kolm_pipeline.provenance.errors import RegistryError
from kolm_pipeline.provenance.keys import TenantKey
from kolm_pipeline.provenance.receipts import ChainReport, make_receipt, read_statement, receipt_cid, verify_chain
from kolm_pipeline.registry.artifact import KolmArtifact

DEPLOYMENT_STAGE = "deployment"
SUFFIX = ".deployment.dsse.json"


def receipt_path(artifact_path: Path) -> Path:
    """Where the deployment receipt of a published artifact lives."""
    return artifact_path.with_name(artifact_path.name + SUFFIX)


def make_deployment_receipt(
    artifact: KolmArtifact,
    artifact_cid: str,
    *,
    decision: str,
    from_cid: str | None,
    k_before: float | None,
    k_after: float | None,
    actor: str,
    signer: tuple[Ed25519PrivateKey, str],
) -> bytes:
    """Sign "``artifact_cid`` now serves its task, replacing ``from_cid``", chained to the archive's receipts."""
    if not artifact.receipts:
        raise RegistryError("the artifact holds no receipts to chain the deployment to")
    task = artifact.manifest.get("task")
    private_key, keyid = signer
    return make_receipt(
        stage=DEPLOYMENT_STAGE,
        subject_name=f"{task}/{artifact_cid}.kolm",
        subject_cid=artifact_cid,
        predicate={
            "task": task,
            "decision": decision,
            "from_cid": from_cid,
            "k_before": k_before,
            "k_after": k_after,
            "actor": actor,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        previous_cid=receipt_cid(artifact.receipts[-1]),
        private_key=private_key,
        keyid=keyid,
    )


def write_deployment_receipt(artifact_path: Path, envelope: bytes) -> Path:
    path = receipt_path(artifact_path)
    write_atomic(path, envelope)
    return path


def verify_deployment(
    artifact: KolmArtifact, artifact_cid: str, envelope: bytes, public_keys: Mapping[str, TenantKey]
) -> tuple[ChainReport, list[str]]:
    """Check the deployment receipt as the chain's next link, signed by the artifact's tenant, and that it names
    this very archive."""
    chain = verify_chain([*artifact.receipts, envelope], public_keys, tenant=artifact.manifest.get("tenant") or "")
    problems = [] if chain.ok else [f"receipt chain broken: {chain.reason}"]
    try:
        statement = read_statement(envelope)
        stage = statement["predicate"]["stage"]
        named = statement["subject"][0]["annotations"]["cid"]
    except (RegistryError, KeyError, IndexError, TypeError) as exc:
        return chain, [*problems, f"deployment receipt is unreadable ({exc})"]
    if stage != DEPLOYMENT_STAGE:
        problems.append(f"deployment receipt stage is {stage!r}, expected {DEPLOYMENT_STAGE!r}")
    if named != artifact_cid:
        problems.append(f"deployment receipt names artifact {named}, not this one ({artifact_cid})")
    return chain, problems



def sibling_receipt(artifact_path: Path) -> bytes | None:
    """The deployment receipt stored beside an artifact (following a pointer symlink), if any."""
    path = receipt_path(Path(artifact_path).resolve())
    return path.read_bytes() if path.is_file() else None
