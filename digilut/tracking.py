"""MLflow tracking that never blocks or kills training: runs, params, metrics, tags and artifacts
(files and folders; the model folders are built by :mod:`digilut.registry`, not here).

An MLflow server that is down makes every client call block for minutes (default timeout 120 s ×
7 retries with backoff) and then raise. Training must not wait for it, so :class:`Tracker` sends
every call from one background thread (:mod:`digilut.tracking_queue`), in order, and training
only enqueues:

* calls that fail for a transient reason (connection refused, timeout, 5xx) stay queued and are
  retried every ``retry_interval_s``; metrics keep the time they were measured, so nothing is lost
  or reordered when the server comes back. One warning when the outage starts, one when it ends.
* calls that fail for good (the server answered "invalid parameter", a param changed value) are
  dropped with a warning.
* HTTP timeouts are short: ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
  default to ``request_timeout_s`` / ``max_retries`` unless already set in the environment.
* :meth:`Tracker.close` waits at most ``flush_timeout_s`` and reports what was not delivered.

Runs are :class:`RunHandle` s whose MLflow id is filled in by the background thread when the run
is created: a pipeline run is a parent run, each fold a child run (tag ``mlflow.parentRunId``).
A run id saved in a checkpoint can be passed back (``run_id=``) to resume the same run.

Works with a tracking server (``http://host:5000``) and with a local store (``sqlite:///path``).
MLflow is imported when the first :class:`Tracker` is made, never at import time.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digilut.errors import ConfigError
from digilut.tracking_queue import Call, CallQueue, is_transient

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TENSORBOARD_LOGDIR_ENV = "DIGILUT_TENSORBOARD_LOGDIR"  # set by the runtime ConfigMap (digilut.k8s)

_PARAM_LINE = re.compile(r"([A-Za-z_]\w*)=(.*)", re.S)
_INTEGRAL = re.compile(r"-?\d+\.0")


def parse_pipeline_params(text: str) -> dict[str, str]:
    """A pipeline's parameters from ``name=value`` lines (what the training pipeline hands
    ``start_tracking``: KFP fills in each value at run time). A line that does not start with
    ``name=`` continues the previous value; ``7.0`` (how kfp.local writes an integer) becomes ``7``,
    as the fold runs log it."""
    params: dict[str, str] = {}
    name = None
    for line in text.split("\n"):
        m = _PARAM_LINE.fullmatch(line)
        if m:
            name = m.group(1)
            params[name] = m.group(2)
        elif name is not None:
            params[name] += "\n" + line
    return {k: v[:-2] if _INTEGRAL.fullmatch(v) else v for k, v in params.items()}


def kfp_run_tags(run_id: str, run_name: str, host: str = "") -> dict[str, str]:
    """MLflow tags naming the KFP run (id, name and, when the KFP UI's ``host`` is known, its URL)."""
    tags = {"kfp.run_id": run_id, "kfp.run_name": run_name}
    if run_id and host:
        tags["kfp.run_url"] = f"{host.rstrip('/')}/#/runs/details/{run_id}"
    return {k: v for k, v in tags.items() if v}


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how to log. ``tracking_uri=""`` disables MLflow (every call is a no-op)."""

    tracking_uri: str = ""
    experiment: str = "digilut"
    request_timeout_s: float = 10.0  # per HTTP request (MLflow's default is 120 s)
    max_retries: int = 0  # HTTP retries inside one call (ours retry the whole call later)
    retry_interval_s: float = 15.0  # wait between attempts while the server is unreachable
    flush_timeout_s: float = 60.0  # close() waits at most this long for the queue to drain
    max_buffered: int = 200_000  # calls kept while the server is down (oldest metrics dropped beyond)
    # TensorBoard: each fold's event files are copied after every epoch to
    # <tensorboard_logdir>/<tensorboard_run>/fold<k> (a folder or s3:// prefix; "" = kept in the fold's
    # folder only). tensorboard_run "" = the MLflow parent run id (shared by a pipeline run's folds).
    tensorboard_logdir: str = ""
    tensorboard_run: str = ""

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0 or self.retry_interval_s <= 0 or self.flush_timeout_s < 0:
            raise ConfigError(
                f"request_timeout_s={self.request_timeout_s}, retry_interval_s={self.retry_interval_s} "
                f"must be > 0 and flush_timeout_s={self.flush_timeout_s} ≥ 0"
            )
        if self.max_retries < 0 or self.max_buffered < 100:
            raise ConfigError(
                f"max_retries={self.max_retries} must be ≥ 0, max_buffered={self.max_buffered} ≥ 100"
            )
        if self.tracking_uri and not self.experiment:
            raise ConfigError("experiment must be a non-empty name when tracking_uri is set")

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri)

    @classmethod
    def from_env(
        cls, experiment: str = "digilut", environ: Mapping[str, str] | None = None
    ) -> TrackingConfig:
        """``MLFLOW_TRACKING_URI`` and ``DIGILUT_TENSORBOARD_LOGDIR`` from the environment (a pod's
        ConfigMap), as pipeline components build it."""
        env = os.environ if environ is None else environ
        return cls(
            tracking_uri=env.get("MLFLOW_TRACKING_URI", ""),
            experiment=experiment,
            tensorboard_logdir=env.get(TENSORBOARD_LOGDIR_ENV, ""),
        )

    def tensorboard_dir(self, fold: int, parent_run_id: str | None) -> str:
        """Where fold ``fold``'s event files go: ``<logdir>/<run>/fold<k>`` ("" = nowhere); the run
        is ``tensorboard_run``, else the MLflow parent run id, else ``no-mlflow-run``."""
        if not self.tensorboard_logdir:
            return ""
        run = self.tensorboard_run or parent_run_id or "no-mlflow-run"
        if "/" in run or run in (".", ".."):
            raise ConfigError(f"tensorboard_run={run!r}: a run name is one path segment (no '/')")
        return f"{self.tensorboard_logdir.rstrip('/')}/{run}/fold{fold}"


class RunHandle:
    """An MLflow run as seen by training: ``run_id`` is ``None`` until the server has created it."""

    def __init__(self, name: str, run_id: str | None = None) -> None:
        self.name = name
        self.run_id = run_id
        self._ready = threading.Event()
        if run_id:
            self._ready.set()

    def _set(self, run_id: str) -> None:
        self.run_id = run_id
        self._ready.set()

    def wait(self, timeout_s: float) -> str | None:
        """The run id, waiting at most ``timeout_s`` for the background thread to create the run."""
        self._ready.wait(timeout_s)
        return self.run_id

    def __repr__(self) -> str:
        return f"RunHandle({self.name!r}, run_id={self.run_id!r})"


class Tracker:
    """Asynchronous, resilient MLflow logging for one process (see the module docstring)."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self._calls: CallQueue | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        if cfg.enabled:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, cfg.request_timeout_s))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.max_retries))
            self._calls = CallQueue(
                self._send,
                uri=cfg.tracking_uri,
                retry_interval_s=cfg.retry_interval_s,
                flush_timeout_s=cfg.flush_timeout_s,
                max_buffered=cfg.max_buffered,
            )

    # ----------------------------------------------------------------- public, non-blocking API
    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def attach(self, run_id: str, name: str = "parent") -> RunHandle:
        """A handle on an existing run (e.g. the pipeline's parent run made by an earlier step)."""
        return RunHandle(name, run_id or None)

    def start_run(
        self,
        name: str,
        *,
        parent: RunHandle | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunHandle:
        """Start a run (a child of ``parent`` if given), or resume ``run_id`` if it still exists."""
        run = RunHandle(name)
        if self.enabled:
            self._put(Call("start", run, lambda: self._start(run, parent, run_id, dict(tags or {}))))
        return run

    def log_params(self, run: RunHandle, params: Mapping[str, Any]) -> None:
        if self.enabled and params:
            items = {str(k): str(v)[:6000] for k, v in params.items()}
            self._put(Call("params", run, lambda: self._log_params(run, items)))

    def set_tags(self, run: RunHandle, tags: Mapping[str, Any]) -> None:
        if self.enabled and tags:
            items = {str(k): str(v) for k, v in tags.items()}
            self._put(Call("tags", run, lambda: self._set_tags(run, items)))

    def log_metrics(self, run: RunHandle, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics measured now at ``step`` (non-finite values are skipped)."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        items = tuple(
            (k, float(v), now, int(step))
            for k, v in metrics.items()
            if v is not None and float(v) == float(v)
        )
        if items:
            self._put(Call("metrics", run, metrics=items))

    def log_artifacts(self, run: RunHandle, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (read when the call is sent: keep it until :meth:`close`)."""
        if self.enabled:
            path = Path(local_path)
            self._put(Call("artifacts", run, lambda: self._log_artifacts(run, path, artifact_path)))

    def log_folder(self, run: RunHandle, artifact_path: str, build: Callable[[Path], None]) -> None:
        """Upload the folder ``build(folder)`` writes as the artifact folder ``artifact_path``.

        ``build`` runs in the background thread when the call is sent (a model folder takes seconds
        to write: training does not wait), into a temporary folder that does not exist yet."""
        if self.enabled:
            self._put(Call("folder", run, lambda: self._log_folder(run, artifact_path, build)))

    def register_folder(
        self, run: RunHandle, artifact_path: str, model_name: str, build: Callable[[Path], None]
    ) -> None:
        """As :meth:`log_folder`, then register that folder (an MLflow model) as a new version of
        the registered model ``model_name`` (created if needed)."""
        if self.enabled:
            self._put(Call("register", run, lambda: self._register(run, artifact_path, model_name, build)))

    def end_run(self, run: RunHandle, status: str = "FINISHED") -> None:
        if self.enabled:
            self._put(Call("end", run, lambda: self._end(run, status)))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (default ``flush_timeout_s``) for queued calls; True if all went."""
        return self._calls is None or self._calls.flush(timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush (bounded), stop the thread, and say whether everything was delivered."""
        return self._calls is None or self._calls.close(timeout_s)

    @property
    def pending(self) -> int:
        """Calls queued or being sent."""
        return 0 if self._calls is None else self._calls.pending

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, call: Call) -> None:
        if self._calls is not None:
            self._calls.put(call)

    # ----------------------------------------------------------------- background thread
    def _send(self, batch: list[Call]) -> None:
        head = batch[0]
        if head.kind == "metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, ts, step) for call in batch for (k, v, ts, step) in call.metrics]
            self._client_().log_batch(self._run_id(head.run), metrics=metrics, synchronous=True)
        else:
            assert head.fn is not None
            head.fn()

    def _client_(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        return self._client

    def _run_id(self, run: RunHandle) -> str:
        if not run.run_id:  # its start call was dropped: nothing can be logged to it
            raise ConfigError(f"MLflow run {run.name!r} was never created")
        return run.run_id

    def _experiment(self) -> str:
        if self._experiment_id is None:
            client = self._client_()
            exp = client.get_experiment_by_name(self.cfg.experiment)
            self._experiment_id = exp.experiment_id if exp else client.create_experiment(self.cfg.experiment)
        return self._experiment_id

    def _start(
        self, run: RunHandle, parent: RunHandle | None, run_id: str | None, tags: dict[str, str]
    ) -> None:
        client = self._client_()
        if run_id:
            try:
                client.get_run(run_id)
            except Exception as err:
                if is_transient(err):
                    raise
                log.warning("MLflow run %s not found (%s): starting a new run for %s", run_id, err, run.name)
            else:
                client.update_run(run_id, status="RUNNING")
                run._set(run_id)
                log.info("MLflow: resumed run %s (%s)", run_id, run.name)
                return
        if parent is not None:
            tags[PARENT_TAG] = self._run_id(parent)
        created = client.create_run(self._experiment(), run_name=run.name, tags=tags)
        run._set(created.info.run_id)
        log.info(
            "MLflow: run %s (%s) in experiment %r at %s",
            run.run_id,
            run.name,
            self.cfg.experiment,
            self.cfg.tracking_uri,
        )

    def _log_params(self, run: RunHandle, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._client_().log_batch(
            self._run_id(run), params=[Param(k, v) for k, v in params.items()], synchronous=True
        )

    def _set_tags(self, run: RunHandle, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client_().log_batch(
            self._run_id(run), tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True
        )

    def _log_artifacts(self, run: RunHandle, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self._client_().log_artifacts(self._run_id(run), str(path), artifact_path)
        else:
            self._client_().log_artifact(self._run_id(run), str(path), artifact_path)

    def _log_folder(self, run: RunHandle, artifact_path: str, build: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / Path(artifact_path).name
            build(folder)
            self._client_().log_artifacts(self._run_id(run), str(folder), artifact_path)

    def _register(
        self, run: RunHandle, artifact_path: str, model_name: str, build: Callable[[Path], None]
    ) -> None:
        self._log_folder(run, artifact_path, build)
        client = self._client_()
        run_id = self._run_id(run)
        try:
            client.create_registered_model(model_name)
        except Exception as err:
            if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = client.create_model_version(model_name, source, run_id=run_id)
        log.info(
            "MLflow: registered %s version %s from run %s (%s)", model_name, version.version, run_id, source
        )

    def _end(self, run: RunHandle, status: str) -> None:
        self._client_().set_terminated(self._run_id(run), status=status)
