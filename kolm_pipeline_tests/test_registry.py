"""Registry behaviour: CIDs, tenant keys, receipt chains, the .kolm archive, and pointer swaps."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file, save_file

from kolm_pipeline.registry import (
    RegistryError,
    build_kolm,
    cid_for_bytes,
    cid_for_file,
    create_tenant_keys,
    ensure_tenant_keys,
    extract_adapter,
    keyid_for,
    load_private_key,
    load_public_keys,
    make_receipt,
    publish_artifact,
    read_kolm,
    read_pointer,
    read_statement,
    receipt_cid,
    sha256_of_cid,
    swap_pointer,
    verify_chain,
    verify_kolm,
)
from kolm_pipeline.registry.artifact import adapter_file_cids

EMPTY_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
HELLO_WORLD_CID = "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e"
STAGES = ["corpus", "recipe", "adapter", "evaluation"]


def _independent_cid(data: bytes) -> str:
    """A second CID derivation straight from the spec: multibase 'b' + base32(0x01 0x55 0x12 0x20 digest)."""
    raw = bytes.fromhex("01551220") + hashlib.sha256(data).digest()
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def _chain(key: Ed25519PrivateKey, keyid: str, stages: list[str], salt: str = "",
           adapter_dir: Path | None = None) -> list[bytes]:
    """A signed chain; with `adapter_dir`, the adapter receipt names its files as the adapter stage's does."""
    receipts: list[bytes] = []
    for stage in stages:
        files = {"files": adapter_file_cids(adapter_dir)} if stage == "adapter" and adapter_dir else {}
        receipts.append(
            make_receipt(
                stage=stage,
                subject_name=f"{stage}.out",
                subject_cid=cid_for_bytes(f"{salt}{stage} output".encode()),
                predicate={"note": stage, **files},
                previous_cid=receipt_cid(receipts[-1]) if receipts else None,
                private_key=key,
                keyid=keyid,
            )
        )
    return receipts


def _envelope(envelope: bytes) -> dict:
    return json.loads(envelope)


