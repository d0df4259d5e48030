"""Run the Kubeflow training pipeline on this machine through ``kfp.local``.

The same compiled components that run in pods run here as subprocesses
(``kfp.local.SubprocessRunner``). ``run_local`` runs the pipeline in a child process whose full
output goes to ``OUT/pipeline.log`` while a progress line per step reaches the console; then it
collects the results into ``OUT``: ``boxes.csv`` (``filename,x1,x2,y1,y2,score``),
``metrics.json``, ``report.html`` and the pictures.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digilut.errors import DigilutError
from digilut.profiles import profile_params
from digilut.services import stop_group

log = logging.getLogger(__name__)
_ANSI = r"(?:\x1b\[[0-9;]*m)*"  # kfp.local colours task names and statuses
_NAME = rf"{_ANSI}'?{_ANSI}(?P<task>[\w-]+){_ANSI}'?{_ANSI}"
_TASK = re.compile(rf"(?P<what>Executing task|Task) {_NAME}(?: finished with status|$)")
_STATUS = re.compile(rf"status {_ANSI}(?P<status>[A-Z]+)")
_STEPS = r"\[\d+/\d+\]|prepare:|merge:|labels:|split:|fold \d+|epoch|predict:|evaluate:|ingest|report:"
_PROGRESS = re.compile(rf"INFO\]: (?:{_STEPS})")  # our log lines, as the KFP executor prints them


class PipelineRunError(DigilutError, RuntimeError):
    """The local pipeline run failed; the message names the step and the log file."""


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    boxes_csv: Path
    metrics_json: Path
    report_html: Path
    seconds: float
    metrics: dict[str, Any]


def _child(args: dict[str, Any]) -> None:
    """In the child process: run the pipeline with kfp.local."""
    from kfp import local

    from pipelines.training import training

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=args.pop("pipeline_root"),
        raise_on_error=True,
    )
    training(**args)


def run_local(
    data_uri: str,
    out_dir: str | Path,
    *,
    profile: str = "demo",
    results_uri: str | None = None,
    echo: bool = True,
    **overrides: Any,
) -> RunResult:
    """Run the training pipeline on ``data_uri`` (folder or ``s3://`` prefix); results go to ``out_dir``.

    ``results_uri`` (default: ``out_dir/results``) is where the pipeline publishes; an ``s3://``
    target is downloaded back into ``out_dir/results``. ``overrides`` are pipeline parameters.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    if results.exists():
        shutil.rmtree(results)
    params = profile_params(profile, **overrides)
    args = {
        "data_uri": data_uri if data_uri.startswith("s3://") else str(Path(data_uri).resolve()),
        "results_uri": results_uri or str(results),
        "pipeline_root": str(out / "kfp-root"),
        **params,
    }
    log_path = out / "pipeline.log"
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-c",
        f"import json, digilut.runner as r; r._child(json.loads({json.dumps(json.dumps(args))}))",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    failed: list[str] = []
    started: dict[str, list[float]] = {}  # parallel iterations share a task name
    with open(log_path, "w") as logf:
        # Its own process group: an interrupted run (Ctrl-C, SIGTERM) stops every task it started.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            rc = _follow(proc, logf, t0, started, failed, echo)
        except BaseException:
            stop_group(proc.pid)
            proc.wait()
            raise
    if rc != 0 or failed:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise PipelineRunError(
            f"pipeline failed{' at step ' + ', '.join(failed) if failed else ''} (exit {rc}); "
            f"full log: {log_path}\n{tail}"
        )
    if results_uri and results_uri.startswith("s3://"):
        from digilut.ingest import s3_target
        from digilut.storage import download_prefix

        cfg, prefix = s3_target(results_uri)
        download_prefix(cfg, prefix, results)
    for name in ("boxes.csv", "metrics.json", "report.html", "report.md"):
        if (results / name).is_file():
            shutil.copy2(results / name, out / name)
    metrics = json.loads((out / "metrics.json").read_text())
    return RunResult(
        out, out / "boxes.csv", out / "metrics.json", out / "report.html", time.perf_counter() - t0, metrics
    )


def _follow(
    proc: subprocess.Popen[str],
    logf: Any,
    t0: float,
    started: dict[str, list[float]],
    failed: list[str],
    echo: bool,
) -> int:
    """Copy the child's output to ``logf``, print a progress line per step; its exit status."""
    assert proc.stdout is not None
    for line in proc.stdout:
        logf.write(line)
        m = _TASK.search(line)
        if m:
            task = m.group("task")
            if m.group("what") == "Executing task":
                started.setdefault(task, []).append(time.perf_counter())
                continue
            found = _STATUS.search(line)
            status = found.group("status") if found else "?"
            took = time.perf_counter() - (started.get(task) or [t0]).pop(0)
            msg = f"[{time.perf_counter() - t0:6.0f}s] step {task:<16} {status} ({took:.0f}s)"
            if status != "SUCCESS":
                failed.append(task)
            if echo:
                print(msg, flush=True)
        elif echo and _PROGRESS.search(line):
            print("          " + line.rstrip().split("INFO]: ", 1)[-1][:150], flush=True)
    return proc.wait()
