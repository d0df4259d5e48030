"""The layering contract (README "Layout"): layers only look down, and the core has no cycles.

The contracts live in pyproject.toml (``[tool.importlinter]``) and are checked by import-linter on
the real import graph (imports inside functions included), so a core module that imports a step, a
driver, the CLI or kfp fails here, naming the chain of imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABOVE_CORE = {"steps", "ops", "commands", "cli", "__init__"}


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in proc.stdout


def test_every_core_module_is_under_the_core_contract() -> None:
    """A new module of the core must be named in the contract that keeps the core below the rest."""
    (core,) = [c for c in _contracts() if str(c["name"]).startswith("The core library")]
    listed = set(core["source_modules"])  # type: ignore[arg-type]
    modules = {f"digilut.{p.stem}" for p in (ROOT / "digilut").iterdir() if p.suffix == ".py" or p.is_dir()}
    modules -= {f"digilut.{name}" for name in ABOVE_CORE} | {"digilut.__pycache__"}
    assert modules - listed == set(), "add these to the core contract in pyproject.toml"
    assert listed - modules == set(), "these are no longer modules of digilut"
