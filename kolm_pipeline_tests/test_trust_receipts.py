"""Receipts bind everything (issue 19, item 5): every receipt must be signed by the manifest tenant's key, and
the adapter receipt names every file the artifact serves. Reproduces the reported break first: an edited
`adapter_config.json`, its manifest entry updated and only the last receipt re-signed with *another tenant's*
key, verified "OK" while both public keys were present, and `kolm swap` deployed it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolm_pipeline.cli import main
from kolm_pipeline.provenance.cid import cid_for_bytes
from kolm_pipeline.provenance.encoding import pretty_json
from kolm_pipeline.provenance.keys import ensure_tenant_keys, load_private_key, load_public_keys
from kolm_pipeline.provenance.receipts import make_receipt, read_statement, receipt_cid
from kolm_pipeline.registry.artifact import MANIFEST, RECEIPTS_PREFIX, read_kolm, verify_kolm
from kolm_pipeline_tests.test_registry_support import fake_adapter, signed_artifact
from kolm_pipeline_tests.test_registry_swap import _members
from kolm_pipeline_tests.test_registry_swap import _repack as repack


def _repack(path: Path, files: dict[str, bytes]) -> Path:
    """Members in the archive's own deterministic form, so only content can give a forgery away."""
    repack(path, files)
    return path


def _forge(original: Path, output: Path, keys_dir: Path, signer_tenant: str,
           edit: dict[str, bytes | None]) -> Path:
    """The attack: change (or add, with bytes; remove, with None) adapter files, list them in the manifest, and
    re-sign only the final `artifact` receipt with `signer_tenant`'s key."""
    files = _members(original)
    manifest = json.loads(files[MANIFEST])
    for name, data in edit.items():
        if data is None:
            files.pop(name, None)
            manifest["files"].pop(name, None)
        else:
            files[name] = data
            manifest["files"][name] = cid_for_bytes(data)
    files[MANIFEST] = pretty_json(manifest)
    receipts = sorted(name for name in files if name.startswith(RECEIPTS_PREFIX))
    final = read_statement(files[receipts[-1]])["predicate"]
    keyid = ensure_tenant_keys(keys_dir, signer_tenant)
    files[receipts[-1]] = make_receipt(stage="artifact", subject_name=MANIFEST, subject_cid=cid_for_bytes(
        files[MANIFEST]), predicate={"format": final["format"]}, previous_cid=final["previous_receipt"],
        private_key=load_private_key(keys_dir, signer_tenant), keyid=keyid)
    return _repack(output, files)


@pytest.fixture
def genuine(tmp_path: Path) -> tuple[Path, Path]:
    keys_dir = tmp_path / "keys"
    path = signed_artifact(tmp_path / "genuine.kolm", adapter_dir=fake_adapter(tmp_path / "adapter"),
                           keys_dir=keys_dir, tenant="demo", task="demo.tickets")
    return path, keys_dir


def test_the_reported_forgery_is_refused_by_verify_and_swap(genuine, tmp_path, kolm_settings, capsys):
    original, keys_dir = genuine
    assert verify_kolm(original, load_public_keys(keys_dir)).ok
    config = json.loads(_members(original)["adapter/adapter_config.json"])
    tampered = json.dumps({**config, "lora_alpha": 4096}).encode()
    forged = _forge(original, tmp_path / "forged.kolm", keys_dir, "mallory", {"adapter/adapter_config.json": tampered})

    report = verify_kolm(forged, load_public_keys(keys_dir))  # both tenants' public keys present
    assert not report.ok
    assert any("of tenant 'mallory', not by tenant 'demo'" in problem for problem in report.problems)

    assert main(["verify", str(forged), "--keys", str(keys_dir)]) == 1
    assert "OK" not in capsys.readouterr().out
    kolm_settings.keys_dir.mkdir(parents=True, exist_ok=True)
    for path in keys_dir.iterdir():  # the CLI's registry uses KOLM_HOME's keys: put both tenants' there
        (kolm_settings.keys_dir / path.name).write_bytes(path.read_bytes())
    assert main(["swap", "--artifact", str(forged)]) == 1
    assert "not by tenant 'demo'" in capsys.readouterr().err
    assert not (kolm_settings.adapters_dir / "demo.tickets").exists()


def test_adapter_files_are_bound_to_the_adapter_receipt(genuine, tmp_path):
    """Even re-signed with the tenant's own artifact key, served files must be those the training signed."""
    original, keys_dir = genuine
    tampered = b'{"peft_type": "LORA", "r": 64}'
    forged = _forge(original, tmp_path / "own-key.kolm", keys_dir, "demo", {"adapter/adapter_config.json": tampered})
    report = verify_kolm(forged, load_public_keys(keys_dir))
    assert not report.ok
    assert report.problems == ["adapter/adapter_config.json: content differs from the file the adapter receipt names"]


def test_public_keys_carry_their_tenant(genuine):
    _, keys_dir = genuine
    ensure_tenant_keys(keys_dir, "mallory")
    assert sorted(key.tenant for key in load_public_keys(keys_dir).values()) == ["demo", "mallory"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]),
    action=st.sampled_from(["change", "add", "remove"]),
    signer=st.sampled_from(["demo", "mallory"]),
)
def test_any_changed_added_or_removed_file_resigned_with_any_key_is_refused(genuine, tmp_path, target, action,
                                                                            signer):
    original, keys_dir = genuine
    files = _members(original)
    edit = {"change": {target: files[target] + b" "}, "add": {target + ".extra": b"more weights"},
            "remove": {target: None}}[action]
    forged = _forge(original, tmp_path / f"{action}-{signer}.kolm", keys_dir, signer, edit)
    report = verify_kolm(forged, load_public_keys(keys_dir))
    assert not report.ok
    assert report.problems, "a refusal names the broken link"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(min_value=0, max_value=4), signer=st.sampled_from(["mallory", "other"]))
def test_any_receipt_resigned_with_another_tenants_key_is_refused(genuine, tmp_path, index, signer):
    original, keys_dir = genuine
    files = _members(original)
    names = sorted(name for name in files if name.startswith(RECEIPTS_PREFIX))
    statement = read_statement(files[names[index]])
    predicate = dict(statement["predicate"])
    stage, previous = predicate.pop("stage"), predicate.pop("previous_receipt")
    subject = statement["subject"][0]
    keyid = ensure_tenant_keys(keys_dir, signer)
    files[names[index]] = make_receipt(stage=stage, subject_name=subject["name"],
                                       subject_cid=subject["annotations"]["cid"], predicate=predicate,
                                       previous_cid=previous, private_key=load_private_key(keys_dir, signer),
                                       keyid=keyid)
    assert receipt_cid(files[names[index]]) != receipt_cid(_members(original)[names[index]])
    report = verify_kolm(_repack(tmp_path / f"resigned-{index}.kolm", files), load_public_keys(keys_dir))
    assert not report.ok
    assert f"receipt {index + 1} (" in report.chain.reason and f"of tenant '{signer}'" in report.chain.reason


def test_an_artifact_without_a_tenant_is_refused(genuine, tmp_path):
    original, keys_dir = genuine
    artifact = read_kolm(original)
    assert artifact.manifest["tenant"] == "demo"
    files = _members(original)
    manifest = json.loads(files[MANIFEST])
    del manifest["tenant"]
    files[MANIFEST] = pretty_json(manifest)
    report = verify_kolm(_repack(tmp_path / "no-tenant.kolm", files), load_public_keys(keys_dir))
    assert not report.ok and "manifest names no tenant, so no key can vouch for it" in report.problems
