"""Run the Kubeflow pipelines on this machine through ``kfp.local``.

The same compiled components that run in pods run here as subprocesses
(``kfp.local.SubprocessRunner``), in a child process whose full output goes to
``OUT/pipeline.log`` while a progress line per step reaches the console. ``run_local`` (training)
collects the results into ``OUT``: ``boxes.csv`` (``filename,x1,x2,y1,y2,score``),
``metrics.json``, ``report.html`` and the pictures; ``run_inference_local`` writes
``OUT/submission.csv`` (``trustii_id,filename,y1,y2,x1,x2``) and ``OUT/boxes.csv``.

Task outputs are cached as on the cluster (``kfp.local.init(enable_caching=True)``): a task whose
per-task caching option is on (extract, merge, label, split) and whose component, arguments and input
artifacts are unchanged reuses its earlier outputs in ``OUT/kfp-root``; ``cache=False`` runs every
task. The cache lives in ``OUT/kfp-root/.kfp-cache/<code>``, ``<code>`` hashing the source of
``digilut``, ``components`` and ``pipelines``: kfp.local's key holds the component's own source and
its image name, not the library code the component calls (on the cluster the image tag does that).

``runner="docker"`` runs every component in the image its decorator names instead
(``kfp.local.DockerRunner``; ``make image-test``): as the images' user 10001, on the host's network
(the containers reach S3 and MLflow servers on loopback), with the ``DIGILUT_*``, ``AWS_*`` and
``MLFLOW_*`` variables of this process. Only the pipeline root is mounted into the containers, so
data, results and models are ``s3://`` or ``models:/`` URIs there.
"""

from __future__ import annotations

import hashlib
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
from digilut.ops.process import stop_group
from digilut.ops.profiles import profile_params

log = logging.getLogger(__name__)
_ANSI = r"(?:\x1b\[[0-9;]*m)*"  # kfp.local colours task names and statuses
_NAME = rf"{_ANSI}'?{_ANSI}(?P<task>[\w-]+){_ANSI}'?{_ANSI}"
_TASK = re.compile(rf"(?P<what>Executing task|Task) {_NAME}(?: finished with status|$)")
_STATUS = re.compile(rf"status {_ANSI}(?P<status>[A-Z]+)")
_STEPS = r"\[\d+/\d+\]|prepare:|merge:|labels:|split:|fold \d+|epoch|predict:|evaluate:|ingest|report:"
_PROGRESS = re.compile(rf"INFO\]: (?:{_STEPS})")  # our log lines, as the KFP executor prints them
_CACHED = re.compile(rf"Task {_NAME} cache hit")
_CODE_DIRS = ("digilut", "components", "pipelines")
RUNNERS = ("subprocess", "docker")
CONTAINER_USER = "10001:10001"  # the images' user (images/*/Dockerfile)
CONTAINER_ENV_PREFIXES = ("DIGILUT_", "AWS_", "MLFLOW_")  # what the components read from the environment


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
    cached: tuple[str, ...] = ()  # the tasks whose outputs came from the cache (one entry per task)


def _child(args: dict[str, Any]) -> None:
    """In the child process: run pipeline ``args["pipeline"]`` with kfp.local."""
    from kfp import local

    from digilut.ops.kubeflow import pipeline_functions

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    local.init(
        runner=kfp_runner(args.pop("runner", "subprocess")),
        pipeline_root=args.pop("pipeline_root"),
        raise_on_error=True,
        enable_caching=args.pop("enable_caching"),
        cache_root=args.pop("cache_root"),
    )
    pipeline_functions()[args.pop("pipeline")](**args)


def kfp_runner(kind: str) -> Any:
    """The ``kfp.local`` runner: ``subprocess`` (this venv) or ``docker`` (each component's image)."""
    from kfp import local

    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    if kind == "docker":
        env = {k: v for k, v in os.environ.items() if k.startswith(CONTAINER_ENV_PREFIXES)}
        return local.DockerRunner(network_mode="host", user=CONTAINER_USER, environment=env)
    raise DigilutError(f"runner={kind!r}: use one of {', '.join(RUNNERS)}")


def _pipeline_root(out: Path, runner: str) -> str:
    """``OUT/kfp-root``; for containers writable by their user, who writes the task outputs there."""
    if runner not in RUNNERS:
        raise DigilutError(f"runner={runner!r}: use one of {', '.join(RUNNERS)}")
    root = out / "kfp-root"
    root.mkdir(exist_ok=True)
    if runner == "docker":
        root.chmod(0o1777)
    return str(root)


