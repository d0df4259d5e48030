"""Every benchmark part runs, quick, on tiny inputs (``python -m bench --quick PART``): a benchmark
that no longer runs fails here instead of rotting until someone runs ``make bench``. Its figures are
not asserted (tiny inputs, a busy machine), only that it completes and writes its table."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parents[2]
NOT_PARTS = {"gpu_check"}  # make gpu-check's script, not a part (bench/__main__.py)
PARTS = sorted(
    m.name
    for m in pkgutil.iter_modules(bench.__path__)
    if not m.name.startswith("_") and m.name not in NOT_PARTS
)
# A line each part's table must hold: its header, whatever the figures are.
HEADERS = {
    "boxes": "mean_f2",
    "extract": "(a) digilut prepare",
    "extract_types": "(a) per CPU-second",
    "storage": "digilut upload_file (s3transfer+Patience) + outage",
    "train": "quality: held-out mean F2",
}


def test_every_part_is_checked_here() -> None:
    assert set(HEADERS) <= set(PARTS), "a benchmark part was removed: drop it from HEADERS"


@pytest.mark.slow
@pytest.mark.parametrize("part", PARTS)
def test_benchmark_part_runs_quick_and_writes_its_table(part: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop(bench.QUICK_ENV, None)  # the --quick flag alone must turn quick mode on
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", part],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = tmp_path / "bench-out" / "quick" / part / "table.txt"
    assert table.is_file(), f"bench {part} wrote no table: {proc.stdout[-2000:]}"
    text = table.read_text()
    assert HEADERS.get(part, "") in text and text in proc.stdout  # printed and written alike
    assert f"bench: {part} (quick)" in proc.stdout


def test_unknown_part_and_option_are_refused(tmp_path: Path) -> None:
    for args, msg in ((["nope"], "unknown benchmark part(s) nope"), (["--fast"], "unknown option(s) --fast")):
        proc = subprocess.run(
            [sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 1 and msg in proc.stderr
