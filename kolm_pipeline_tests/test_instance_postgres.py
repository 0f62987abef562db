"""The production Dagster instance (infra/dagster.yaml, dagster-postgres) and MLflow's backend store on the
real PostgreSQL at 127.0.0.1:5432: the loop materializes for a namespace on a tiny model, and the runs, the
event log and the MLflow runs are read back through the instance, MLflow and plain SQL. A dagster.yaml
naming a database that does not answer fails in seconds, naming the host."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from dagster._core.run_coordinator import QueuedRunCoordinator

from kolm_pipeline.cli import main as kolm_main
from kolm_pipeline.defs.instance_check import InstanceUnreachable, check_instance_reachable, instance_databases
from kolm_pipeline.defs.launch import STAGES, ensure_instance, materialize_namespace
from kolm_pipeline_tests.test_assets import TINY_RUN

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
ADMIN_URL = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/test"
INFRA_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "infra" / "dagster.yaml"
PARTITION = "acme.support"


def _admin() -> psycopg.Connection:
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture
def pg_databases() -> Iterator[dict[str, str]]:
    """Two fresh databases with a unique name (Dagster's and MLflow's: both keep an `alembic_version` table),
    dropped at the end even when connections are left open."""
    try:
        admin = _admin()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is unreachable at {PG_HOST}:{PG_PORT}: {exc}")
    prefix = f"kolm_instance_{uuid.uuid4().hex[:10]}"
    names = {"dagster": f"{prefix}_dagster", "mlflow": f"{prefix}_mlflow"}
    with admin:
        for name in names.values():
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield names
        finally:
            for name in names.values():
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _production_instance_yaml(dagster_home: Path) -> Path:
    """infra/dagster.yaml as shipped (storage read from DAGSTER_PG_* variables, run queue, launcher,
    telemetry), with only the two container paths moved into the test's directory."""
    config = yaml.safe_load(INFRA_DAGSTER_YAML.read_text())
    config["compute_logs"]["config"]["base_dir"] = str(dagster_home / "compute_logs")
    config["local_artifact_storage"]["config"]["base_dir"] = str(dagster_home / "artifacts")
    dagster_home.mkdir(parents=True, exist_ok=True)
    path = dagster_home / "dagster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sql(database: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}", connect_timeout=3) as conn:
        return conn.execute(query, params).fetchall()


def test_loop_on_postgres_instance_and_mlflow(kolm_settings, autoreply_store, tiny_base, pg_databases, monkeypatch):
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    _production_instance_yaml(dagster_home)
    monkeypatch.setenv("DAGSTER_PG_USERNAME", PG_USER)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "")
    monkeypatch.setenv("DAGSTER_PG_HOST", PG_HOST)
    monkeypatch.setenv("DAGSTER_PG_DB", pg_databases["dagster"])
    mlflow_uri = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{pg_databases['mlflow']}"
    monkeypatch.setenv("KOLM_MLFLOW_URI", mlflow_uri)
    monkeypatch.setenv("KOLM_BASE_MODEL", str(tiny_base))

    instance = ensure_instance(kolm_settings)
    try:
        from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator) and instance.run_monitoring_enabled
        assert [(a.host, a.port) for a in instance_databases(dagster_home)] == [(PG_HOST, PG_PORT)]

        result, outcomes = materialize_namespace(instance, PARTITION, TINY_RUN, tags={"kolm/actor": "test"})
        assert result.success, [o for o in outcomes if o.status != "success"]
        assert [o.status for o in outcomes] == ["success"] * len(STAGES)

        # Read back through the instance (PostgreSQL run storage and event log).
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == PARTITION and run.tags["kolm/actor"] == "test"
        materialized = {
            record.asset_key.path[-1]
            for record in instance.get_records_for_run(
                result.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records
        }
        assert materialized == set(STAGES)
        deployment = instance.get_latest_materialization_event(dg.AssetKey("deployment")).asset_materialization
        assert deployment.partition == PARTITION
        artifact_cid = deployment.metadata["artifact_cid"].value
        adapter = instance.get_latest_materialization_event(dg.AssetKey("adapter")).asset_materialization
        training_run_id = adapter.metadata["mlflow_run_id"].value
        assert instance.get_dynamic_partitions("kolm_namespace") == [PARTITION]
    finally:
        instance.dispose()

    # The same facts straight from Dagster's tables.
    database = pg_databases["dagster"]
    assert _sql(database, "SELECT status FROM runs WHERE run_id = %s", result.run_id) == [("SUCCESS",)]
    rows = _sql(database, "SELECT asset_key, partition FROM event_logs WHERE run_id = %s "
                "AND dagster_event_type = 'ASSET_MATERIALIZATION'", result.run_id)
    assert sorted(rows) == sorted((f'["{stage}"]', PARTITION) for stage in STAGES)
    checks = _sql(database, "SELECT count(*) FROM event_logs WHERE run_id = %s "
                  "AND dagster_event_type = 'ASSET_CHECK_EVALUATION'", result.run_id)
    assert checks == [(6,)]  # k_gate, collapse_tripwire and the four data checks on corpus and recipe
    assert _sql(database, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'kolm_namespace'") \
        == [(PARTITION,)]

    # MLflow's backend store is PostgreSQL: the Dagster run's MLflow run and its training, evaluation and
    # deployment children are there, with their metrics, and deployment moved the `champion` alias to the
    # deployed artifact's model version, made from the training run.
    database = pg_databases["mlflow"]
    runs = dict(_sql(
        database,
        "SELECT r.name, r.run_uuid FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
        "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'dagster_run_id' "
        "WHERE e.name = %s AND t.value = %s AND r.status = 'FINISHED'",
        f"kolm/{PARTITION}", result.run_id,
    ))
    parent = next(name for name in runs if name.startswith("dagster "))
    assert set(runs) == {parent, "training", "evaluation", "deployment"}
    assert runs["training"] == training_run_id
    metrics = {name: value for name, value in _sql(
        database, "SELECT key, value FROM latest_metrics WHERE run_uuid = %s", runs["evaluation"])}
    assert metrics["gate.swap"] == 1.0 and metrics["candidate.k"] > metrics["current.k"]
    assert any(key.startswith("train.") for (key,) in _sql(
        database, "SELECT key FROM latest_metrics WHERE run_uuid = %s", runs["training"]))
    champion = _sql(database, "SELECT a.name, v.run_id FROM registered_model_aliases a "
                    "JOIN model_versions v ON v.name = a.name AND v.version = a.version "
                    "JOIN model_version_tags t ON t.name = a.name AND t.version = a.version "
                    "WHERE a.alias = 'champion' AND t.value = %s", artifact_cid)
    assert champion == [(f"kolm-{PARTITION}", training_run_id)]

    from mlflow import MlflowClient

    found = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name(f"kolm/{PARTITION}").experiment_id],
        filter_string=f"tags.dagster_run_id = '{result.run_id}'",
    )
    assert sorted(run.info.run_name for run in found) == sorted(runs)


