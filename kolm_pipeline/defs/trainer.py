"""Where the `adapter` asset trains: `KOLM_TRAINER=subprocess` (default) runs the trainer as a Dagster Pipes
subprocess where the run runs; `KOLM_TRAINER=k8s` runs one Pipes pod per training on a GPU node
(`dagster_k8s.PipesK8sClient`), built from `settings.TrainerConfig` (`KOLM_TRAINER_IMAGE`, `_GPUS`, `_CPU`,
`_MEMORY`, `_NODE_SELECTOR`, `_NAMESPACE`, `_SCRATCH`). Both run `python -m kolm_pipeline.train.pipes_entry`
and report the same Pipes materialization, so nothing after the call differs.

The training pod shares no volume with the run: its KOLM_HOME is an emptyDir, the Pipes job names the train split
(and a champion to continue from) by CID, which the trainer fetches from the object store (KOLM_ARTIFACTS_URL,
credentials from the `kolm-secrets` Secret), it resolves the base model itself (checking the digest the job
names) and publishes the adapter back by CID. Pipes messages come back through the pod's logs, so the run
pod's service account needs to create pods and read their logs (the Dagster chart's user-deployments Role allows
both). Kubernetes configuration is detected: in-cluster in a run pod, the kubeconfig elsewhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import dagster as dg

from kolm_pipeline.settings import Settings, TrainerConfig, load_settings
from kolm_pipeline.train.distill import TRAINER_ENV

TRAINER_COMMAND = ["python", "-m", "kolm_pipeline.train.pipes_entry"]
# Where the object store is (the keys come from the kolm-secrets Secret): the run pod's values go with the job, or
# boto3 in the training pod would look for the bucket on AWS.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_S3_ENDPOINT_URL")
KOLM_UID = 10001  # the `kolm` user of infra/Dockerfile and infra/Dockerfile.trainer
POD_META: dict[str, Any] = {"labels": {"app.kubernetes.io/component": "kolm-trainer"}}


def trainer_client(config: TrainerConfig) -> dg.PipesClient:
    """The Pipes client the `adapter` asset trains with (the `trainer` resource)."""
    if config.kind == "k8s":
        from dagster_k8s import PipesK8sClient

        return PipesK8sClient(env=TRAINER_ENV, poll_interval=5.0)
    return dg.PipesSubprocessClient(env=TRAINER_ENV)


def training_pod_spec(config: TrainerConfig, settings: Settings) -> dict[str, Any]:
    """The training pod (camelCase keys, as in a manifest): the trainer image, `gpus` NVIDIA GPUs, the node
    selector and the GPU taint's toleration, KOLM_HOME on an emptyDir of its own, the run's object store and base
    model, shared memory for data loaders and NCCL."""
    kolm_home = str(settings.home)
    env = {"KOLM_HOME": kolm_home, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "KOLM_BASE_MODEL": settings.base_model}
    if settings.artifacts_url:
        env["KOLM_ARTIFACTS_URL"] = settings.artifacts_url
    env.update({name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)})
    requests: dict[str, str] = {"cpu": config.cpu, "memory": config.memory}
    limits: dict[str, str] = {"memory": config.memory}
    if config.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(config.gpus)
    spec: dict[str, Any] = {
        "containers": [{
            "name": "trainer",
            "image": config.image,
            "resources": {"requests": requests, "limits": limits},
            "env": [{"name": name, "value": value} for name, value in env.items()],
            # S3 (AWS_*) and MLflow credentials.
            "envFrom": [{"secretRef": {"name": "kolm-secrets", "optional": True}}],
            "volumeMounts": [{"name": "kolm-home", "mountPath": kolm_home}, {"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "kolm-home", "emptyDir": {"sizeLimit": config.scratch}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
        "nodeSelector": dict(config.node_selector),
        "securityContext": {"runAsUser": KOLM_UID, "runAsGroup": KOLM_UID, "fsGroup": KOLM_UID},
        "restartPolicy": "Never",
    }
    if config.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


def run_trainer(client: dg.PipesClient, context: dg.AssetExecutionContext, extras: Mapping[str, Any],
                config: TrainerConfig) -> dg.MaterializeResult:
    """One training through `client`; the materialization the trainer reported. The client's own type says how to
    launch it (the resource was chosen when the definitions loaded); `config` gives the pod its settings."""
    if not isinstance(client, dg.PipesSubprocessClient):
        result = client.run(  # type: ignore[call-arg]
            context=context, extras=dict(extras), image=config.image, command=TRAINER_COMMAND,
            namespace=config.namespace, base_pod_meta=POD_META,
            base_pod_spec=training_pod_spec(config, load_settings()),
        )
    else:
        result = client.run(command=[sys.executable, "-m", "kolm_pipeline.train.pipes_entry"], context=context,
                            extras=dict(extras))
    return result.get_materialize_result()
