"""Issue 24, serving without a shared filesystem: host A deploys (its own KOLM_HOME), host B runs two `kolm serve
--follow registry` replicas on another, empty KOLM_HOME; the hosts share only PostgreSQL (127.0.0.1:5432, a fresh
database) and the object store (SeaweedFS's S3 gateway). Swap and rollback on A reach both replicas of B within
2 s; an artifact B cannot verify is refused there, the previous one keeps serving and `/healthz` says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import dagster as dg
import httpx
import psycopg
import pytest
from psycopg import sql

from kolm_pipeline.cli import main
from kolm_pipeline.provenance.objectstore import artifact_key
from kolm_pipeline.registry import cid_for_file
from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_instance_postgres import pg_databases  # noqa: F401 (fixture)
from kolm_pipeline_tests.test_registry_s3 import ACCESS_KEY, BUCKET, SECRET_KEY, seaweedfs  # noqa: F401 (fixture)
from kolm_pipeline_tests.test_registry_support import (
    LABELS,
    clean_env,
    free_port,
    real_adapter,
    signed_artifact,
    wait_until,
)

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
TASK = "acme.scale"
CONVERGE_S = 2.0


@pytest.fixture
def pg_url():
    name = f"kolm_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Replica:
    """One `kolm serve --follow registry` process of host B."""

    def __init__(self, home: Path, env: dict[str, str], base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"replica-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kolm_pipeline.cli", "serve", "--follow", "registry", "--port", str(self.port),
                 "--no-live-monitor", "--poll-interval", "0.1", "--log-level", "warning"], stdout=log,
                env={**os.environ, **env, "KOLM_HOME": str(home), "KOLM_BASE_MODEL": str(base), "HF_HUB_OFFLINE": "1"})

    def ready(self) -> bool:
        assert self.process.poll() is None, "kolm serve exited"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def serving(self, key: str, task: str = TASK) -> str | None:
        models = httpx.get(f"{self.url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5).json()
        return next((m["kolm_adapter_cid"] for m in models["data"] if m["id"] == task), None)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def converge(replicas: list[Replica], key: str, cid: str, task: str = TASK) -> float:
    """Seconds until every replica serves `cid` for `task` (polled every 20 ms)."""
    began = time.monotonic()
    wait_until(lambda: all(replica.serving(key, task) == cid for replica in replicas), timeout=30,
               what=f"every replica to serve {cid}")
    return time.monotonic() - began


def test_replicas_sharing_only_postgres_and_s3_follow_swap_and_rollback(seaweedfs, pg_url, tiny_base,  # noqa: F811
                                                                       tmp_path, monkeypatch, capsys):
    from kolm_pipeline.train.base_model import resolve_base_model

    shared = {"KOLM_STORE_URL": pg_url, "KOLM_ARTIFACTS_URL": f"s3://{BUCKET}/scale-{uuid.uuid4().hex[:6]}",
              "AWS_ENDPOINT_URL": seaweedfs, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
              "AWS_DEFAULT_REGION": "us-east-1"}
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    clean_env(monkeypatch, KOLM_HOME=str(host_a), **shared)
    settings = load_settings(host_a)
    key = CaptureStore(pg_url).create_tenant("acme")
    digest = resolve_base_model(str(tiny_base), settings.models_dir).digest
    artifacts = [signed_artifact(tmp_path / f"v{i}.kolm", keys_dir=settings.keys_dir, task=TASK, labels=LABELS,
                                 adapter_dir=real_adapter(tiny_base, tmp_path / f"adapter{i}", seed=i),
                                 base_digest=digest, k=0.6 + 0.1 * i, salt=f"v{i}") for i in range(2)]
    first, second = (cid_for_file(path) for path in artifacts)
    assert main(["swap", "--artifact", str(artifacts[0])]) == 0

    replicas = [Replica(host_b, shared, tiny_base) for _ in range(2)]
    try:
        for replica in replicas:
            wait_until(replica.ready, timeout=120, interval=0.2, what="a replica of host B to start")
        converge(replicas, key, first)
        started = replicas[0].log.read_text()  # says which registry it follows, the password hidden
        assert "following the registry in postgresql+psycopg://postgres@127.0.0.1:5432/" in started

        assert main(["swap", "--artifact", str(artifacts[1])]) == 0  # on host A
        swapped = converge(replicas, key, second)
        assert main(["rollback", "--task", TASK]) == 0
        rolled_back = converge(replicas, key, first)
        print(f"replicas converged {swapped:.2f} s after the swap, {rolled_back:.2f} s after the rollback")
        assert swapped <= CONVERGE_S and rolled_back <= CONVERGE_S

        # Host C holds nothing of A but the signing key (a mounted secret): it reads the champion from the
        # registry and the artifacts from the object store, and its swap and rollback reach host B the same way.
        host_c = tmp_path / "host-c"
        (host_c / "keys").mkdir(parents=True)
        for path in settings.keys_dir.iterdir():
            shutil.copy2(path, host_c / "keys" / path.name)
        monkeypatch.setenv("KOLM_HOME", str(host_c))
        assert main(["swap", "--task", TASK, "--cid", second, "--strategy", "force"]) == 0
        assert converge(replicas, key, second) <= CONVERGE_S
        assert main(["rollback", "--task", TASK]) == 0
        assert converge(replicas, key, first) <= CONVERGE_S
        rows = CaptureStore(pg_url).registry_rows(TASK)
        assert [(row.decision, row.from_cid, row.to_cid) for row in rows[:2]] == [
            ("rollback", second, first), ("swap", first, second)]

        # A row naming an artifact that host B cannot verify (signed by a key no deployment published): refused
        # there, the previous adapter keeps serving, and /healthz says why.
        rogue = signed_artifact(tmp_path / "rogue.kolm", keys_dir=tmp_path / "rogue-keys", task=TASK, labels=LABELS,
                                adapter_dir=tmp_path / "adapter1", base_digest=digest, salt="rogue")
        rogue_cid = cid_for_file(rogue)
        prefix = shared["KOLM_ARTIFACTS_URL"].removeprefix(f"s3://{BUCKET}/")
        boto3.client("s3", endpoint_url=seaweedfs, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY).upload_file(
            str(rogue), BUCKET, f"{prefix}/{artifact_key(TASK, rogue_cid)}")
        CaptureStore(pg_url).add_registry_row(task=TASK, from_cid=first, to_cid=rogue_cid, k_before=None,
                                              k_after=None, decision="swap", actor="mallory", details={})

        def refused_everywhere() -> bool:
            return all(any(r["cid"] == rogue_cid for r in httpx.get(f"{replica.url}/healthz").json()["refusals"])
                       for replica in replicas)

        wait_until(refused_everywhere, timeout=30, what="both replicas to refuse the unverifiable artifact")
        health = httpx.get(f"{replicas[0].url}/healthz").json()
        [refusal] = [r for r in health["refusals"] if r["cid"] == rogue_cid]
        assert "does not verify" in refusal["reason"] and "acme" not in str(health)
        assert all(replica.serving(key) == first for replica in replicas)
    finally:
        for replica in replicas:
            replica.stop()

    # Host B never held host A's keys, pointers or work files: only what it fetched by CID.
    assert not (host_b / "adapters").exists() or not any((host_b / "adapters").iterdir())
    assert not list(host_b.rglob("*.key"))
    assert {path.name for path in (host_b / "artifacts" / TASK).glob("*.kolm")} <= {f"{first}.kolm",
                                                                                   f"{second}.kolm",
                                                                                   f"{rogue_cid}.kolm"}


def _file_digests(root: Path) -> dict[str, str]:
    import hashlib

    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


DISTILL = """
import json, sys
from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace
from kolm_pipeline.settings import load_settings
instance = ensure_instance(load_settings())
result, _ = materialize_namespace(instance, sys.argv[1], json.loads(sys.argv[2]), tags={"kolm/actor": "host-a"})
sys.exit(0 if result.success else 1)
"""


def test_distills_through_dagster_on_postgres_reach_the_replicas_and_namespaces_stay_apart(
        seaweedfs, pg_url, pg_databases, tiny_base, tmp_path, monkeypatch):  # noqa: F811
    """Host A captures two namespaces and runs both distills through Dagster on a PostgreSQL instance at the same
    time (one in this process, one in another); host B's two replicas serve each namespace's adapter within 2 s
    of its deployment, and the other namespace's run changes nothing of the first."""
    from kolm_pipeline.defs.launch import STAGES, ensure_instance, materialize_namespace
    from kolm_pipeline.demo.tickets import generate_tickets
    from kolm_pipeline_tests.conftest import AUTO_REPLY, capture_tickets
    from kolm_pipeline_tests.test_assets import TINY_RUN
    from kolm_pipeline_tests.test_instance_postgres import PG_HOST, PG_USER, _production_instance_yaml

    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    shared = {"KOLM_STORE_URL": pg_url, "KOLM_ARTIFACTS_URL": f"s3://{BUCKET}/loop-{uuid.uuid4().hex[:6]}",
              "AWS_ENDPOINT_URL": seaweedfs, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
              "AWS_DEFAULT_REGION": "us-east-1"}
    dagster_home = host_a / "dagster"
    _production_instance_yaml(dagster_home)
    host_a_env = {**shared, "KOLM_HOME": str(host_a), "DAGSTER_HOME": str(dagster_home), "KOLM_BASE_MODEL":
                  str(tiny_base), "DAGSTER_PG_USERNAME": PG_USER, "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_HOST":
                  PG_HOST, "DAGSTER_PG_DB": pg_databases["dagster"], "HF_HUB_OFFLINE": "1",
                  # Both runs log to one MLflow: on PostgreSQL, as in production (SQLite would lock).
                  "KOLM_MLFLOW_URI": f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{pg_databases['mlflow']}"}
    clean_env(monkeypatch, **host_a_env)
    # MLflow keeps the tracking URI a run set in its module and in MLFLOW_TRACKING_URI: put both back afterwards,
    # or the next test's runs would log to this test's dropped database.
    import mlflow

    # (Not `get_tracking_uri()`: that resolves the default, a SQLite file in the working directory, and setting
    # it back would create that file; None unsets both.)
    previous_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = CaptureStore(pg_url)
    key = store.create_tenant("acme")
    for namespace, seed in (("support", 11), ("billing", 12)):
        capture_tickets(store, "acme", namespace, generate_tickets(160, seed=seed), reply=AUTO_REPLY)
        store.add_rule("acme", namespace, "keep", {"status": "ok"}, actor="test")

    replicas = [Replica(host_b, shared, tiny_base) for _ in range(2)]
    try:
        for replica in replicas:
            wait_until(replica.ready, timeout=120, interval=0.2, what="a replica of host B to start")
        other = subprocess.Popen([sys.executable, "-c", DISTILL, "acme.billing", json.dumps(TINY_RUN)],
                                 env={**os.environ, **host_a_env})
        instance = ensure_instance(load_settings(host_a))
        try:
            result, outcomes = materialize_namespace(instance, "acme.support", TINY_RUN, tags={"kolm/actor": "test"})
            assert result.success and [o.status for o in outcomes] == ["success"] * len(STAGES)
            deployed = instance.get_latest_materialization_event(
                dg.AssetKey("deployment")).asset_materialization.metadata["artifact_cid"].value
        finally:
            instance.dispose()
        support_served = converge(replicas, key, deployed, task="acme.support")
        support_files = _file_digests(host_a / "work" / "acme.support")
        assert other.wait(timeout=600) == 0  # the other namespace's run, on the same instance, at the same time
        billing = CaptureStore(pg_url).champions()["acme.billing"]
        assert billing and billing != deployed
        converge(replicas, key, billing, task="acme.billing")
    finally:
        for replica in replicas:
            replica.stop()
        mlflow.set_tracking_uri(previous_tracking_uri)
    print(f"replicas served the distilled adapter {support_served:.2f} s after the run ended")
    assert support_served <= CONVERGE_S
    # The other namespace's run changed nothing of the first: its files, its champion, its registry rows.
    assert _file_digests(host_a / "work" / "acme.support") == support_files
    assert CaptureStore(pg_url).champions()["acme.support"] == deployed
    assert {row.to_cid for row in CaptureStore(pg_url).registry_rows("acme.support")} == {deployed}


STAGES_ON_A_HOST = """
import json, sys
from kolm_pipeline.defs.launch import ensure_instance, materialize_namespace, failure_messages
from kolm_pipeline.settings import load_settings
instance = ensure_instance(load_settings())
result, _ = materialize_namespace(instance, sys.argv[1], json.loads(sys.argv[2]), tags={"kolm/actor": "pod"},
                                  stages=sys.argv[3].split(","))
print("\\n".join(failure_messages(result)))
sys.exit(0 if result.success else 1)
"""


def _objects(client, prefix: str) -> dict[str, tuple[str, object]]:
    """Every object under `prefix`, with its ETag and when it was last written (an overwrite with the same bytes
    keeps the ETag, not the time)."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({item["Key"]: (item["ETag"], item["LastModified"]) for item in page.get("Contents", [])})
    return found


def test_each_stage_on_its_own_host_reads_its_inputs_by_cid(seaweedfs, pg_url, pg_databases, tiny_base,  # noqa: F811
                                                            tmp_path, monkeypatch):
    """Issue 24: every stage of one distill runs on a host of its own (an empty KOLM_HOME each, as a run pod per
    step would), sharing only PostgreSQL, the object store and the signing key (a mounted Secret, copied to each
    host): each reads its inputs by CID, the deployed artifact carries the whole receipt chain and verifies, a retried
    run overwrites no object, and after the window no object in the bucket holds a capture's text."""
    from kolm_pipeline.demo.tickets import generate_tickets
    from kolm_pipeline.provenance.keys import ensure_tenant_keys
    from kolm_pipeline.provenance.products import directory_cid
    from kolm_pipeline.provenance.receipts import read_statement
    from kolm_pipeline.registry.artifact import read_kolm
    from kolm_pipeline_tests.conftest import AUTO_REPLY, capture_tickets
    from kolm_pipeline_tests.test_assets import TINY_RUN
    from kolm_pipeline_tests.test_instance_postgres import PG_HOST, PG_USER, _production_instance_yaml

    prefix = f"pods-{uuid.uuid4().hex[:6]}"
    secret = tmp_path / "secret"
    ensure_tenant_keys(secret, "acme")
    shared = {"KOLM_STORE_URL": pg_url, "KOLM_ARTIFACTS_URL": f"s3://{BUCKET}/{prefix}",
              "AWS_ENDPOINT_URL": seaweedfs, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
              "AWS_DEFAULT_REGION": "us-east-1", "KOLM_BASE_MODEL": str(tiny_base), "HF_HUB_OFFLINE": "1",
              "DAGSTER_PG_USERNAME": PG_USER, "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_HOST": PG_HOST,
              "DAGSTER_PG_DB": pg_databases["dagster"],
              "KOLM_MLFLOW_URI": f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{pg_databases['mlflow']}"}
    clean_env(monkeypatch, **shared)
    store = CaptureStore(pg_url)
    store.create_tenant("acme")
    tickets = generate_tickets(160, seed=21)
    capture_tickets(store, "acme", "support", tickets, reply=AUTO_REPLY)
    store.add_rule("acme", "support", "keep", {"status": "ok"}, actor="test")

    def host(name: str) -> dict[str, str]:
        home = tmp_path / name
        keys = home / "secret-mount"
        shutil.copytree(secret, keys)
        dagster_home = home / "dagster"
        _production_instance_yaml(dagster_home)
        return {**os.environ, **shared, "KOLM_HOME": str(home), "KOLM_KEYS_DIR": str(keys),
                "DAGSTER_HOME": str(dagster_home)}

    def run_on(name: str, stages: str) -> None:
        done = subprocess.run([sys.executable, "-c", STAGES_ON_A_HOST, "acme.support", json.dumps(TINY_RUN), stages],
                              env=host(name), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{name} ({stages}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    run_on("pod-corpus", "triaged_captures,corpus,recipe")
    recipe = store.latest_product("acme.support", "recipe")
    run_on("pod-adapter", "adapter")
    adapter = store.latest_product("acme.support", "adapter")
    run_on("pod-evaluate", "evaluation")
    run_on("pod-deploy", "deployment")

    deployed = store.champions("acme.support")["acme.support"]
    assert deployed is not None
    # The deploying host fetched what the chain names, by CID; it never saw the other hosts' directories.
    deploy_work = tmp_path / "pod-deploy" / "work" / "acme.support"
    assert directory_cid(deploy_work / "adapter") == adapter.cid and directory_cid(deploy_work / "recipe") == recipe.cid
    artifact = read_kolm(next((tmp_path / "pod-deploy" / "artifacts" / "acme.support").glob("*.kolm")))
    stages = [read_statement(envelope)["predicate"]["stage"] for envelope in artifact.receipts]
    assert stages[:4] == ["corpus", "recipe", "adapter", "evaluation"]
    assert artifact.manifest["adapter_cid"] == adapter.cid and artifact.manifest["recipe_cid"] == recipe.cid
    # Any host verifies it with the public key alone (`kolm verify` reads the registry and the object store).
    verifier = host("laptop")
    for private in Path(verifier["KOLM_KEYS_DIR"]).glob("*.key"):
        private.unlink()
    checked = subprocess.run([sys.executable, "-m", "kolm_pipeline.cli", "verify", deployed, "--task", "acme.support"],
                             env=verifier, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # A retried run writes new products beside the old ones: no object is overwritten or removed.
    client = boto3.client("s3", endpoint_url=seaweedfs, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY)
    before = _objects(client, f"{prefix}/products/")
    run_on("pod-retry", "triaged_captures,corpus,recipe")
    after = _objects(client, f"{prefix}/products/")
    assert {key: after.get(key) for key in before} == before
    assert store.latest_product("acme.support", "recipe").id > recipe.id

    # After the window, the products holding capture text are gone from the bucket; the adapter and evaluation stay.
    from datetime import timedelta

    from kolm_pipeline.settings import load_settings
    from kolm_pipeline.stages.retention import sweep_retention

    sweeper = load_settings(tmp_path / "pod-sweep")
    swept = sweep_retention(sweeper, store, now=store.clock() + timedelta(days=31))
    assert any(item.startswith("corpus ") for item in swept.work_files["acme.support"])
    left = _objects(client, f"{prefix}/products/")
    assert f"{prefix}/products/{adapter.cid}" in left
    for key in left:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode("utf-8", "replace")
        assert not any(ticket.text in body for ticket in tickets), f"{key} still holds a capture's text"
