"""MLflow tracking that never blocks or kills training.

An MLflow server that is down makes every client call block for minutes (default timeout 120 s ×
7 retries with backoff) and then raise. Training must not wait for it, so :class:`Tracker` sends
every call from one background thread, in order, and training only enqueues:

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
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digilut.errors import ConfigError, DigilutError

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TENSORBOARD_LOGDIR_ENV = "DIGILUT_TENSORBOARD_LOGDIR"  # set by the runtime ConfigMap (digilut.k8s)
# MLflow error codes of a server that is up but cannot serve now: worth retrying later.
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


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


@dataclass
class _Call:
    kind: str
    run: RunHandle
    fn: Callable[[], None] | None = None  # for kinds other than "metrics"
    metrics: tuple[tuple[str, float, int, int], ...] = ()  # (key, value, timestamp ms, step)


def _is_transient(err: BaseException) -> bool:
    """Whether retrying later may succeed: the network or the server, not the call itself."""
    import requests
    from mlflow.exceptions import RestException

    if isinstance(err, DigilutError):  # our own (a model file that cannot be read): final
        return False
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:  # connection errors arrive wrapped
        seen.add(id(cause))
        if isinstance(cause, OSError | requests.RequestException) and not isinstance(cause, DigilutError):
            return True
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, RestException):  # the server answered with an error
        return str(err.error_code) in _TRANSIENT_CODES
    return str(err).startswith("API request to")  # MLflow's HTTP layer (timeouts, 5xx)


class Tracker:
    """Asynchronous, resilient MLflow logging for one process (see the module docstring)."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self._queue: deque[_Call] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        if cfg.enabled:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, cfg.request_timeout_s))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.max_retries))
            self._thread = threading.Thread(target=self._work, name="digilut-mlflow", daemon=True)
            self._thread.start()

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
            self._put(_Call("start", run, lambda: self._start(run, parent, run_id, dict(tags or {}))))
        return run

    def log_params(self, run: RunHandle, params: Mapping[str, Any]) -> None:
        if self.enabled and params:
            items = {str(k): str(v)[:6000] for k, v in params.items()}
            self._put(_Call("params", run, lambda: self._log_params(run, items)))

    def set_tags(self, run: RunHandle, tags: Mapping[str, Any]) -> None:
        if self.enabled and tags:
            items = {str(k): str(v) for k, v in tags.items()}
            self._put(_Call("tags", run, lambda: self._set_tags(run, items)))

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
            self._put(_Call("metrics", run, metrics=items))

    def log_artifacts(self, run: RunHandle, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (read when the call is sent: keep it until :meth:`close`)."""
        if self.enabled:
            path = Path(local_path)
            self._put(_Call("artifacts", run, lambda: self._log_artifacts(run, path, artifact_path)))

    def log_model(self, run: RunHandle, model_file: str | Path, name: str = "model") -> None:
        """Log a digilut model file as an ``mlflow.pytorch`` model (artifact folder ``name``)."""
        if self.enabled:
            path = Path(model_file)
            self._put(_Call("model", run, lambda: self._log_model(run, path, name)))

    def register_ensemble(
        self,
        run: RunHandle,
        model_files: list[str | Path],
        model_name: str,
        *,
        extra_files: Sequence[str | Path] = (),
    ) -> None:
        """Log the fold models as one pyfunc ensemble on ``run`` and register it as ``model_name``;
        ``extra_files`` (the tuned boxes config) are stored in the ensemble's folder beside them."""
        if self.enabled:
            paths = [Path(p) for p in model_files]
            extras = [Path(p) for p in extra_files]
            self._put(_Call("register", run, lambda: self._register(run, paths, model_name, extras)))

    def end_run(self, run: RunHandle, status: str = "FINISHED") -> None:
        if self.enabled:
            self._put(_Call("end", run, lambda: self._end(run, status)))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (default ``flush_timeout_s``) for queued calls; True if all went."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + (self.cfg.flush_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            self._cond.notify_all()  # cut a retry wait short
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float | None = None) -> bool:
        """Flush (bounded), stop the thread, and say whether everything was delivered."""
        if not self.enabled or self._closed:
            return True
        ok = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            left = len(self._queue) + self._busy
            self._cond.notify_all()
        if ok and self._thread is not None:
            self._thread.join(timeout=5)
        if not ok:
            log.warning(
                "MLflow at %s: %d call(s) not delivered after %.0fs (metrics remain in TensorBoard and "
                "the fold result files)",
                self.cfg.tracking_uri,
                left,
                self.cfg.flush_timeout_s if timeout_s is None else timeout_s,
            )
        if self._dropped:
            log.warning(
                "MLflow: %d call(s) dropped in total (refused by the server or buffer full)", self._dropped
            )
        return ok and not self._dropped

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- background thread
    def _put(self, call: _Call) -> None:
        with self._cond:
            if self._closed:
                log.debug("MLflow tracker closed: %s call for %s ignored", call.kind, call.run.name)
                return
            if len(self._queue) >= self.cfg.max_buffered:
                for i, queued in enumerate(self._queue):  # drop the oldest metrics, keep structure
                    if queued.kind == "metrics":
                        del self._queue[i]
                        self._dropped += 1
                        break
            self._queue.append(call)
            self._cond.notify_all()

    def _take(self) -> list[_Call] | None:
        """Block for the next call(s): consecutive metrics of one run are merged into one batch."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            head = self._queue[0]
            batch = [head]
            if head.kind == "metrics":
                n = len(head.metrics)
                for call in list(self._queue)[1:]:
                    if (
                        call.kind != "metrics"
                        or call.run is not head.run
                        or n + len(call.metrics) > _METRICS_PER_BATCH
                    ):
                        break
                    batch.append(call)
                    n += len(call.metrics)
            self._busy = True
            return batch

    def _work(self) -> None:
        down_since: float | None = None
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._send(batch)
                failed: BaseException | None = None
            except Exception as err:  # the thread must survive anything the client raises
                failed = err
            with self._cond:
                transient = failed is not None and _is_transient(failed)
                if not transient:
                    for _ in batch:
                        self._queue.popleft()
                self._busy = False
                self._cond.notify_all()
            if failed is None:
                if down_since is not None:
                    log.warning(
                        "MLflow at %s reachable again after %.0fs; sending %d buffered call(s)",
                        self.cfg.tracking_uri,
                        time.monotonic() - down_since,
                        len(self._queue) + len(batch),
                    )
                    down_since = None
            elif not transient:
                self._dropped += len(batch)
                log.warning(
                    "MLflow refused %s for run %s (dropped): %s", batch[0].kind, batch[0].run.name, failed
                )
            else:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "MLflow at %s unreachable (%s: %s); buffering calls and retrying every %.0fs — "
                        "training continues",
                        self.cfg.tracking_uri,
                        type(failed).__name__,
                        str(failed).splitlines()[0][:200] if str(failed) else "",
                        self.cfg.retry_interval_s,
                    )
                with self._cond:
                    if self._closed:  # close() has given up on the rest: stop trying
                        return
                    self._cond.wait(self.cfg.retry_interval_s)

    def _send(self, batch: list[_Call]) -> None:
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
                if _is_transient(err):
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

    def _log_model(self, run: RunHandle, model_file: Path, name: str) -> None:
        import mlflow.pytorch
        import torch

        from digilut.model import load_model

        loaded = load_model(model_file, torch.device("cpu"))
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_model(
                loaded.model,
                str(Path(tmp) / name),
                serialization_format="pickle",  # pt2 would need an input example to trace
                pip_requirements=_pip_requirements(),  # no requirement inference (slow, imports things)
                metadata={k: v for k, v in loaded.meta.items() if isinstance(v, int | float | str)},
            )
            self._client_().log_artifacts(self._run_id(run), str(Path(tmp) / name), name)
            self._client_().log_artifact(self._run_id(run), str(model_file), "checkpoint")

    def _register(self, run: RunHandle, paths: list[Path], model_name: str, extras: list[Path]) -> None:
        import mlflow.pyfunc

        client = self._client_()
        run_id = self._run_id(run)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pyfunc.save_model(
                str(Path(tmp) / "ensemble"),
                python_model=_ensemble_python_model(),
                artifacts={f"model{i}": str(p) for i, p in enumerate(paths)},
                pip_requirements=_pip_requirements(),
            )
            for extra in extras:
                shutil.copy2(extra, Path(tmp) / "ensemble" / extra.name)
            client.log_artifacts(run_id, str(Path(tmp) / "ensemble"), "ensemble")
        try:
            client.create_registered_model(model_name)
        except Exception as err:
            if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/ensemble"
        version = client.create_model_version(model_name, source, run_id=run_id)
        log.info(
            "MLflow: registered %s version %s (%d fold models) from run %s",
            model_name,
            version.version,
            len(paths),
            run_id,
        )

    def _end(self, run: RunHandle, status: str) -> None:
        self._client_().set_terminated(self._run_id(run), status=status)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "torchvision", "numpy", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def _ensemble_python_model() -> Any:
    """A pyfunc model averaging the fold models: input uint8 ``N×H×W×3`` patches, output probabilities
    (for models trained with ``stain_norm``, the patches of one call are normalised as one slide).

    The class is made here (MLflow is imported lazily) and pickled by value by cloudpickle; it
    needs the ``digilut`` package where it is loaded.
    """
    import mlflow.pyfunc

    class DigilutEnsemble(mlflow.pyfunc.PythonModel):  # type: ignore[misc, name-defined]
        def load_context(self, context: Any) -> None:
            import torch

            from digilut.predict import Ensemble

            keys = sorted(context.artifacts, key=lambda k: int(k.removeprefix("model")))
            self.ensemble = Ensemble.load([context.artifacts[k] for k in keys], torch.device("cpu"))

        # No type hints here: MLflow would read them as an input schema.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            import numpy as np
            import torch

            images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.uint8))
            stain = None
            if self.ensemble.needs_stain:  # stain-normalised models: the patches given are one slide
                from digilut.stain import tissue_lab_stats

                stain = tissue_lab_stats(images).expand(len(images), 2, 3)
            return self.ensemble.predict_batch(images, stain).numpy()

    return DigilutEnsemble()
