"""How many CPUs this process may use: the pod's CPU limit, not the node's cores.

``os.cpu_count()`` in a container is the node's core count (e.g. 128), while the pod may be limited
to 8 CPUs by its cgroup quota: a pool sized from the former is throttled by the kernel and runs
slower than one sized to the limit. :func:`available_cpus` is the one place thread and worker pools
are sized from.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(text: str | None) -> float | None:
    """``cpu.max`` is ``"<quota> <period>"`` in µs, ``"max <period>"`` without a limit."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(quota_text: str | None, period_text: str | None) -> float | None:
    """``cpu.cfs_quota_us`` is -1 without a limit."""
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroup_dirs(root: Path, base: Path, controller: str | None) -> list[Path]:
    """The process's cgroup folder under ``base`` and its ancestors (a limit may sit on any of
    them); from ``/proc/self/cgroup``, the base alone when that names no path inside it."""
    dirs: list[Path] = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        _, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if controller is None and controllers != "":
            continue
        if controller is not None and controller not in controllers.split(","):
            continue
        here = base / rel.lstrip("/")
        while here != base and base in here.parents:
            if here.is_dir():  # in a container with its own cgroup namespace the path is "/"
                dirs.append(here)
            here = here.parent
    return [*dirs, base]


def cgroup_cpu_limit(root: str | Path = "/") -> float | None:
    """The CPU limit of this process's cgroup in CPUs (``1.5`` = 150 ms per 100 ms), or None
    when there is none. cgroup v2 (``cpu.max``) first, then v1 (``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``); the smallest limit on the path to the root cgroup counts.
    ``root`` is the file-system root the files are read under (tests pass a fake one)."""
    root = Path(root)
    cgroup = root / "sys/fs/cgroup"
    limits: list[float] = []
    if (cgroup / "cgroup.controllers").is_file():  # cgroup v2 (unified hierarchy)
        for d in _own_cgroup_dirs(root, cgroup, None):
            q = _v2_quota(_read(d / "cpu.max"))
            if q is not None:
                limits.append(q)
    else:  # cgroup v1: the cpu controller's own hierarchy
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            base = cgroup / name
            if not base.is_dir():
                continue
            for d in _own_cgroup_dirs(root, base, "cpu"):
                q = _v1_quota(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                if q is not None:
                    limits.append(q)
            break
    return min(limits) if limits else None


def available_cpus(root: str | Path = "/", *, affinity: int | None = None) -> int:
    """CPUs this process may use: the cores it may run on (``os.sched_getaffinity``; ``affinity``
    overrides it) capped by the cgroup CPU limit rounded down, at least 1. Size every thread or
    worker pool from this, not from ``os.cpu_count()``."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            affinity = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    n = affinity if limit is None else min(affinity, math.floor(limit))
    return max(1, n)
