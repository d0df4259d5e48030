"""``digilut run`` plumbing: kfp.local's task cache (settings, code fingerprint, cache hits seen)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from digilut.ops.runner import _follow, cache_settings, code_fingerprint

ROOT = Path(__file__).parents[2]

# What kfp.local 2.17.3 prints (through our logging format) for a task served from its cache.
HIT = "22:20:45 INFO root: Task {} cache hit (key=6b1e0070dc0c); skipping execution."


def test_kfp_local_init_takes_the_cache_settings_of_a_run(tmp_path: Path) -> None:
    from kfp import local
    from kfp.local import cache

    settings = cache_settings(tmp_path, True)
    local.init(runner=local.SubprocessRunner(use_venv=False), raise_on_error=True, **settings)
    try:
        assert cache.get_local_cache().cache_root == str(
            tmp_path / "kfp-root" / ".kfp-cache" / code_fingerprint()
        )
        local.init(runner=local.SubprocessRunner(use_venv=False), **cache_settings(tmp_path, False))
        assert cache.get_local_cache() is None  # --no-cache: every task runs
    finally:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "reset"))


def test_a_code_change_starts_a_new_cache(tmp_path: Path) -> None:
    for d in ("digilut", "components", "pipelines"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__", "compiled"))
    before = code_fingerprint(tmp_path)
    assert before == code_fingerprint(ROOT)
    (tmp_path / "compiled.yaml").write_text("not code")  # outside the code folders: same cache
    assert code_fingerprint(tmp_path) == before
    with open(tmp_path / "digilut" / "boxes.py", "a") as fh:
        fh.write("\n# changed\n")
    assert code_fingerprint(tmp_path) != before


def test_cache_hits_are_reported_per_task(tmp_path: Path) -> None:
    lines = [HIT.format("extract"), HIT.format("extract"), HIT.format("merge"), "22:20:46 INFO root: other"]
    code = f"print({chr(10).join(lines)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    cached: list[str] = []
    failed: list[str] = []
    with open(tmp_path / "log", "w") as logf:
        assert _follow(proc, logf, 0.0, {}, failed, cached, echo=False) == 0
    assert cached == ["extract", "extract", "merge"] and not failed
    assert (tmp_path / "log").read_text().count("cache hit") == 3
