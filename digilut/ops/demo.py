"""``make demo``: the whole pipeline on this machine against real local servers.

Generates synthetic slides, starts SeaweedFS (S3, credentials required, loopback only) and an
MLflow tracking server (SQLite backend, artifacts in the S3 bucket), uploads the dataset, runs the
training pipeline through ``kfp.local`` reading its input from S3 and publishing its results there,
prints a summary, and stops the servers. ``keep=True`` leaves the servers up and writes
``WORK/s3.env`` (the endpoints and keys, mode 0600) and ``WORK/services.json``, so that
``source WORK/s3.env`` reaches them and ``digilut services down --dir WORK`` stops them.
A second demo in the same ``WORK`` reuses the outputs of the cached steps (extract, merge) of the
first through kfp.local's cache in ``WORK/run/kfp-root``, unless ``cache=False``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from digilut.ops.runner import RunResult, run_local

log = logging.getLogger(__name__)
BUCKET = "digilut"
DATA_PREFIX = "datasets/demo"


@dataclass(frozen=True)
class DemoResult:
    run: RunResult
    results_uri: str
    mlflow_uri: str
    s3_endpoint: str
    tensorboard_cmd: str
    env_file: Path | None = None  # keep=True: the servers' endpoints and keys (source it)


def run_demo(
    work: str | Path,
    *,
    patients: int = 8,
    seed: int = 0,
    size: str = "demo",
    profile: str = "demo",
    keep: bool = False,
    echo: bool = True,
    cache: bool = True,
) -> DemoResult:
    """Run the demo in ``work`` (data, servers' state, run outputs); see the module docstring."""
    from digilut.errors import ConfigError
    from digilut.ops.mlflow_server import start_mlflow
    from digilut.ops.s3_server import start_s3
    from digilut.ops.services import running_saved, save_state, write_env_file
    from digilut.storage import upload_dir
    from digilut.synth import synth_dataset
    from digilut.synth_plan import SynthConfig

    work = Path(work).resolve()
    state_file = work / "services.json"
    if running_saved(state_file):
        raise ConfigError(
            f"the servers of an earlier `make demo KEEP=1` still run from {work}: "
            f"stop them first with `digilut services down --dir {work}`"
        )
    data = work / "data"
    if not (data / "train.csv").is_file():
        t0 = time.perf_counter()
        synth_dataset(data, SynthConfig(patients=patients, seed=seed, size=size))  # type: ignore[arg-type]
        _say(
            echo,
            f"synthetic dataset: {2 * patients} slides ({size}) in {time.perf_counter() - t0:.0f}s -> {data}",
        )
    with start_s3(work / "s3", bucket=BUCKET, keep=keep) as s3:
        cfg = s3.config()
        env_file = None
        if keep:  # recorded at once: `services down` stops them even if what follows fails
            env_file = write_env_file(work / "s3.env", cfg)
            save_state(state_file, [s3])
        _say(echo, f"S3 (SeaweedFS) at {cfg.endpoint_url}, bucket {BUCKET} (credentials required)")
        upload_dir(cfg, data, DATA_PREFIX)
        data_uri = f"s3://{BUCKET}/{DATA_PREFIX}"
        _say(echo, f"dataset uploaded to {data_uri}")
        with start_mlflow(work / "mlflow", cfg, keep=keep) as mlflow:
            if keep:
                env_file = write_env_file(work / "s3.env", cfg, mlflow.tracking_uri)
                save_state(state_file, [s3, mlflow])
            _say(echo, f"MLflow tracking server at {mlflow.tracking_uri} (artifacts in s3://{BUCKET}/mlflow)")
            results_uri = f"s3://{BUCKET}/runs/{time.strftime('%Y%m%d-%H%M%S')}"
            saved = dict(os.environ)
            os.environ.update({**cfg.to_env(), "MLFLOW_TRACKING_URI": mlflow.tracking_uri})
            try:
                run = run_local(
                    data_uri,
                    work / "run",
                    profile=profile,
                    results_uri=results_uri,
                    echo=echo,
                    cache=cache,
                    run_name="demo",
                    register_model="digilut-ensemble",
                    checkpoint_uri=f"s3://{BUCKET}/checkpoints",
                )
            finally:
                os.environ.clear()
                os.environ.update(saved)
            tb = f"{Path(sys.executable).parent / 'tensorboard'} --logdir {work / 'run' / 'kfp-root'}"
            return DemoResult(run, results_uri, mlflow.tracking_uri, str(cfg.endpoint_url), tb, env_file)


def _say(echo: bool, msg: str) -> None:
    log.info("%s", msg)
    if echo:
        print(msg, flush=True)
