"""Names shared by the Kubernetes manifests (``manifests/``) and the pipeline that runs beside them.

The pipeline reads these constants to schedule GPU steps and to mount the S3 credentials; the
manifest tests check the manifests use the same names, so the two cannot drift apart. The checks those
tests run on the manifests live in :mod:`digilut.ops.cluster_checks`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

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

# Where KFP runs a pipeline's pods, and so where kfp-launcher, the Secrets, the ConfigMaps and the
# ServiceAccount they use must be: standalone (single-user) KFP runs them in its own namespace, multi-user
# Kubeflow in the namespace of the user's Profile. manifests/overlays/dev is for standalone KFP,
# manifests/overlays/prod for multi-user Kubeflow (manifests/profile makes the Profile).
KFP_STANDALONE_NAMESPACE: Final = "kubeflow"
PROFILE_NAMESPACE: Final = "digilut"
# `digilut submit`'s default: the namespace the default (dev) overlay deploys into.
DEFAULT_NAMESPACE: Final = KFP_STANDALONE_NAMESPACE

# The ServiceAccount pipeline runs use (bound to the Role in manifests/base/rbac.yaml), and the servers'.
PIPELINE_SERVICE_ACCOUNT: Final = "digilut-pipeline"
SERVER_SERVICE_ACCOUNT: Final = "digilut-server"
# The docker-registry Secret both ServiceAccounts list in imagePullSecrets when an overlay enables
# manifests/components/private-registry.
REGISTRY_SECRET_NAME: Final = "digilut-registry"

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
