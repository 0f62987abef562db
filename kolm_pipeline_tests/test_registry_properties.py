"""Property tests: any byte flip, deletion or insertion in a `.kolm`, and any reordering, deletion,
insertion or corruption of its receipts, is detected by `verify_kolm`, which names the first broken link."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolm_pipeline.provenance.keys import keyid_for, load_private_key
from kolm_pipeline.registry import load_public_keys, read_kolm, read_statement, verify_kolm
from kolm_pipeline.registry.deployment import make_deployment_receipt, verify_deployment
from kolm_pipeline_tests.test_registry_support import fake_adapter, signed_artifact

PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("props")
    keys_dir = root / "keys"
    original = signed_artifact(root / "a.kolm", adapter_dir=fake_adapter(root / "ad-a", seed=1), keys_dir=keys_dir)
    other = signed_artifact(root / "b.kolm", adapter_dir=fake_adapter(root / "ad-b", seed=2), keys_dir=keys_dir,
                            salt="other")
    return {"root": root, "keys": load_public_keys(keys_dir), "keys_dir": keys_dir, "path": original,
            "bytes": original.read_bytes(), "artifact": read_kolm(original), "other": read_kolm(other).receipts}


def _write(path: Path, members: dict[str, bytes]) -> None:
    """Pack members exactly as `build_kolm` does, so only the content under test differs."""
    with open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(members[name]), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))


def _stage(envelope: bytes) -> str:
    try:
        return read_statement(envelope)["predicate"]["stage"]
    except Exception:  # noqa: BLE001 - a corrupted receipt may not parse at all
        return "unreadable"


def _with_receipts(built: dict, receipts: list[bytes], path: Path) -> Path:
    members = {name: data for name, data in built["artifact"].files.items() if not name.startswith("receipts/")}
    for index, envelope in enumerate(receipts, start=1):
        members[f"receipts/{index:02d}-{_stage(envelope)}.dsse.json"] = envelope
    _write(path, members)
    return path


def _longest_valid_prefix(receipts: list[bytes], chains: list[list[bytes]]) -> int:
    """Receipts are signed over their predecessor's CID, so a valid prefix must be a prefix of a real chain."""
    best = 0
    for chain in chains:
        length = 0
        while length < min(len(receipts), len(chain)) and receipts[length] == chain[length]:
            length += 1
        best = max(best, length)
    return best


byte_edits = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=2048)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=1024)),
)


@PROPERTY
@given(edits=st.lists(byte_edits, min_size=1, max_size=3))
def test_any_byte_edit_of_the_archive_is_detected(built, tmp_path, edits) -> None:
    data = bytearray(built["bytes"])
    for kind, offset, arg in edits:
        offset %= len(data) + (kind == "insert")
        if kind == "flip" and offset < len(data):
            data[offset] ^= arg
        elif kind == "delete":
            del data[offset : offset + arg]
        elif kind == "insert":
            data[offset:offset] = arg
        if not data:
            break
    if bytes(data) == built["bytes"]:  # e.g. a deletion undone by an identical insertion
        return
    damaged = tmp_path / "damaged.kolm"
    damaged.write_bytes(bytes(data))
    report = verify_kolm(damaged, built["keys"])
    assert not report.ok and report.problems


receipt_edits = st.one_of(
    st.tuples(st.just("permute"), st.permutations(range(5))),
    st.tuples(st.just("delete"), st.integers(0, 4)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 5), st.integers(0, 3))),
    st.tuples(st.just("duplicate"), st.tuples(st.integers(0, 4), st.integers(0, 5))),
    st.tuples(st.just("corrupt"), st.tuples(st.integers(0, 4), st.integers(min_value=0), st.integers(1, 255))),
)


@PROPERTY
@given(edit=receipt_edits)
def test_any_receipt_edit_is_detected_and_names_the_first_broken_link(built, tmp_path, edit) -> None:
    original = built["artifact"].receipts
    receipts = list(original)
    kind, arg = edit
    if kind == "permute":
        receipts = [original[index] for index in arg]
    elif kind == "delete":
        del receipts[arg]
    elif kind == "insert":
        receipts.insert(arg[0], built["other"][arg[1]])
    elif kind == "duplicate":
        receipts.insert(arg[1], original[arg[0]])
    else:
        index, offset, mask = arg
        corrupted = bytearray(receipts[index])
        corrupted[offset % len(corrupted)] ^= mask
        receipts[index] = bytes(corrupted)
    if receipts == original:
        return
    report = verify_kolm(_with_receipts(built, receipts, tmp_path / "edited.kolm"), built["keys"])
    assert not report.ok
    valid = _longest_valid_prefix(receipts, [original, built["other"]])
    if valid < len(receipts) and report.chain is None:
        # The edit changed a receipt's stage, which names its archive member: refused before the chain is read.
        assert any(p.startswith("unsupported archive member name 'receipts/") for p in report.problems)
    elif valid < len(receipts):
        assert report.chain.first_broken == valid
        assert any(p.startswith(f"receipt chain broken: receipt {valid + 1} (") for p in report.problems)
    else:  # a shorter chain that is itself valid, e.g. the final receipt deleted
        assert any("final receipt" in p for p in report.problems)


@PROPERTY
@given(offset=st.integers(min_value=0), mask=st.integers(1, 255))
def test_any_corruption_of_the_deployment_receipt_is_detected(built, offset, mask) -> None:
    key = load_private_key(built["keys_dir"], "acme")
    artifact = built["artifact"]
    from kolm_pipeline.registry import cid_for_bytes

    cid = cid_for_bytes(built["bytes"])
    envelope = make_deployment_receipt(artifact, cid, decision="swap", from_cid=None, k_before=0.5, k_after=0.8,
                                       actor="test", signer=(key, keyid_for(key.public_key())))
    assert verify_deployment(artifact, cid, envelope, built["keys"])[1] == []
    corrupted = bytearray(envelope)
    corrupted[offset % len(corrupted)] ^= mask
    chain, problems = verify_deployment(artifact, cid, bytes(corrupted), built["keys"])
    assert chain.first_broken == 5 and problems
    assert problems[0].startswith("receipt chain broken: receipt 6 (")
