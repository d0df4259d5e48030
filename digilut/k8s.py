"""Names shared by the Kubernetes manifests (``manifests/``) and the pipeline that runs beside them.

The pipeline reads these constants to schedule GPU steps and to mount the S3 credentials; the
manifest tests check the manifests use the same names, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

# GPU nodes: the NVIDIA device plugin / GPU operator labels them and advertises the resource; the
# cluster admin taints them so that only pods tolerating the taint land there.
GPU_RESOURCE: Final = "nvidia.com/gpu"
GPU_NODE_SELECTOR: Final = MappingProxyType({"nvidia.com/gpu.present": "true"})
GPU_TOLERATION: Final = MappingProxyType(
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
)

# Set by the pipeline on every task that requests a GPU, to the node's name (downward API
# spec.nodeName, a Kubernetes setting that kfp.local ignores, so local CPU runs are unaffected):
# such a task fails at once when CUDA is unavailable (digilut.model.select_device), naming the node,
# instead of training on the CPU. Any value but ""/0/false/no turns the check on.
REQUIRE_GPU_ENV: Final = "DIGILUT_REQUIRE_GPU"
REQUIRE_GPU_FIELD: Final = "spec.nodeName"

# The numeric non-root user and group of both images (images/*/Dockerfile: USER 10001:10001), which
# every pipeline task also sets in its securityContext (runAsNonRoot); KFP's backend adds
# allowPrivilegeEscalation=false, drop ALL capabilities and seccomp RuntimeDefault itself.
RUN_AS_USER: Final = 10001
RUN_AS_GROUP: Final = 10001

# The ServiceAccount pipeline runs use (bound to the Role in manifests/base/rbac.yaml).
PIPELINE_SERVICE_ACCOUNT: Final = "digilut-pipeline"

# S3 credentials: one Secret whose keys are the environment variable names boto3 reads.
S3_SECRET_NAME: Final = "digilut-s3-credentials"
S3_ACCESS_KEY_KEY: Final = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY_KEY: Final = "AWS_SECRET_ACCESS_KEY"
S3_SECRET_KEYS: Final = (S3_ACCESS_KEY_KEY, S3_SECRET_KEY_KEY)

# Non-secret run-time settings (S3 endpoint/region/bucket, MLflow URI, TensorBoard log dir): one
# ConfigMap whose keys are environment variable names, for ``envFrom`` in servers and pipeline pods.
RUNTIME_CONFIGMAP: Final = "digilut-runtime-env"
RUNTIME_ENV_KEYS: Final = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
    "S3_ENDPOINT",
    "MLFLOW_TRACKING_URI",
    "DIGILUT_BUCKET",
    "DIGILUT_TENSORBOARD_LOGDIR",
)

# The database password of the MLflow backend store (PostgreSQL).
MLFLOW_DB_SECRET_NAME: Final = "digilut-mlflow-db"
MLFLOW_DB_PASSWORD_KEY: Final = "POSTGRES_PASSWORD"

# In-cluster addresses (same namespace) of the servers the manifests deploy.
MLFLOW_PORT: Final = 5000
MLFLOW_TRACKING_URI: Final = f"http://mlflow:{MLFLOW_PORT}"
TENSORBOARD_PORT: Final = 6006

# The KFP launcher reads this ConfigMap in the namespace a run executes in.
KFP_LAUNCHER_CONFIGMAP: Final = "kfp-launcher"

# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES: Final = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
# Workload kinds and the path from the object to its pod spec.
_POD_SPEC_PATHS: Final = MappingProxyType(
    {
        "Pod": ("spec",),
        "Deployment": ("spec", "template", "spec"),
        "StatefulSet": ("spec", "template", "spec"),
        "DaemonSet": ("spec", "template", "spec"),
        "ReplicaSet": ("spec", "template", "spec"),
        "Job": ("spec", "template", "spec"),
        "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    }
)


def pod_spec_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec inside a workload object (Pod, Deployment, StatefulSet, Job, ...), else None."""
    path = _POD_SPEC_PATHS.get(str(obj.get("kind")))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else None


def pod_spec_violations(spec: Mapping[str, Any]) -> list[str]:
    """How a pod spec breaks the "restricted" Pod Security Standard, plus this project's own rules.

    Restricted: non-root (runAsNonRoot, no uid 0), no privilege escalation, capabilities drop ALL
    (only NET_BIND_SERVICE may be added), seccomp RuntimeDefault or Localhost, no privileged container,
    no host namespaces, ports or hostPath, only the allowed volume types. Ours: every container has a
    read-only root filesystem and CPU and memory requests and limits. An empty list means compliant.
    """
    out: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"pod: {key}=true")
    for vol in spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(
                f"volume {vol.get('name')}: type {sorted(kinds - RESTRICTED_VOLUME_TYPES)} not allowed"
            )
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if not containers:
        out.append("pod: no containers")
    for c in containers:
        name = f"container {c.get('name')}"
        sc = c.get("securityContext") or {}

        def eff(key: str, sc: Mapping[str, Any] = sc) -> Any:
            return sc[key] if key in sc else pod_sc.get(key)

        if eff("runAsNonRoot") is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if eff("runAsUser") == 0:
            out.append(f"{name}: runAsUser=0")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
        seccomp = (eff("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile.type={seccomp!r}, want RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem is not true")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in (res.get(kind) or {})]
            if missing:
                out.append(f"{name}: resources.{kind} lacks {', '.join(missing)}")
    return out
