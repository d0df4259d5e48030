"""CPU count from the cgroup quota (fake cgroup trees under tmp_path), not the node's cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from digilut.cpus import available_cpus, cgroup_cpu_limit


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _v2(root: Path, cpu_max: str, *, own: str = "/", own_cpu_max: str | None = None) -> Path:
    _write(root, "sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory pids\n")
    _write(root, "sys/fs/cgroup/cpu.max", cpu_max + "\n")
    _write(root, "proc/self/cgroup", f"0::{own}\n")
    if own_cpu_max is not None:
        _write(root, f"sys/fs/cgroup{own}/cpu.max", own_cpu_max + "\n")
    return root


def _v1(root: Path, quota: str, period: str = "100000", *, folder: str = "cpu,cpuacct") -> Path:
    _write(root, f"sys/fs/cgroup/{folder}/cpu.cfs_quota_us", quota + "\n")
    _write(root, f"sys/fs/cgroup/{folder}/cpu.cfs_period_us", period + "\n")
    _write(root, "proc/self/cgroup", "12:cpu,cpuacct:/\n0::/\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "limit", "cpus"),
    [
        ("400000 100000", 4.0, 4),
        ("150000 100000", 1.5, 1),
        ("50000 100000", 0.5, 1),
        ("max 100000", None, 64),
    ],
)
def test_cgroup_v2_quota_caps_the_node_cores(
    tmp_path: Path, cpu_max: str, limit: float | None, cpus: int
) -> None:
    root = _v2(tmp_path, cpu_max)
    assert cgroup_cpu_limit(root) == limit
    assert available_cpus(root, affinity=64) == cpus


def test_cgroup_v2_limit_of_the_process_own_cgroup_counts(tmp_path: Path) -> None:
    # the pod's limit sits on its own cgroup below an unlimited root (no cgroup namespace)
    root = _v2(tmp_path, "max 100000", own="/kubepods/pod1/c1", own_cpu_max="800000 100000")
    _write(root, "sys/fs/cgroup/kubepods/pod1/cpu.max", "1200000 100000\n")
    assert cgroup_cpu_limit(root) == 8.0
    assert available_cpus(root, affinity=128) == 8


@pytest.mark.parametrize("folder", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_quota_and_period(tmp_path: Path, folder: str) -> None:
    root = _v1(tmp_path, "300000", "100000", folder=folder)
    assert cgroup_cpu_limit(root) == 3.0
    assert available_cpus(root, affinity=32) == 3


def test_cgroup_v1_without_quota_and_no_cgroup_at_all_use_the_affinity(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_v1(tmp_path / "v1", "-1")) is None
    assert available_cpus(tmp_path / "v1", affinity=6) == 6
    assert cgroup_cpu_limit(tmp_path / "empty") is None
    assert available_cpus(tmp_path / "empty", affinity=3) == 3


def test_affinity_smaller_than_the_quota_wins(tmp_path: Path) -> None:
    assert available_cpus(_v2(tmp_path, "1600000 100000"), affinity=2) == 2


def test_garbled_cgroup_files_are_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_v2(tmp_path / "a", "lots 100000")) is None
    assert cgroup_cpu_limit(_v1(tmp_path / "b", "", "0")) is None


def test_this_machine_gives_at_least_one_cpu() -> None:
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_cpu_training_caps_torch_threads_at_the_available_cpus(tmp_path: Path) -> None:
    # torch's default pool is one thread per node core; a fold on the CPU brings it down to the
    # CPUs this process may use.
    import torch
    from patch_fixtures import make_patch_manifest

    from digilut.train import TrainConfig, train_fold

    manifest = make_patch_manifest(tmp_path / "data", patients=3, grid=3, px=32, folds=2)
    cfg = TrainConfig(
        input_px=32, epochs=1, train_batch_size=8, num_workers=0, weights="none", hidden_units=8,
        patches_per_epoch=8, max_val_patches=8,
    )  # fmt: skip
    before, n = torch.get_num_threads(), available_cpus()
    try:
        torch.set_num_threads(n + 3)
        train_fold(manifest, 0, tmp_path / "a", cfg, torch.device("cpu"))
        assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
