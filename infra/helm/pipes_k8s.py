"""GPU training for the `adapter` asset on Kubernetes, through Dagster Pipes and `dagster_k8s.PipesK8sClient`.

As shipped, `kolm_pipeline/defs/definitions.py` binds the resource `pipes_subprocess_client` to
`dg.PipesSubprocessClient(env=TRAINER_ENV)` and the `adapter` asset runs
`pipes_subprocess_client.run(command=[sys.executable, "-m", "kolm_pipeline.train.pipes_entry"], context=context,
extras=job)`: training happens inside the run's own pod. To train on a GPU node instead:

1. Copy this module into the package (e.g. `kolm_pipeline/defs/pipes_k8s.py`: infra/ is not installed in the
   image) and, in `defs/definitions.py`, swap the resource for this client::

       from kolm_pipeline.defs.pipes_k8s import gpu_training_client

       resources={..., "pipes_subprocess_client": gpu_training_client()}

   (the key may stay the same; rename it, e.g. `pipes_k8s_client`, together with the asset's parameter).

2. In the `adapter` asset, annotate the parameter as `PipesK8sClient` and pass the trainer image, the command
   and the pod spec (this is `launch_training` below)::

       result = pipes_k8s_client.run(
           context=context,
           extras=job,
           image=TRAINER_IMAGE,
           command=["python", "-m", "kolm_pipeline.train.pipes_entry"],
           base_pod_spec=base_pod_spec,
       )
       reported = result.get_materialize_result()

   Everything after that (metrics, receipt, metadata) is unchanged: the training pod reports the same Pipes
   materialization as the subprocess did.

The training pod runs infra/Dockerfile.trainer on a node with an NVIDIA GPU (`nvidia.com/gpu: 1`, GPU node
selector and toleration). It mounts the `kolm-home` claim at the same path as the code location and its run
pods, because the Pipes job carries absolute paths under KOLM_HOME (train split, output dir, base model, MLflow
artifacts); the claim must therefore be ReadWriteMany. Pipes messages come back through the pod's logs
(PipesK8sPodLogsMessageReader, the client's default), so the run pod's service account needs to create pods and
read their logs: the Dagster chart's user-deployments Role allows both.

Importable only where `dagster-k8s` is installed (it is a dependency of kolm pipeline).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_k8s import PipesK8sClient

from kolm_pipeline.train.distill import TRAINER_ENV

#: Trainer image (infra/Dockerfile.trainer); set KOLM_TRAINER_IMAGE on the code location (infra/helm/values.yaml).
TRAINER_IMAGE = os.environ.get("KOLM_TRAINER_IMAGE", "registry.example.com/kolm/kolm-trainer:0.1.0")
#: The trainer's command; it replaces the image's ENTRYPOINT with the same module.
TRAINER_COMMAND = ["python", "-m", "kolm_pipeline.train.pipes_entry"]
#: KOLM_HOME: same path as in infra/Dockerfile and the code location, on the same ReadWriteMany claim.
KOLM_HOME = os.environ.get("KOLM_HOME", "/var/lib/kolm")
KOLM_HOME_CLAIM = os.environ.get("KOLM_HOME_PVC", "kolm-home")
#: uid/gid of the `kolm` user of both images.
KOLM_UID = 10001

#: Pod spec of the training pod (camelCase keys, as in a Kubernetes manifest; the client also accepts snake_case).
#: `image` and `command` given to `PipesK8sClient.run` override those of the first container.
base_pod_spec: dict[str, Any] = {
    "containers": [
        {
            "name": "trainer",
            "image": TRAINER_IMAGE,
            "resources": {
                "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
            },
            "env": [
                {"name": "KOLM_HOME", "value": KOLM_HOME},
                {"name": "HF_HUB_OFFLINE", "value": "1"},
                {"name": "PYTHONUNBUFFERED", "value": "1"},
            ],
            # MLflow / S3 credentials, when the tracking server needs them (optional).
            "envFrom": [{"secretRef": {"name": "kolm-secrets", "optional": True}}],
            "volumeMounts": [
                {"name": "kolm-home", "mountPath": KOLM_HOME},
                # Data loader workers and NCCL use shared memory; the default 64 MiB is too small.
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }
    ],
    "volumes": [
        {"name": "kolm-home", "persistentVolumeClaim": {"claimName": KOLM_HOME_CLAIM}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ],
    # GPU nodes: the label set by NVIDIA GPU feature discovery, and the usual taint of GPU node pools.
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "securityContext": {"runAsUser": KOLM_UID, "runAsGroup": KOLM_UID, "fsGroup": KOLM_UID},
    "restartPolicy": "Never",
}

#: Labels of the training pod, to find it with `kubectl get pods -l app.kubernetes.io/component=kolm-trainer`.
base_pod_meta: dict[str, Any] = {"labels": {"app.kubernetes.io/component": "kolm-trainer"}}


def gpu_training_client() -> PipesK8sClient:
    """The Pipes client that replaces `pipes_subprocess_client` in `defs/definitions.py`.

    `env` is set on the training container on top of the Pipes bootstrap variables: the allocator settings the
    trainer process is run with locally (`TRAINER_ENV`). Kubernetes configuration is detected: in-cluster in a
    run pod, the kubeconfig elsewhere.
    """
    return PipesK8sClient(env=TRAINER_ENV, poll_interval=5.0)


def launch_training(
    client: PipesK8sClient,
    context: dg.AssetExecutionContext,
    job: Mapping[str, Any],
    *,
    image: str = TRAINER_IMAGE,
    namespace: str | None = None,
) -> dg.MaterializeResult:
    """Run one training pod for the `adapter` asset and return the materialization it reported.

    `job` is the Pipes extras built by `kolm_pipeline.stages.adapter.training_job`. The pod is deleted when it ends
    (`delete_pod_on_completion`); `namespace` defaults to the run pod's own.
    """
    result = client.run(
        context=context,
        extras=dict(job),
        image=image,
        command=TRAINER_COMMAND,
        namespace=namespace,
        base_pod_meta=copy.deepcopy(base_pod_meta),
        base_pod_spec=copy.deepcopy(base_pod_spec),
    )
    return result.get_materialize_result()
