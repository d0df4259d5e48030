"""Security rows of issue 7 that need no cluster: no secret value in what we ship (compiled pipelines,
images, manifests), every pipeline task runs as the images' numeric non-root user, and model files
are loaded without unpickling arbitrary objects."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from digilut import k8s

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled"

# What a leaked credential looks like: AWS access key ids, 40-character AWS-style secret keys (mixed
# case base64), private keys, and key=value / key: value assignments of secret-ish names to a literal.
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_40 = re.compile(
    r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
)
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_ASSIGNED = re.compile(
    r"""(?ix)(?<![A-Za-z0-9_])(?:aws_secret_access_key|secret_access_key|secret_key|password|passwd|token)
    ["']?\s*[:=]\s*["']?(?P<value>[^\s"',}]+)"""
)
# Values that name a secret or stand in for one, never a secret itself.
_PLACEHOLDERS = re.compile(
    r"^(?:\$\{?[A-Z_]+\}?|<[^>]*>|CHANGE_ME|changeme-.*|\{\{.*\}\}|null|none|true|false|\"\"|'')$", re.I
)


def _tracked(*dirs: str) -> list[Path]:
    proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", *dirs], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return [ROOT / p for p in proc.stdout.split()]


def secret_findings(text: str) -> list[str]:
    """Things in ``text`` that look like a secret value (not a secret's name)."""
    found = [m.group(0) for m in _ACCESS_KEY_ID.finditer(text)]
    found += [m.group(0) for m in _SECRET_40.finditer(text)]
    found += [m.group(0) for m in _PRIVATE_KEY.finditer(text)]
    for m in _ASSIGNED.finditer(text):
        value = m.group("value")
        # a reference to a Secret key or an env var name is fine: AWS_SECRET_ACCESS_KEY, POSTGRES_PASSWORD
        if not _PLACEHOLDERS.match(value) and not re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
            found.append(m.group(0))
    return found


def test_the_scanner_finds_what_a_leak_looks_like() -> None:
    leaks = [
        "AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "password: hunter2",
        "-----BEGIN RSA PRIVATE KEY-----",
    ]
    for leak in leaks:
        assert secret_findings(leak), leak
    clean = [
        "secretKeyKey: AWS_SECRET_ACCESS_KEY",
        "password: ${POSTGRES_PASSWORD}",
        "sha256:" + "a" * 64,
        "git 0123456789abcdef0123456789abcdef01234567",
    ]
    for text in clean:
        assert not secret_findings(text), text


def test_no_secret_value_in_compiled_pipelines_images_or_manifests() -> None:
    files = [p for p in _tracked("pipelines/compiled", "images", "manifests") if p.is_file()]
    assert any(p.parent == COMPILED for p in files) and any("Dockerfile" in p.name for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        assert not secret_findings(text), f"{path.relative_to(ROOT)}: {secret_findings(text)}"


@pytest.mark.parametrize("name", ["training", "inference"])
def test_only_secret_names_reach_the_pipeline(name: str) -> None:
    docs = list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for conf in executors.values():
        for sec in conf.get("secretAsEnv", []):
            assert sec["secretName"] == k8s.S3_SECRET_NAME  # by name; the value stays in the cluster
    for spec in docs[0]["deploymentSpec"]["executors"].values():
        for env in spec.get("container", {}).get("env", []):  # literal env values in the YAML
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", env["name"]), env


@pytest.mark.parametrize("name", ["training", "inference"])
def test_every_pipeline_task_runs_as_the_images_non_root_user(name: str) -> None:
    docs = list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))
    tasks = set(docs[0]["deploymentSpec"]["executors"])
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == tasks  # every task has a Kubernetes config
    for task, conf in executors.items():
        sc = conf.get("securityContext", {})
        assert sc == {
            "runAsUser": str(k8s.RUN_AS_USER),
            "runAsGroup": str(k8s.RUN_AS_GROUP),
            "runAsNonRoot": True,
        }, task
    for kind in ("base", "train"):  # the images run as that same numeric user
        dockerfile = (ROOT / "images" / kind / "Dockerfile").read_text()
        assert re.findall(r"^USER (\S+)$", dockerfile, re.M)[-1] == f"{k8s.RUN_AS_USER}:{k8s.RUN_AS_GROUP}"


def test_model_and_checkpoint_files_are_loaded_without_pickle() -> None:
    """Every ``torch.load`` in digilut/ passes ``weights_only=True`` (tensors and plain containers
    only: a crafted model file cannot run code when loaded)."""
    calls = 0
    for path in sorted((ROOT / "digilut").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 2  # model files and training checkpoints