# --- a dagster.yaml naming a database that does not answer -------------------------------------------------


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a database host that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@pytest.mark.parametrize("where", ["unknown-host", "closed-port", "silent-host"])
def test_unreachable_database_fails_fast_naming_the_host(where, kolm_settings, silent_listener, monkeypatch):
    host, port = {
        "unknown-host": ("dagster-db.invalid", 5432),
        "closed-port": ("127.0.0.1", _closed_port()),
        "silent-host": ("127.0.0.1", silent_listener),
    }[where]
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    config = _production_instance_yaml(dagster_home)
    # The shipped file reads the host from $DAGSTER_PG_HOST and fixes the port at 5432.
    config.write_text(config.read_text().replace("port: 5432", f"port: {port}"))
    monkeypatch.setenv("DAGSTER_PG_USERNAME", PG_USER)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "secret")
    monkeypatch.setenv("DAGSTER_PG_HOST", host)
    monkeypatch.setenv("DAGSTER_PG_DB", "dagster")

    began = time.monotonic()
    with pytest.raises(InstanceUnreachable) as raised:
        ensure_instance(kolm_settings)
    assert time.monotonic() - began < 10
    message = str(raised.value)
    assert f"{host}:{port}" in message and str(config) in message and "storage.postgres.postgres_db" in message
    assert "secret" not in message


def test_url_form_of_the_older_per_storage_config_is_checked_too(kolm_settings, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("KOLM_TEST_PG_URL", f"postgresql://kolm:pw@127.0.0.1:{port}/dagster")
    storage = {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage",
               "config": {"postgres_url": {"env": "KOLM_TEST_PG_URL"}}}
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump({"run_storage": storage}))
    with pytest.raises(InstanceUnreachable, match=rf"127\.0\.0\.1:{port} \(run_storage\.config\.postgres_url\)"):
        check_instance_reachable(dagster_home)


def test_distill_on_unreachable_instance_is_one_line(kolm_settings, capsys, monkeypatch):
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    _production_instance_yaml(dagster_home)
    monkeypatch.setenv("DAGSTER_PG_USERNAME", PG_USER)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "")
    monkeypatch.setenv("DAGSTER_PG_HOST", "dagster-db.invalid")
    monkeypatch.setenv("DAGSTER_PG_DB", "dagster")

    began = time.monotonic()
    assert kolm_main(["distill", "--namespace", PARTITION]) == 1
    assert time.monotonic() - began < 10
    err = capsys.readouterr().err
    assert err.startswith("kolm: error: ") and "dagster-db.invalid:5432" in err and "Traceback" not in err


def test_unset_environment_variable_is_named(kolm_settings, monkeypatch):
    _production_instance_yaml(Path(os.environ["DAGSTER_HOME"]))
    for name in ("DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "dagster")
    monkeypatch.delenv("DAGSTER_PG_HOST", raising=False)
    with pytest.raises(ValueError, match=r"postgres_db\.hostname reads \$DAGSTER_PG_HOST, which is not set"):
        check_instance_reachable(os.environ["DAGSTER_HOME"])


def test_sqlite_instance_needs_no_database(kolm_settings):
    assert check_instance_reachable(kolm_settings.dagster_home) == []
    ensure_instance(kolm_settings).dispose()
