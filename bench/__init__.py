"""Benchmarks run by ``make bench`` (``python -m bench [--quick] [PART ...]``).

``--quick`` (or ``DIGILUT_BENCH_QUICK=1``) runs every part on tiny inputs in seconds: its figures
mean nothing, but the test suite runs it (``tests/unit/test_bench.py``) so that no part can rot.
Every part writes its table to ``<out>/table.txt`` as well as printing it.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

QUICK_ENV = "DIGILUT_BENCH_QUICK"


def quick() -> bool:
    """True in quick mode: tiny inputs, figures not meaningful."""
    return os.environ.get(QUICK_ENV) == "1"


def write_table(out: Path, text: str) -> Path:
    """Print a part's table and write it to ``out/table.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    print(text, flush=True)
    path = out / "table.txt"
    path.write_text(text + "\n")
    return path


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (user + system), in seconds: the
    figure that stays meaningful on a machine shared with other jobs."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime
