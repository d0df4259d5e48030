"""Run the benchmarks: ``python -m bench`` runs every part, ``python -m bench extract boxes`` some.

``--quick`` runs them on tiny inputs (seconds; figures not meaningful) into ``bench-out/quick``.
Each part is a module ``bench/<part>.py`` with ``main(out: pathlib.Path) -> None`` that prints its
table, writes it to ``out/table.txt`` and its figures under ``out`` (``bench-out/<part>/``).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import time
from pathlib import Path

import bench

FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logging.basicConfig(level=logging.INFO, format=FMT, datefmt="%H:%M:%S")
args = sys.argv[1:]
if "--quick" in args:
    os.environ[bench.QUICK_ENV] = "1"
    args = [a for a in args if a != "--quick"]
unknown_flags = [a for a in args if a.startswith("-")]
if unknown_flags:
    sys.exit(f"unknown option(s) {', '.join(unknown_flags)}; usage: python -m bench [--quick] [PART ...]")
NOT_PARTS = {"gpu_check"}  # a script of its own: make gpu-check (tests + GPU benchmarks)
modules = pkgutil.iter_modules(bench.__path__)
parts = sorted(m.name for m in modules if not m.name.startswith("_") and m.name not in NOT_PARTS)
chosen = args or parts
unknown = [p for p in chosen if p not in parts]
if unknown:
    sys.exit(f"unknown benchmark part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
root = Path("bench-out") / "quick" if bench.quick() else Path("bench-out")
for part in chosen:
    t0 = time.perf_counter()
    print(f"\n===== bench: {part}{' (quick)' if bench.quick() else ''} =====", flush=True)
    importlib.import_module(f"bench.{part}").main(root / part)
    print(f"===== bench: {part} done in {time.perf_counter() - t0:.0f}s =====", flush=True)
