"""The production files under infra/, checked offline (no docker, no cluster): dagster.yaml and workspace.yaml
against Dagster's own config schemas, the compose file's references, the Dockerfiles' build context, the Helm
values' launcher and code location, and the GPU training pod that PipesK8sClient would create."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
REPO = INFRA.parent
PG_ENV = {"DAGSTER_PG_USERNAME": "kolm", "DAGSTER_PG_PASSWORD": "pw", "DAGSTER_PG_HOST": "postgres",
          "DAGSTER_PG_DB": "dagster"}


def _yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _compose() -> dict:
    return _yaml("docker-compose.yml")


def test_dagster_yaml_is_a_valid_postgres_instance(tmp_path, monkeypatch):
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes.config_class import class_from_code_pointer
    from dagster_postgres import DagsterPostgresStorage

    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copy(INFRA / "dagster.yaml", tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))  # raises on an unknown top-level key or a bad value

    def section_errors(klass, section_config) -> list:
        result = process_config(klass.config_type(), section_config)
        return [] if result.success else result.errors

    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    database = storage.value["postgres_db"]  # env: indirection resolved the way Dagster does
    assert (database["hostname"], database["db_name"], database["port"]) == ("postgres", "dagster", 5432)
    assert database["scheme"] == "postgresql+psycopg2"
    assert config["telemetry"] == {"enabled": False}
    for section in ("run_coordinator", "run_launcher", "compute_logs", "local_artifact_storage"):
        klass = class_from_code_pointer(config[section]["module"], config[section]["class"])
        assert section_errors(klass, config[section].get("config") or {}) == [], section
    # The same validation refuses a misspelt key.
    coordinator = class_from_code_pointer(config["run_coordinator"]["module"], config["run_coordinator"]["class"])
    assert section_errors(coordinator, {**config["run_coordinator"]["config"], "max_concurent_runs": 2})
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    limits = {limit["key"]: limit["limit"] for limit in config["run_coordinator"]["config"]["tag_concurrency_limits"]}
    assert limits == {"kolm/namespace": 1, "dagster/partition": 1}


def test_workspace_points_at_the_compose_code_server():
    from dagster._core.workspace.config_schema import process_workspace_config

    workspace = _yaml("workspace.yaml")
    assert process_workspace_config(workspace).success
    (server,) = [entry["grpc_server"] for entry in workspace["load_from"]]
    code_server = _compose()["services"][server["host"]]
    command = code_server["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    assert command[command.index("-p") + 1] == str(server["port"])
    assert command[command.index("-m") + 1] == "kolm_pipeline.definitions"
    assert importlib.util.find_spec("kolm_pipeline.definitions") is not None


def test_compose_services_reference_what_exists():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "seaweedfs", "mlflow", "code-server", "dagster-webserver", "dagster-daemon",
            "capture-proxy", "serving"} <= set(services)
    for name, service in services.items():
        assert service.get("image"), f"{name} has no image"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
    # Every variable infra/dagster.yaml reads is set for the Dagster services, and DAGSTER_HOME holds the file.
    env = services["code-server"]["environment"]
    assert set(re.findall(r"env: (\w+)", (INFRA / "dagster.yaml").read_text())) <= set(env)
    assert f"./dagster.yaml:{env['DAGSTER_HOME']}/dagster.yaml:ro" in services["code-server"]["volumes"]
    # The databases that the services name are the ones the init script creates.
    created = set(re.findall(r"CREATE DATABASE (\w+)", (INFRA / "postgres" / "init-databases.sql").read_text()))
    mlflow_uri = next(arg for arg in services["mlflow"]["command"] if arg.startswith("--backend-store-uri="))
    assert mlflow_uri.startswith("--backend-store-uri=postgresql+psycopg2://")
    assert {env["DAGSTER_PG_DB"], mlflow_uri.rsplit("/", 1)[1], env["KOLM_STORE_URL"].rsplit("/", 1)[1]} == created
    # Every ${VAR} without a default is documented in .env.example.
    example = set(re.findall(r"^(\w+)=", (INFRA / ".env.example").read_text(), flags=re.M))
    undefaulted = set(re.findall(r"\$\{(\w+)\}", (INFRA / "docker-compose.yml").read_text()))
    assert undefaulted <= example


def test_healthchecks_hit_routes_the_apps_serve():
    services = _compose()["services"]
    sources = {"capture-proxy": "capture_server.py", "serving": "serve/app.py"}
    for name, source in sources.items():
        probe = " ".join(services[name]["healthcheck"]["test"])
        route = re.search(r"localhost:\d+(/\w+)", probe).group(1)
        assert f'@app.get("{route}")' in (REPO / "kolm_pipeline" / source).read_text(), (name, route)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.trainer"])
def test_dockerfile_copies_only_what_its_context_keeps(dockerfile):
    text = (INFRA / dockerfile).read_text()
    kept = [line[1:].rstrip("/") for line in (INFRA / f"{dockerfile}.dockerignore").read_text().splitlines()
            if line.startswith("!")]
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (REPO / source).exists(), f"{dockerfile} copies missing {source}"
            assert any(source == k or source.startswith(k + "/") for k in kept), f"{source} is not in the context"
    assert 'ARG TORCH_VERSION=2.13.0' in text  # the same pin as pyproject.toml
    assert '"torch==2.13.0"' in (REPO / "pyproject.toml").read_text()


def test_helm_values_run_each_run_as_a_kubernetes_job():
    values = _yaml("helm/values.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    # Keys the chart's schema requires of a K8sRunLauncher config.
    assert {"imagePullPolicy", "loadInclusterConfig", "envConfigMaps", "envSecrets", "envVars", "volumeMounts",
            "volumes"} <= set(launcher)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"] == ["-m", "kolm_pipeline.definitions"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert all(isinstance(value, str) for value in deployment["env"].values())  # the chart's schema: strings
    # Issue 24: no shared volume. KOLM_HOME is each pod's emptyDir, the signing keys a read-only Secret.
    volumes = {volume["name"]: volume for volume in deployment["volumes"]}
    assert not [volume for volume in volumes.values() if "persistentVolumeClaim" in volume]
    assert "emptyDir" in volumes["kolm-home"]
    mounts = {mount["name"]: mount for mount in deployment["volumeMounts"]}
    assert volumes[mounts["kolm-signing-keys"]["name"]]["secret"]["secretName"] == "kolm-signing-keys"
    assert mounts["kolm-signing-keys"]["mountPath"] == deployment["env"]["KOLM_KEYS_DIR"]
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    limits = coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert {limit["key"] for limit in limits} == {"kolm/namespace", "dagster/partition"}


def test_trainer_switch_builds_a_gpu_pod_from_settings(monkeypatch):
    """Issue 24: KOLM_TRAINER=k8s picks PipesK8sClient from inside the package (no file to copy), its pod from
    KOLM_TRAINER_* settings: image, GPUs, node selector, namespace; its KOLM_HOME an emptyDir of its own (no claim:
    it reads its inputs and writes its adapter by CID, in the run's object store)."""
    from dagster_k8s import PipesK8sClient
    from dagster_k8s.pipes import build_pod_body

    from kolm_pipeline.defs.trainer import POD_META, TRAINER_COMMAND, trainer_client, training_pod_spec
    from kolm_pipeline.provenance.errors import InvalidInput
    from kolm_pipeline.settings import load_trainer_config, read_settings

    assert isinstance(trainer_client(load_trainer_config()), dg.PipesSubprocessClient)  # the default
    monkeypatch.setenv("KOLM_TRAINER", "k8s")
    monkeypatch.setenv("KOLM_TRAINER_IMAGE", "registry.example.com/kolm/kolm-trainer:test")
    monkeypatch.setenv("KOLM_TRAINER_GPUS", "2")
    monkeypatch.setenv("KOLM_TRAINER_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-l4"}')
    monkeypatch.setenv("KOLM_TRAINER_NAMESPACE", "kolm-training")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://seaweedfs-s3.kolm.svc.cluster.local:8333")
    config = load_trainer_config()
    client = trainer_client(config)
    settings = read_settings("/var/lib/kolm").model_copy(update={"artifacts_url": "s3://kolm-artifacts/prod"})
    assert isinstance(client, PipesK8sClient) and client.env["MALLOC_MMAP_MAX_"] == "0"
    assert config.namespace == "kolm-training"
    pod = build_pod_body(pod_name="dagster-kolm-train", image=config.image, command=TRAINER_COMMAND,
                         env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
                         base_pod_meta=POD_META, base_pod_spec=training_pod_spec(config, settings))
    (container,) = pod.spec.containers
    assert container.image == "registry.example.com/kolm/kolm-trainer:test"
    assert container.command == ["python", "-m", "kolm_pipeline.train.pipes_entry"]
    assert importlib.util.find_spec("kolm_pipeline.train.pipes_entry") is not None
    assert container.resources.requests["nvidia.com/gpu"] == container.resources.limits["nvidia.com/gpu"] == "2"
    assert pod.spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert any(t.key == "nvidia.com/gpu" for t in pod.spec.tolerations)
    assert {(m.name, m.mount_path) for m in container.volume_mounts} >= {("kolm-home", "/var/lib/kolm")}
    assert not [v for v in pod.spec.volumes if v.persistent_volume_claim]
    assert {v.name for v in pod.spec.volumes if v.empty_dir} == {"kolm-home", "dshm"}
    env = {e.name: e.value for e in container.env}
    assert env["KOLM_ARTIFACTS_URL"] == "s3://kolm-artifacts/prod" and env["KOLM_HOME"] == "/var/lib/kolm"
    assert env["KOLM_BASE_MODEL"] == settings.base_model
    assert env["AWS_ENDPOINT_URL_S3"] == "http://seaweedfs-s3.kolm.svc.cluster.local:8333"  # the run pod's S3
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"} <= set(env)
    assert pod.spec.restart_policy == "Never" and pod.metadata.labels["app.kubernetes.io/component"] == "kolm-trainer"

    monkeypatch.setenv("KOLM_TRAINER_GPUS", "0")  # a CPU training pod: no GPU request, no toleration
    cpu = training_pod_spec(load_trainer_config(), settings)
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["requests"] and "tolerations" not in cpu
    monkeypatch.setenv("KOLM_TRAINER", "gpu")
    with pytest.raises(InvalidInput, match="KOLM_TRAINER: Input should be 'subprocess' or 'k8s'"):
        load_trainer_config()


def test_kubernetes_serve_and_proxy_need_no_shared_volume():
    """Issue 24: serving replicas follow the registry (no RWX claim, a cache of their own); each capture proxy pod
    keeps its journal on a volume of its own and routes to the serve Service."""
    serve = list(yaml.safe_load_all((INFRA / "k8s" / "kolm-serve.yaml").read_text()))
    deployment = next(doc for doc in serve if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["kolm", "serve"] and args[args.index("--follow") + 1] == "registry"
    assert deployment["spec"]["replicas"] >= 2
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["KOLM_ARTIFACTS_URL"].startswith("s3://")

    proxy = list(yaml.safe_load_all((INFRA / "k8s" / "capture-proxy.yaml").read_text()))
    stateful = next(doc for doc in proxy if doc["kind"] == "StatefulSet")
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["kolm", "capture", "serve"]
    assert {m["name"] for m in container["volumeMounts"]} == {claim["metadata"]["name"]}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["KOLM_CAPTURE_SERVE_URL"].startswith("http://kolm-serve.")
    assert env["KOLM_ARTIFACTS_URL"].startswith("s3://")  # captured images go to the object store, not the volume
    for doc in serve + proxy:  # every port a Service targets is a named container port
        if doc["kind"] == "Service":
            assert doc["spec"]["ports"][0]["targetPort"] == "http"