def run_local(
    data_uri: str,
    out_dir: str | Path,
    *,
    profile: str = "demo",
    results_uri: str | None = None,
    echo: bool = True,
    cache: bool = True,
    runner: str = "subprocess",
    **overrides: Any,
) -> RunResult:
    """Run the training pipeline on ``data_uri`` (folder or ``s3://`` prefix); results go to ``out_dir``.

    ``results_uri`` (default: ``out_dir/results``) is where the pipeline publishes; an ``s3://``
    target is downloaded back into ``out_dir/results``. ``overrides`` are pipeline parameters.
    ``cache=False`` runs every task even when an earlier run's outputs could be reused.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    if results.exists():
        shutil.rmtree(results)
    params = profile_params(profile, **overrides)
    args = {
        "data_uri": _local_or_s3(data_uri),
        "results_uri": results_uri or str(results),
        **cache_settings(out, cache, runner),
        "runner": runner,
        **params,
    }
    seconds, cached = _run_child({"pipeline": "training", **args}, out, echo)
    _collect(results_uri, results, out, ("boxes.csv", "metrics.json", "report.html", "report.md"))
    metrics = json.loads((out / "metrics.json").read_text())
    return RunResult(
        out, out / "boxes.csv", out / "metrics.json", out / "report.html", seconds, metrics, tuple(cached)
    )


def run_inference_local(
    data_uri: str,
    model_uri: str,
    out_dir: str | Path,
    *,
    results_uri: str | None = None,
    echo: bool = True,
    cache: bool = True,
    runner: str = "subprocess",
    **params: Any,
) -> Path:
    """Run the inference pipeline on ``data_uri`` (folder or ``s3://`` prefix with ``images/`` and
    ``test.csv``) with the ensemble at ``model_uri`` (folder, ``s3://`` prefix or
    ``models:/<name>/<version>``); return ``OUT/submission.csv`` (``OUT/boxes.csv`` beside it)."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    if results.exists():
        shutil.rmtree(results)
    args = {
        "pipeline": "inference",
        "data_uri": _local_or_s3(data_uri),
        "model_uri": model_uri if ":" in model_uri else str(Path(model_uri).resolve()),
        "results_uri": results_uri or str(results),
        **cache_settings(out, cache, runner),
        "runner": runner,
        **params,
    }
    _run_child(args, out, echo)
    _collect(results_uri, results, out, ("submission.csv", "boxes.csv"))
    return out / "submission.csv"


def code_fingerprint(root: Path = Path(__file__).resolve().parents[2]) -> str:
    """A hash of the ``.py`` sources under ``root``'s digilut/, components/ and pipelines/ (what a
    task runs here), so that a code change starts a new local cache."""
    h = hashlib.sha256()
    for path in sorted(p for d in _CODE_DIRS for p in (root / d).rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def cache_settings(out: Path, cache: bool, runner: str = "subprocess") -> dict[str, Any]:
    """``pipeline_root`` and the ``kfp.local.init`` caching arguments of a run into ``out``."""
    root = Path(_pipeline_root(out, runner))
    return {
        "pipeline_root": str(root),
        "enable_caching": cache,
        "cache_root": str(root / ".kfp-cache" / code_fingerprint()),
    }


def _local_or_s3(uri: str) -> str:
    return uri if uri.startswith("s3://") else str(Path(uri).resolve())


def _collect(results_uri: str | None, results: Path, out: Path, names: tuple[str, ...]) -> None:
    """Bring the published results into ``results`` (from S3) and copy ``names`` into ``out``."""
    if results_uri and results_uri.startswith("s3://"):
        from digilut.locations import s3_target
        from digilut.storage import download_prefix

        cfg, prefix = s3_target(results_uri)
        download_prefix(cfg, prefix, results)
    for name in names:
        if (results / name).is_file():
            shutil.copy2(results / name, out / name)


def _run_child(args: dict[str, Any], out: Path, echo: bool) -> tuple[float, list[str]]:
    """Run the pipeline in a child process (its own process group); its seconds and the tasks
    served from the cache. Raises :class:`PipelineRunError` naming the failed steps and the log."""
    log_path = out / "pipeline.log"
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-c",
        f"import json, digilut.ops.runner as r; r._child(json.loads({json.dumps(json.dumps(args))}))",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    failed: list[str] = []
    cached: list[str] = []
    started: dict[str, list[float]] = {}  # parallel iterations share a task name
    with open(log_path, "w") as logf:
        # Its own process group: an interrupted run (Ctrl-C, SIGTERM) stops every task it started.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            rc = _follow(proc, logf, t0, started, failed, cached, echo)
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
    return time.perf_counter() - t0, cached


def _follow(
    proc: subprocess.Popen[str],
    logf: Any,
    t0: float,
    started: dict[str, list[float]],
    failed: list[str],
    cached: list[str],
    echo: bool,
) -> int:
    """Copy the child's output to ``logf``, print a progress line per step; its exit status."""
    assert proc.stdout is not None
    for line in proc.stdout:
        logf.write(line)
        hit = _CACHED.search(line)
        if hit:
            cached.append(hit.group("task"))
            if echo:
                print(f"[{time.perf_counter() - t0:6.0f}s] step {hit.group('task'):<16} CACHED", flush=True)
            continue
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