def _canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    """Repack members with the archive's deterministic settings, to forge well-formed but wrong archives."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(files[name]), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def signer(keys_dir: Path) -> tuple[Ed25519PrivateKey, str]:
    keyid = create_tenant_keys(keys_dir, "acme")
    return load_private_key(keys_dir, "acme"), keyid


@pytest.fixture
def chain(signer: tuple[Ed25519PrivateKey, str], adapter_dir: Path) -> list[bytes]:
    return _chain(*signer, STAGES, adapter_dir=adapter_dir)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "adapter"
    path.mkdir()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-base",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.random.default_rng(0).standard_normal((2, 8), np.float32),
        f"{prefix}.lora_B.weight": np.zeros((8, 2), np.float32),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "README.md").write_text("tiny adapter\n")
    return path


MANIFEST = {
    "task": "tickets",
    "tenant": "acme",
    "namespace": "acme.support",
    "base_model": {"id": "tiny-base", "digest": "sha256:" + "0" * 64},
    "lora": {"r": 2, "alpha": 4},
    "corpus_cid": EMPTY_CID,
    "recipe_cid": HELLO_WORLD_CID,
    "trainer_version": "test",
    "evals": {"k": 0.9},
    "counters": {"captured": 10, "kept": 8, "discarded": 1, "pending": 1},
    "parent_cid": None,
}


@pytest.fixture
def kolm(tmp_path: Path, adapter_dir: Path, chain: list[bytes], signer) -> Path:
    output = tmp_path / "out" / "tickets.kolm"
    output.parent.mkdir()
    build_kolm(output, manifest=MANIFEST, adapter_dir=adapter_dir, evals={"k": 0.9}, receipts=chain,
               signer=signer)
    return output


# --- CIDs -------------------------------------------------------------------------------------------------


def test_cid_known_vectors() -> None:
    assert cid_for_bytes(b"") == EMPTY_CID
    assert cid_for_bytes(b"hello world") == HELLO_WORLD_CID
    assert cid_for_bytes(b"hello world\n") == _independent_cid(b"hello world\n")
    assert cid_for_bytes(b"hello world\n").startswith("bafkrei")


def test_cid_for_file_streams_to_the_same_cid(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert cid_for_file(path) == cid_for_bytes(data) == _independent_cid(data)


def test_sha256_of_cid_round_trips() -> None:
    assert sha256_of_cid(cid_for_bytes(b"abc")) == hashlib.sha256(b"abc").hexdigest()


def _noncanonical_tail(cid: str) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return cid[:-1] + alphabet[alphabet.index(cid[-1]) ^ 1]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        EMPTY_CID[:-1],
        EMPTY_CID.upper(),
        "B" + EMPTY_CID[1:],
        "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
        "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        _noncanonical_tail(EMPTY_CID),
    ],
)
def test_sha256_of_cid_rejects_malformed(bad: str) -> None:
    with pytest.raises(RegistryError):
        sha256_of_cid(bad)


# --- keys -------------------------------------------------------------------------------------------------


def test_create_tenant_keys_writes_private_0600_and_raw_public(keys_dir: Path) -> None:
    keyid = create_tenant_keys(keys_dir, "acme")
    key_file, pub_file = keys_dir / "acme.key", keys_dir / "acme.pub"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    raw = base64.b64decode(pub_file.read_text().strip(), validate=True)
    assert len(raw) == 32
    assert keyid == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert keyid == keyid_for(load_private_key(keys_dir, "acme").public_key()) == keyid_for(raw)
    assert list(load_public_keys(keys_dir)) == [keyid]
    assert sorted(p.name for p in keys_dir.iterdir()) == ["acme.key", "acme.pub"]


def test_create_tenant_keys_refuses_to_overwrite(keys_dir: Path) -> None:
    create_tenant_keys(keys_dir, "acme")
    before = (keys_dir / "acme.key").read_bytes()
    with pytest.raises(RegistryError, match="refusing to overwrite"):
        create_tenant_keys(keys_dir, "acme")
    assert (keys_dir / "acme.key").read_bytes() == before


def test_ensure_tenant_keys_is_idempotent_and_restores_public_half(keys_dir: Path) -> None:
    keyid = ensure_tenant_keys(keys_dir, "acme")
    assert ensure_tenant_keys(keys_dir, "acme") == keyid
    (keys_dir / "acme.pub").unlink()
    assert ensure_tenant_keys(keys_dir, "acme") == keyid
    assert list(load_public_keys(keys_dir)) == [keyid]
    other = ensure_tenant_keys(keys_dir, "beta")
    assert set(load_public_keys(keys_dir)) == {keyid, other}


@pytest.mark.parametrize("tenant", ["", "Acme", "-acme", "../acme", "a/b", "a" * 64, "acme.x"])
def test_tenant_names_are_validated(keys_dir: Path, tenant: str) -> None:
    with pytest.raises(RegistryError, match="invalid tenant"):
        create_tenant_keys(keys_dir, tenant)


def test_load_private_key_missing_is_registry_error(keys_dir: Path) -> None:
    with pytest.raises(RegistryError, match="no key"):
        load_private_key(keys_dir, "nobody")


# --- receipts ---------------------------------------------------------------------------------------------


def test_receipt_is_canonical_dsse_over_an_in_toto_statement(signer, chain: list[bytes]) -> None:
    key, keyid = signer
    envelope = _envelope(chain[1])
    assert _canonical(envelope) == chain[1]
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"][0]["keyid"] == keyid
    body = base64.b64decode(envelope["payload"])
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d %s" % (len(body), body)
    key.public_key().verify(base64.b64decode(envelope["signatures"][0]["sig"]), pae)

    statement = read_statement(chain[1])
    subject_cid = cid_for_bytes(b"recipe output")
    assert statement == {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [
            {
                "name": "recipe.out",
                "digest": {"sha256": sha256_of_cid(subject_cid)},
                "annotations": {"cid": subject_cid},
            }
        ],
        "predicateType": "https://kolm.dev/receipt/v1",
        "predicate": {"stage": "recipe", "previous_receipt": receipt_cid(chain[0]), "note": "recipe"},
    }
    assert receipt_cid(chain[0]) == cid_for_bytes(chain[0])


def test_make_receipt_rejects_reserved_predicate_keys(signer) -> None:
    with pytest.raises(RegistryError, match="previous_receipt"):
        make_receipt(stage="corpus", subject_name="x", subject_cid=EMPTY_CID,
                     predicate={"previous_receipt": None}, previous_cid=None, private_key=signer[0],
                     keyid=signer[1])


def test_four_receipt_chain_verifies(keys_dir: Path, chain: list[bytes]) -> None:
    report = verify_chain(chain, load_public_keys(keys_dir))
    assert report.ok
    assert report.links == STAGES
    assert report.first_broken is None and report.reason is None


def _flip_payload(envelope: bytes) -> bytes:
    parsed = _envelope(envelope)
    body = bytearray(base64.b64decode(parsed["payload"]))
    body[body.index(b'"note"') + 9] ^= 0x01
    parsed["payload"] = base64.b64encode(bytes(body)).decode()
    return _canonical(parsed)


def _flip_sig_byte(envelope: bytes) -> bytes:
    parsed = _envelope(envelope)
    sig = bytearray(base64.b64decode(parsed["signatures"][0]["sig"]))
    sig[10] ^= 0x80
    parsed["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return _canonical(parsed)


def _flip_raw_byte(envelope: bytes) -> bytes:
    data = bytearray(envelope)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def _tamper_cases(signer, chain: list[bytes]) -> dict[str, tuple[list[bytes], int, str]]:
    """name -> (tampered chain, index of first broken link, text its reason must contain)."""
    key, keyid = signer
    intruder = Ed25519PrivateKey.generate()
    other_chain = _chain(key, keyid, STAGES, salt="other ")
    resigned = _chain(intruder, keyid, STAGES)
    unknown = _chain(intruder, keyid_for(intruder.public_key()), STAGES)
    return {
        "payload byte flipped": ([*chain[:2], _flip_payload(chain[2]), chain[3]], 2, "does not verify"),
        "signature byte flipped": ([chain[0], _flip_sig_byte(chain[1]), *chain[2:]], 1, "does not verify"),
        "raw envelope byte flipped": ([*chain[:3], _flip_raw_byte(chain[3])], 3, ""),
        "order swapped": ([chain[1], chain[0], *chain[2:]], 0, "previous_receipt"),
        "middle swapped": ([chain[0], chain[2], chain[1], chain[3]], 1, "previous_receipt"),
        "receipt deleted": ([chain[0], *chain[2:]], 1, "previous_receipt"),
        "receipt inserted": ([*chain[:2], other_chain[2], *chain[2:]], 2, "previous_receipt"),
        "wrong key, claimed keyid": ([*chain[:3], resigned[3]], 3, "signature does not verify"),
        "unknown key": ([unknown[0], *chain[1:]], 0, "unknown keyid"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "payload byte flipped",
        "signature byte flipped",
        "raw envelope byte flipped",
        "order swapped",
        "middle swapped",
        "receipt deleted",
        "receipt inserted",
        "wrong key, claimed keyid",
        "unknown key",
    ],
)
def test_tampering_names_the_first_broken_link(keys_dir: Path, signer, chain: list[bytes], case: str) -> None:
    tampered, index, text = _tamper_cases(signer, chain)[case]
    report = verify_chain(tampered, load_public_keys(keys_dir))
    assert not report.ok
    assert report.first_broken == index
    assert report.links == [read_statement(e)["predicate"]["stage"] for e in tampered[:index]]
    assert report.reason.startswith(f"receipt {index + 1} (")
    assert text in report.reason


def test_reason_names_stage_of_broken_link(keys_dir: Path, signer, chain: list[bytes]) -> None:
    tampered = [*chain[:2], _flip_payload(chain[2]), chain[3]]
    report = verify_chain(tampered, load_public_keys(keys_dir))
    assert report.reason.startswith("receipt 3 (adapter): ")


def test_chain_needs_the_signers_public_key(chain: list[bytes]) -> None:
    report = verify_chain(chain, {})
    assert not report.ok and report.first_broken == 0 and "unknown keyid" in report.reason


def test_empty_chain_does_not_verify() -> None:
    assert not verify_chain([], {}).ok


def test_garbage_receipt_is_reported_not_raised(keys_dir: Path, chain: list[bytes]) -> None:
    report = verify_chain([chain[0], b"\x00not json"], load_public_keys(keys_dir))
    assert report.first_broken == 1
    assert report.reason.startswith("receipt 2 (unreadable): ")


# --- .kolm artifact ---------------------------------------------------------------------------------------


def test_build_kolm_then_verify_ok(kolm: Path, keys_dir: Path, adapter_dir: Path) -> None:
    report = verify_kolm(kolm, load_public_keys(keys_dir))
    assert report.ok, report.problems
    assert report.problems == []
    assert report.cid == cid_for_file(kolm)
    assert report.chain is not None and report.chain.links == [*STAGES, "artifact"]

    artifact = read_kolm(kolm)
    for field, value in MANIFEST.items():
        assert artifact.manifest[field] == value
    assert artifact.manifest["format"] == "kolm/1"
    assert artifact.manifest["files"] == {
        "adapter/README.md": cid_for_file(adapter_dir / "README.md"),
        "adapter/adapter_config.json": cid_for_file(adapter_dir / "adapter_config.json"),
        "adapter/adapter_model.safetensors": cid_for_file(adapter_dir / "adapter_model.safetensors"),
        "evals.json": cid_for_bytes(artifact.files["evals.json"]),
    }
    assert artifact.evals == {"k": 0.9}
    final = read_statement(artifact.receipts[-1])
    assert final["predicate"]["stage"] == "artifact"
    assert final["subject"][0]["annotations"]["cid"] == cid_for_bytes(artifact.files["manifest.json"])
    assert final["predicate"]["previous_receipt"] == receipt_cid(artifact.receipts[-2])


def test_archive_layout_is_deterministic_tar(kolm: Path) -> None:
    with tarfile.open(kolm) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) == [
        "adapter/README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "evals.json",
        "manifest.json",
        "receipts/01-corpus.dsse.json",
        "receipts/02-recipe.dsse.json",
        "receipts/03-adapter.dsse.json",
        "receipts/04-evaluation.dsse.json",
        "receipts/05-artifact.dsse.json",
    ]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.mode, member.isreg()) == (0, 0, 0, 0o644, True)


def test_build_is_reproducible(tmp_path: Path, kolm: Path, adapter_dir: Path, chain, signer) -> None:
    again = tmp_path / "again.kolm"
    cid = build_kolm(again, manifest=MANIFEST, adapter_dir=adapter_dir, evals={"k": 0.9}, receipts=chain,
                     signer=signer)
    assert cid == cid_for_file(kolm) == cid_for_file(again)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_build_refuses_incomplete_adapter(tmp_path: Path, adapter_dir: Path, chain, signer, missing) -> None:
    (adapter_dir / missing).unlink()
    output = tmp_path / "x.kolm"
    with pytest.raises(RegistryError, match=missing):
        build_kolm(output, manifest={}, adapter_dir=adapter_dir, evals={}, receipts=chain, signer=signer)
    assert not output.exists()


def test_build_refuses_unlinked_chain_and_foreign_signer(tmp_path: Path, adapter_dir, chain, signer) -> None:
    with pytest.raises(RegistryError, match="receipt 1"):
        build_kolm(tmp_path / "x.kolm", manifest={}, adapter_dir=adapter_dir, evals={},
                   receipts=[chain[1], chain[0]], signer=signer)
    with pytest.raises(RegistryError, match="keyid"):
        build_kolm(tmp_path / "x.kolm", manifest={}, adapter_dir=adapter_dir, evals={}, receipts=chain,
                   signer=(Ed25519PrivateKey.generate(), signer[1]))


def test_failed_build_leaves_previous_file_and_no_temp(kolm: Path, adapter_dir, chain, signer) -> None:
    before = kolm.read_bytes()
    with pytest.raises(RegistryError, match="not plain JSON"):
        build_kolm(kolm, manifest={"bad": object()}, adapter_dir=adapter_dir, evals={}, receipts=chain,
                   signer=signer)
    assert kolm.read_bytes() == before
    assert [p.name for p in kolm.parent.iterdir()] == [kolm.name]


def test_every_sampled_byte_flip_is_detected(tmp_path: Path, kolm: Path, keys_dir: Path) -> None:
    keys = load_public_keys(keys_dir)
    original = kolm.read_bytes()
    with tarfile.open(kolm) as tar:
        headers = [m.offset for m in tar.getmembers()]
    # Every 97th byte across the whole file, plus the whole first header and every checksum field:
    # bytes tarfile itself would not notice (checksum padding, zero padding) must be caught too.
    offsets = set(range(0, len(original), 97)) | set(range(512))
    offsets |= {h + i for h in headers for i in range(148, 156)}
    damaged = tmp_path / "damaged.kolm"
    for offset in sorted(offsets):
        for mask in (0x01, 0x10, 0xFF):
            data = bytearray(original)
            data[offset] ^= mask
            damaged.write_bytes(data)
            report = verify_kolm(damaged, keys)
            assert not report.ok, f"flip {mask:#x} at byte {offset} went unnoticed"
            assert report.problems


def test_verify_reports_missing_extra_and_mismatched_files(tmp_path: Path, kolm: Path, keys_dir) -> None:
    keys = load_public_keys(keys_dir)
    files = read_kolm(kolm).files
    forged = tmp_path / "forged.kolm"

    _write_tar(forged, {**files, "adapter/extra.bin": b"x"})
    report = verify_kolm(forged, keys)
    assert not report.ok and any("adapter/extra.bin" in p and "not listed" in p for p in report.problems)

    _write_tar(forged, {k: v for k, v in files.items() if k != "adapter/adapter_model.safetensors"})
    report = verify_kolm(forged, keys)
    assert any("adapter_model.safetensors" in p and "missing" in p for p in report.problems)

    _write_tar(forged, {**files, "evals.json": b'{"k": 1.0}\n'})
    report = verify_kolm(forged, keys)
    assert report.problems == ["evals.json: content does not match its CID in the manifest"]


def test_verify_detects_rewritten_manifest(tmp_path: Path, kolm: Path, keys_dir) -> None:
    files = read_kolm(kolm).files
    manifest = json.loads(files["manifest.json"])
    manifest["task"] = "other"
    forged = tmp_path / "forged.kolm"
    _write_tar(forged, {**files, "manifest.json": json.dumps(manifest).encode()})
    report = verify_kolm(forged, load_public_keys(keys_dir))
    assert report.problems == ["final receipt does not name this manifest.json"]


def test_verify_with_unknown_keys_fails(kolm: Path, tmp_path: Path) -> None:
    create_tenant_keys(tmp_path / "other", "other")
    report = verify_kolm(kolm, load_public_keys(tmp_path / "other"))
    assert not report.ok
    assert report.chain is not None and report.chain.first_broken == 0
    assert any("unknown keyid" in p for p in report.problems)


@pytest.mark.parametrize("cut", ["half", "one member short", "end marker", "last byte", "garbage", "empty"])
def test_read_kolm_on_truncated_or_garbage_file(tmp_path: Path, kolm: Path, keys_dir: Path, cut: str) -> None:
    data = kolm.read_bytes()
    with tarfile.open(kolm) as tar:
        last_header = tar.getmembers()[-1].offset
    damaged = tmp_path / "damaged.kolm"
    damaged.write_bytes(
        {
            "half": data[: len(data) // 2],
            "one member short": data[:last_header],
            "end marker": data[: data.rindex(b"}") + 1],
            "last byte": data[:-1],
            "garbage": os.urandom(4096),
            "empty": b"",
        }[cut]
    )
    with pytest.raises(RegistryError, match="damaged.kolm"):
        read_kolm(damaged)
    report = verify_kolm(damaged, load_public_keys(keys_dir))
    assert not report.ok and "damaged.kolm" in report.problems[0]


def test_read_kolm_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="nope.kolm"):
        read_kolm(tmp_path / "nope.kolm")
    assert not verify_kolm(tmp_path / "nope.kolm", {}).ok


def test_extract_adapter_reproduces_adapter_dir(tmp_path: Path, kolm: Path, adapter_dir: Path) -> None:
    dest = extract_adapter(kolm, tmp_path / "served" / "adapter-x")
    assert dest == tmp_path / "served" / "adapter-x"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in adapter_dir.iterdir())
    for path in adapter_dir.iterdir():
        assert (dest / path.name).read_bytes() == path.read_bytes()
    tensors = load_file(str(dest / "adapter_model.safetensors"))
    assert tensors["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 8)
    assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert [p.name for p in dest.parent.iterdir()] == ["adapter-x"]
    with pytest.raises(RegistryError, match="already exists"):
        extract_adapter(kolm, dest)


def test_extract_adapter_refuses_tampered_weights(tmp_path: Path, kolm: Path) -> None:
    files = read_kolm(kolm).files
    weights = bytearray(files["adapter/adapter_model.safetensors"])
    weights[-1] ^= 0x01
    forged = tmp_path / "forged.kolm"
    _write_tar(forged, {**files, "adapter/adapter_model.safetensors": bytes(weights)})
    with pytest.raises(RegistryError, match="does not match"):
        extract_adapter(forged, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# --- publish and swap -------------------------------------------------------------------------------------


def test_publish_artifact_is_content_addressed_and_idempotent(tmp_path: Path, kolm: Path) -> None:
    artifacts = tmp_path / "artifacts"
    path = publish_artifact(artifacts, "tickets", kolm)
    assert path == artifacts / "tickets" / f"{cid_for_file(kolm)}.kolm"
    assert path.read_bytes() == kolm.read_bytes()
    assert publish_artifact(artifacts, "tickets", kolm) == path
    assert [p.name for p in (artifacts / "tickets").iterdir()] == [path.name]
    with pytest.raises(RegistryError, match="invalid task"):
        publish_artifact(artifacts, "../escape", kolm)
    with pytest.raises(RegistryError, match="does not exist"):
        publish_artifact(artifacts, "tickets", tmp_path / "missing.kolm")


def _two_artifacts(tmp_path: Path) -> tuple[Path, Path]:
    artifacts = tmp_path / "home" / "artifacts" / "tickets"
    artifacts.mkdir(parents=True)
    first, second = artifacts / "a.kolm", artifacts / "b.kolm"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    return first, second


def test_swap_pointer_returns_previous_target(tmp_path: Path) -> None:
    first, second = _two_artifacts(tmp_path)
    adapters = tmp_path / "home" / "adapters"
    assert read_pointer(adapters, "tickets") is None
    assert swap_pointer(adapters, "tickets", first) is None
    assert read_pointer(adapters, "tickets") == first
    assert swap_pointer(adapters, "tickets", second) == first
    assert read_pointer(adapters, "tickets") == second
    assert (adapters / "tickets").is_symlink()
    assert (adapters / "tickets").read_bytes() == b"second"
    assert [p.name for p in adapters.iterdir()] == ["tickets"]


def test_pointer_survives_moving_the_home(tmp_path: Path) -> None:
    first, _ = _two_artifacts(tmp_path)
    swap_pointer(tmp_path / "home" / "adapters", "tickets", first)
    shutil.move(tmp_path / "home", tmp_path / "moved")
    assert read_pointer(tmp_path / "moved" / "adapters", "tickets") == tmp_path / "moved" / first.relative_to(
        tmp_path / "home"
    )


def test_swap_refuses_missing_target_and_keeps_pointer(tmp_path: Path) -> None:
    first, _ = _two_artifacts(tmp_path)
    adapters = tmp_path / "home" / "adapters"
    swap_pointer(adapters, "tickets", first)
    with pytest.raises(RegistryError, match="not an existing file"):
        swap_pointer(adapters, "tickets", first.parent / "nope.kolm")
    with pytest.raises(RegistryError, match="not an existing file"):
        swap_pointer(adapters, "tickets", first.parent)
    assert read_pointer(adapters, "tickets") == first
    with pytest.raises(RegistryError, match="invalid task"):
        swap_pointer(adapters, "Tickets", first)


def test_dangling_or_foreign_pointer_is_an_error(tmp_path: Path) -> None:
    first, second = _two_artifacts(tmp_path)
    adapters = tmp_path / "home" / "adapters"
    swap_pointer(adapters, "tickets", first)
    first.unlink()
    with pytest.raises(RegistryError, match="not an existing file"):
        read_pointer(adapters, "tickets")
    assert swap_pointer(adapters, "tickets", second) == first
    assert read_pointer(adapters, "tickets") == second
    (adapters / "plain").write_text("not a link")
    with pytest.raises(RegistryError, match="not a pointer"):
        swap_pointer(adapters, "plain", second)
    assert (adapters / "plain").read_text() == "not a link"


def test_pointer_always_names_an_existing_file_during_swaps(tmp_path: Path) -> None:
    first, second = _two_artifacts(tmp_path)
    adapters = tmp_path / "home" / "adapters"
    swap_pointer(adapters, "tickets", first)
    pointer = adapters / "tickets"
    stop = threading.Event()

    def flip() -> None:
        targets = [second, first]
        while not stop.is_set():
            swap_pointer(adapters, "tickets", targets[0])
            targets.reverse()

    swapper = threading.Thread(target=flip)
    swapper.start()
    try:
        seen = set()
        for _ in range(3000):
            seen.add(pointer.read_bytes())
    finally:
        stop.set()
        swapper.join()
    assert seen <= {b"first", b"second"}
    assert read_pointer(adapters, "tickets") in (first, second)
    assert sorted(p.name for p in adapters.iterdir()) == ["tickets"]
