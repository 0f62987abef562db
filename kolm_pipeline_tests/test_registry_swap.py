"""Swap, rollback and the registry's account of them, through the `kolm` CLI on a real SQLite store and a
real MLflow model registry: rows, deployment receipts, the `champion` alias, and clear refusals."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from kolm_pipeline.cli import main
from kolm_pipeline.provenance.keys import create_tenant_keys
from kolm_pipeline.provenance.receipts import read_statement, receipt_cid
from kolm_pipeline.registry import read_pointer
from kolm_pipeline.registry.champion import champion_cid
from kolm_pipeline.registry.deployment import receipt_path
from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_registry_support import clean_env, fake_adapter, shared_mlflow_uri, signed_artifact

TASK = "acme.support"


@pytest.fixture
def home(kolm_settings, monkeypatch, tmp_path_factory):
    clean_env(monkeypatch, KOLM_MLFLOW_URI=shared_mlflow_uri(tmp_path_factory))
    return load_settings(kolm_settings.home)


def _artifacts(settings, task: str, count: int, ks: list[float] | None = None) -> list[Path]:
    ks = ks or [0.6 + 0.1 * index for index in range(count)]
    return [
        signed_artifact(settings.home / "incoming" / f"{task}-{index}.kolm",
                        adapter_dir=fake_adapter(settings.home / "adapters-src" / f"{task}-{index}", seed=index),
                        keys_dir=settings.keys_dir, task=task, k=ks[index], k_current=0.5, salt=str(index))
        for index in range(count)
    ]


def _cid(path: Path) -> str:
    from kolm_pipeline.registry import cid_for_file

    return cid_for_file(path)


def test_swap_rollback_and_registry_account(home, capsys):
    task = "acme.swaps"
    first, second, third = _artifacts(home, task, 3)
    store = CaptureStore(home.store_url)

    assert main(["swap", "--artifact", str(first)]) == 0
    assert main(["swap", "--artifact", str(second)]) == 0
    assert main(["swap", "--artifact", str(third), "--strategy", "force"]) == 0
    out = capsys.readouterr().out
    assert f"{_cid(second)} → {_cid(third)}" in out
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(third)}.kolm"
    assert champion_cid(home.mlflow_tracking_uri, task) == _cid(third)

    # Rollback walks back through history, one step at a time, and each step is a row too.
    assert main(["rollback", "--task", task]) == 0
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(second)}.kolm"
    assert champion_cid(home.mlflow_tracking_uri, task) == _cid(second)
    assert main(["rollback", "--task", task]) == 0
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(first)}.kolm"
    assert champion_cid(home.mlflow_tracking_uri, task) == _cid(first)
    capsys.readouterr()
    assert main(["rollback", "--task", task]) == 1
    assert "no previous version" in capsys.readouterr().err
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(first)}.kolm"

    rows = store.registry_rows(task)
    assert [(r.decision, r.from_cid, r.to_cid) for r in rows] == [
        ("rollback", _cid(second), _cid(first)),
        ("rollback", _cid(third), _cid(second)),
        ("swap", _cid(second), _cid(third)),
        ("swap", _cid(first), _cid(second)),
        ("swap", None, _cid(first)),
    ]
    assert (rows[0].k_before, rows[0].k_after) == pytest.approx((0.7, 0.6))
    assert all(r.actor and r.created_at for r in rows)

    # Every deployment row carries a signed deployment receipt chained to the artifact's final receipt.
    newest = rows[0].details
    receipt = newest["deployment_receipt"].encode()
    statement = read_statement(receipt)
    assert statement["predicate"]["stage"] == "deployment"
    assert statement["predicate"]["decision"] == "rollback"
    assert statement["subject"][0]["annotations"]["cid"] == _cid(first)
    assert newest["receipt_cid"] == receipt_cid(receipt)
    assert receipt_path(home.artifacts_dir / task / f"{_cid(first)}.kolm").read_bytes() == receipt

    # The registry alone answers: what task, what data, what code, what score, what it replaced.
    capsys.readouterr()
    assert main(["registry", "log", "--task", task]) == 0
    log = capsys.readouterr().out
    for text in ("rollback", "namespace swaps", "captures 1–160", "test-trainer/1", "recipe bafkrei",
                 f"replaced: {_cid(second)}", "K 0.6000"):
        assert text in log, text
    assert main(["registry", "log", "--cid", _cid(second), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["provenance"]["data"]["capture_range"] == [1, 160]
    assert described["provenance"]["code"]["trainer_version"] == "test-trainer/1"
    assert described["provenance"]["score"]["k"] == pytest.approx(0.7)
    assert [event["decision"] for event in described["events"]] == ["rollback", "rollback", "swap", "swap"]
    assert all(e["mlflow"]["model"] == f"kolm-{task}" for e in described["events"] if e["to_cid"] == _cid(second))

    # The deployed pointer verifies offline, deployment receipt included.
    assert main(["verify", str(home.adapters_dir / task)]) == 0
    verified = capsys.readouterr().out
    assert "receipts: corpus → recipe → adapter → evaluation → artifact → deployment" in verified
    assert "captures 1–160" in verified


def test_higher_k_wins_refuses_and_records(home, capsys):
    task = "acme.gate"
    better, worse = _artifacts(home, task, 2, ks=[0.8, 0.805])
    assert main(["swap", "--artifact", str(better)]) == 0
    capsys.readouterr()
    assert main(["swap", "--artifact", str(worse)]) == 1
    assert "within noise" in capsys.readouterr().err
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(better)}.kolm"
    rows = CaptureStore(home.store_url).registry_rows(task)
    assert [r.decision for r in rows] == ["refuse", "swap"]
    assert rows[0].details["artifact"] == _cid(worse)
    assert main(["swap", "--artifact", str(better)]) == 1
    assert "already serving" in capsys.readouterr().err


def test_swap_by_cid_and_task_checks(home, capsys):
    task = "acme.bycid"
    first, second = _artifacts(home, task, 2)
    assert main(["swap", "--artifact", str(first)]) == 0
    assert main(["swap", "--artifact", str(second)]) == 0
    assert main(["swap", "--task", task, "--cid", _cid(first), "--strategy", "force"]) == 0
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(first)}.kolm"
    capsys.readouterr()

    assert main(["swap", "--task", "acme.nosuch", "--cid", _cid(first)]) == 1
    assert "unknown task 'acme.nosuch'" in capsys.readouterr().err
    assert main(["swap", "--task", task, "--cid", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"]) == 1
    assert "never published" in capsys.readouterr().err
    assert main(["swap", "--task", task, "--cid", "not-a-cid"]) == 1
    assert "malformed CID" in capsys.readouterr().err
    assert main(["swap", "--artifact", str(second), "--task", "acme.other"]) == 1
    assert "artifact of task 'acme.bycid', not 'acme.other'" in capsys.readouterr().err
    assert main(["rollback", "--task", "acme.nosuch"]) == 1
    assert "unknown task 'acme.nosuch'" in capsys.readouterr().err
    assert main(["swap", "--task", task]) == 1
    assert "either --artifact" in capsys.readouterr().err


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _repack(path: Path, members: dict[str, bytes]) -> None:
    import io

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))


@pytest.mark.parametrize("damage", ["tampered", "truncated", "unsigned", "foreign key", "missing"])
def test_swap_refuses_bad_artifacts_naming_what_failed(home, capsys, tmp_path, damage):
    task = "acme.bad"
    (good,) = _artifacts(home, task, 1)
    bad = tmp_path / "bad.kolm"
    data = good.read_bytes()
    if damage == "tampered":
        members = _members(good)
        weights = bytearray(members["adapter/adapter_model.safetensors"])
        weights[-3] ^= 0x40
        _repack(bad, {**members, "adapter/adapter_model.safetensors": bytes(weights)})
        expected = "adapter/adapter_model.safetensors: content does not match its CID"
    elif damage == "truncated":
        with tarfile.open(good) as tar:  # cut inside the weights' data, wherever the archive's blocks fall
            weights = tar.getmember("adapter/adapter_model.safetensors")
        bad.write_bytes(data[: weights.offset_data + weights.size // 2])
        expected = "not a readable .kolm archive"
    elif damage == "unsigned":
        members = _members(good)
        _repack(bad, {name: body for name, body in members.items() if not name.startswith("receipts/")})
        expected = "archive holds no receipts"
    elif damage == "foreign key":
        other = tmp_path / "other-keys"
        create_tenant_keys(other, "acme")
        signed_artifact(bad, adapter_dir=fake_adapter(tmp_path / "a"), keys_dir=other, task=task)
        expected = "receipt 1 (corpus): signed by unknown keyid"
    else:
        expected = "no such artifact"
    assert main(["swap", "--artifact", str(bad), "--strategy", "force"]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert read_pointer(home.adapters_dir, task) is None
    assert not list((home.artifacts_dir).glob("**/*.kolm"))
    if damage != "missing":
        assert main(["verify", str(bad)]) == 1
        assert expected in capsys.readouterr().err


def test_verify_names_a_broken_deployment_receipt(home, capsys):
    task = "acme.verify"
    (artifact,) = _artifacts(home, task, 1)
    assert main(["swap", "--artifact", str(artifact)]) == 0
    published = read_pointer(home.adapters_dir, task)
    receipt = receipt_path(published)
    envelope = json.loads(receipt.read_bytes())
    envelope["signatures"][0]["sig"] = envelope["signatures"][0]["sig"][::-1]
    receipt.write_bytes(json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode())
    capsys.readouterr()
    assert main(["verify", str(home.adapters_dir / task)]) == 1
    assert "receipt 6 (deployment)" in capsys.readouterr().err


def test_registry_log_unknown_task_and_cid(home, capsys):
    assert main(["registry", "log", "--task", "acme.never"]) == 1
    assert "no rows for task 'acme.never'" in capsys.readouterr().err
    assert main(["registry", "log", "--cid", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"]) == 1
    assert "knows no artifact" in capsys.readouterr().err


def test_verify_needs_only_public_keys_and_artifacts_hold_no_private_key(home, tmp_path, capsys):
    import shutil

    from cryptography.hazmat.primitives import serialization

    (artifact,) = _artifacts(home, "acme.offline", 1)
    public_only = tmp_path / "public-keys"
    public_only.mkdir()
    shutil.copy(home.keys_dir / "acme.pub", public_only / "acme.pub")
    assert main(["verify", str(artifact), "--keys", str(public_only)]) == 0
    assert "receipts: corpus → recipe → adapter → evaluation → artifact" in capsys.readouterr().out

    private = (home.keys_dir / "acme.key").read_bytes()
    raw = serialization.load_pem_private_key(private, password=None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    data = artifact.read_bytes()
    assert b"PRIVATE KEY" not in data and raw not in data and private not in data


def test_rollback_repairs_a_deployment_whose_artifact_is_gone(home, capsys):
    task = "acme.repair"
    first, second, third = _artifacts(home, task, 3)
    assert main(["swap", "--artifact", str(first)]) == 0
    assert main(["swap", "--artifact", str(second)]) == 0
    (home.artifacts_dir / task / f"{_cid(second)}.kolm").unlink()
    capsys.readouterr()
    assert main(["swap", "--artifact", str(third)]) == 1
    assert "no K to compare" in capsys.readouterr().err
    assert main(["rollback", "--task", task]) == 0
    assert read_pointer(home.adapters_dir, task).name == f"{_cid(first)}.kolm"
    row = CaptureStore(home.store_url).registry_rows(task)[0]
    assert (row.decision, row.from_cid, row.to_cid, row.k_before) == ("rollback", _cid(second), _cid(first), None)
