"""Run the benchmarks: ``python -m bench`` runs every part, ``python -m bench extract boxes`` some.

Each part is a module ``bench/<part>.py`` with ``main(out: pathlib.Path) -> None`` that prints its
table and writes its figures under ``out`` (``bench-out/<part>/``).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
import time
from pathlib import Path

import bench

FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logging.basicConfig(level=logging.INFO, format=FMT, datefmt="%H:%M:%S")
NOT_PARTS = {"gpu_check"}  # a script of its own: make gpu-check (tests + GPU benchmarks)
modules = pkgutil.iter_modules(bench.__path__)
parts = sorted(m.name for m in modules if not m.name.startswith("_") and m.name not in NOT_PARTS)
chosen = sys.argv[1:] or parts
unknown = [p for p in chosen if p not in parts]
if unknown:
    sys.exit(f"unknown benchmark part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
for part in chosen:
    t0 = time.perf_counter()
    print(f"\n===== bench: {part} =====", flush=True)
    importlib.import_module(f"bench.{part}").main(Path("bench-out") / part)
    print(f"===== bench: {part} done in {time.perf_counter() - t0:.0f}s =====", flush=True)
