"""Offline checks of Kubernetes objects against what a digilut run needs: the "restricted" pod
profile (``pod_spec_violations``), the objects a run references in its namespace
(``missing_references``) and who NetworkPolicies let in (``ingress_allowed``).
``tests/unit/test_deploy.py`` runs them on every rendered manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import yaml

from digilut.k8s import KFP_LAUNCHER_CONFIGMAP

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


def pod_labels_of(obj: Mapping[str, Any]) -> Mapping[str, str]:
    """The labels of the pods a workload object makes (its pod template's), or a Pod's own."""
    path = _POD_SPEC_PATHS.get(str(obj.get("kind")))
    if path is None:
        raise ValueError(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: not a workload with pods")
    node: Any = obj
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, Mapping) else None
    return ((node or {}).get("metadata") or {}).get("labels") or {}


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


# --- what a run needs in its namespace -------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRef:
    """A namespaced object something refers to by name (and the keys of its data it reads)."""

    kind: str
    name: str
    keys: frozenset[str] = frozenset()
    by: str = ""

    def __str__(self) -> str:
        keys = f" keys {sorted(self.keys)}" if self.keys else ""
        return f"{self.kind}/{self.name}{keys} (used by {self.by})"


def _constant_name(ref: Mapping[str, Any], field: str) -> str:
    """A kfp-kubernetes object name: the literal field, else the constant its ...NameParameter holds."""
    if ref.get(field):
        return str(ref[field])
    param = ref.get(f"{field}Parameter") or {}
    constant = (param.get("runtimeValue") or {}).get("constant")
    # a name chosen at run time (a pipeline parameter) cannot be checked offline: report it as missing
    return str(constant) if constant else f"<run-time parameter {param}>"


def pipeline_references(platform_spec: Mapping[str, Any]) -> list[ObjectRef]:
    """The Secrets and ConfigMaps the tasks of a compiled pipeline read (its ``platforms: kubernetes`` doc).

    Reads every executor's kfp-kubernetes fields: ``secretAsEnv``/``secretAsVolume``,
    ``configMapAsEnv``/``configMapAsVolume`` (with the keys mapped to variables) and ``imagePullSecret``.
    """
    executors = (platform_spec.get("kubernetes") or {}).get("deploymentSpec", {}).get("executors", {})
    refs: list[ObjectRef] = []
    for executor, spec in executors.items():
        for kind, prefix, key_field in (
            ("Secret", "secret", "secretKey"),
            ("ConfigMap", "configMap", "configMapKey"),
        ):
            for field in (f"{prefix}AsEnv", f"{prefix}AsVolume"):
                for ref in spec.get(field) or []:
                    keys = frozenset(str(k[key_field]) for k in ref.get("keyToEnv") or [])
                    refs.append(
                        ObjectRef(kind, _constant_name(ref, f"{prefix}Name"), keys, f"{executor} {field}")
                    )
        for ref in spec.get("imagePullSecret") or []:
            refs.append(
                ObjectRef("Secret", _constant_name(ref, "secretName"), by=f"{executor} imagePullSecret")
            )
    return refs


def launcher_references(launcher: Mapping[str, Any]) -> list[ObjectRef]:
    """The Secrets a ``kfp-launcher`` ConfigMap points the launcher at: the ``secretRef`` of each provider."""

    def walk(node: Any, path: str) -> Iterator[ObjectRef]:
        if isinstance(node, Mapping):
            ref = node.get("secretRef")
            if isinstance(ref, Mapping):
                keys = frozenset(str(v) for k, v in ref.items() if k != "secretName")
                yield ObjectRef(
                    "Secret", str(ref.get("secretName")), keys, f"{KFP_LAUNCHER_CONFIGMAP} {path}"
                )
            for key, value in node.items():
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{path}[{i}]")

    providers = yaml.safe_load((launcher.get("data") or {}).get("providers") or "{}")
    return list(walk(providers, "providers"))


def missing_references(
    objects: Iterable[Mapping[str, Any]], namespace: str, refs: Iterable[ObjectRef]
) -> list[str]:
    """What of ``refs`` is not among ``objects`` in ``namespace``: absent objects and absent data keys.

    A ServiceAccount found brings its ``imagePullSecrets`` in as further references. Empty means complete.
    """
    found = {
        (o["kind"], o["metadata"]["name"]): o
        for o in objects
        if o.get("metadata", {}).get("namespace") == namespace
    }
    todo, out = list(refs), []
    while todo:
        ref = todo.pop(0)
        obj = found.get((ref.kind, ref.name))
        if obj is None:
            out.append(f"{ref}: no {ref.kind} {ref.name!r} in namespace {namespace}")
            continue
        present = {*(obj.get("data") or {}), *(obj.get("stringData") or {}), *(obj.get("binaryData") or {})}
        if ref.keys - present:
            out.append(
                f"{ref}: {ref.kind} {ref.name!r} in {namespace} lacks keys {sorted(ref.keys - present)}"
            )
        if ref.kind == "ServiceAccount":
            for pull in obj.get("imagePullSecrets") or []:
                todo.append(
                    ObjectRef("Secret", pull["name"], by=f"ServiceAccount/{ref.name} imagePullSecrets")
                )
    return out


# --- NetworkPolicy ingress, evaluated offline ----------------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects ``labels``; {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op)
        if ok is None:
            raise ValueError(f"label selector operator {op!r}: expected In, NotIn, Exists or DoesNotExist")
        if not ok:
            return False
    return True


def ingress_allowed(
    policies: Iterable[Mapping[str, Any]],
    target: Mapping[str, Any],
    port: int,
    *,
    source_labels: Mapping[str, str],
    source_namespace: str,
    source_namespace_labels: Mapping[str, str] | None = None,
) -> bool:
    """Whether NetworkPolicies let a pod (labels, namespace) open a TCP connection to ``target``'s ``port``.

    ``target`` is a workload (Deployment, StatefulSet, ...) whose pod template gives the labels and the
    named container ports. Kubernetes semantics: a pod no Ingress policy selects accepts everything; one
    that is selected accepts what some rule of a selecting policy allows (no ``from``: any source; no
    ``ports``: any port). A peer with only ``podSelector`` means pods of the policy's namespace. Traffic
    from the node (kubelet probes, port-forward) is outside this model and always allowed.
    """
    target_ns = target["metadata"]["namespace"]
    pod = pod_labels_of(target)
    spec = pod_spec_of(target) or {}
    named = {
        p["name"]: p["containerPort"]
        for c in spec.get("containers", [])
        for p in c.get("ports", [])
        if "name" in p
    }
    ns_labels = {**(source_namespace_labels or {}), "kubernetes.io/metadata.name": source_namespace}

    def peer_ok(peer: Mapping[str, Any]) -> bool:
        if "ipBlock" in peer:
            raise ValueError("ipBlock peers are not modelled: give pod and namespace selectors")
        if "namespaceSelector" in peer:
            ns_ok = selector_matches(peer["namespaceSelector"], ns_labels)
        else:
            ns_ok = source_namespace == target_ns
        return ns_ok and selector_matches(peer.get("podSelector"), source_labels)

    def port_ok(p: Mapping[str, Any]) -> bool:
        want = p.get("port")
        number = named.get(want) if isinstance(want, str) else want
        return p.get("protocol", "TCP") == "TCP" and (want is None or number == port)

    selecting = [
        pol
        for pol in policies
        if pol["kind"] == "NetworkPolicy"
        and pol["metadata"]["namespace"] == target_ns
        and "Ingress" in (pol["spec"].get("policyTypes") or ["Ingress"])
        and selector_matches(pol["spec"].get("podSelector"), pod)
    ]
    if not selecting:
        return True
    return any(
        (not rule.get("from") or any(peer_ok(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(port_ok(p) for p in rule["ports"]))
        for pol in selecting
        for rule in pol["spec"].get("ingress") or []
    )
