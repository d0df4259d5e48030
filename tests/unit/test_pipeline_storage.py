"""The compiled pipelines give the tasks that write large files a sized scratch volume at /tmp,
and every task that reads the shard store (S3) its credentials."""

from __future__ import annotations

import pytest
import yaml

from digilut import k8s
from digilut.ops.kubeflow import COMPILED_DIR

# executor -> whether it writes large files (slides, shards, the local copy of fetched patches)
SHARD_TASKS = {
    "training": {"exec-extract": True, "exec-train-fold": True, "exec-predict": False},
    "inference": {"exec-extract": True, "exec-predict-all": False},
}


def _compiled(name: str) -> tuple[dict, dict]:
    spec, platform = list(yaml.safe_load_all((COMPILED_DIR / f"{name}.yaml").read_text()))
    return spec["deploymentSpec"]["executors"], platform["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ]


def _size_gib(size: str) -> float:
    assert size.endswith("Gi"), size
    return float(size[:-2])


@pytest.mark.parametrize("pipeline", sorted(SHARD_TASKS))
def test_tasks_that_write_large_files_get_a_sized_scratch_volume_at_tmp(pipeline: str) -> None:
    """/tmp, the images' TMPDIR: no TMPDIR variable, which kfp.local would pass on without the mount."""
    containers, platform = _compiled(pipeline)
    for executor, writes in SHARD_TASKS[pipeline].items():
        env = {e["name"] for e in containers[executor]["container"].get("env", [])}
        assert "TMPDIR" not in env, executor
        mounts = {m["mountPath"]: m for m in platform[executor].get("emptyDirMounts", [])}
        if not writes:
            assert "/tmp" not in mounts, executor
            continue
        assert "/tmp" in mounts, (executor, mounts)
        assert _size_gib(mounts["/tmp"]["sizeLimit"]) >= 32, executor  # ≥ the local copy's cap
        assert "medium" not in mounts["/tmp"], executor  # on disk, not in the pod's memory


@pytest.mark.parametrize("pipeline", sorted(SHARD_TASKS))
def test_tasks_that_read_the_shard_store_have_the_s3_credentials(pipeline: str) -> None:
    _, platform = _compiled(pipeline)
    for executor in SHARD_TASKS[pipeline]:
        secrets = [s["secretName"] for s in platform[executor].get("secretAsEnv", [])]
        assert k8s.S3_SECRET_NAME in secrets, executor
