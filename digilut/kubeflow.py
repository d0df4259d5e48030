"""Compile the pipelines to KFP IR YAML and submit runs to a Kubeflow Pipelines backend.

``compile_pipelines`` writes ``pipelines/compiled/<name>.yaml`` (committed; a test fails when they
are stale). ``submit_run`` uses ``kfp.Client``: uploads the compiled pipeline as a new version,
creates a run (or a recurring run) in an experiment, and returns the run's URL. Host, namespace
and token come from arguments or the environment (``KFP_HOST``, ``KFP_NAMESPACE``, ``KFP_TOKEN``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digilut import k8s
from digilut.errors import ConfigError

log = logging.getLogger(__name__)
COMPILED_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "compiled"


def pipeline_functions() -> dict[str, Any]:
    """The pipelines by name (imported here: compiling reads the image tag from the environment)."""
    from pipelines.inference import inference
    from pipelines.training import training

    return {"training": training, "inference": inference}


def compile_pipelines(out_dir: str | Path = COMPILED_DIR) -> list[Path]:
    """Compile every pipeline to ``out_dir/<name>.yaml``; return the paths."""
    from kfp import compiler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in pipeline_functions().items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(fn, str(path))
        paths.append(path)
        log.info("compiled %s -> %s", name, path)
    return paths


@dataclass(frozen=True)
class SubmitConfig:
    host: str
    namespace: str = k8s.DEFAULT_NAMESPACE
    token: str | None = None
    experiment: str = "digilut"
    pipeline: str = "training"
    service_account: str = k8s.PIPELINE_SERVICE_ACCOUNT
    cron: str | None = None  # a recurring run on this 6-field cron schedule (KFP/robfig format)

    def __post_init__(self) -> None:
        if not self.host.startswith(("http://", "https://")):
            raise ConfigError(
                f"host={self.host!r}: give the KFP API URL, e.g. https://kubeflow.example.org/pipeline"
            )
        if self.pipeline not in ("training", "inference"):
            raise ConfigError(f"pipeline={self.pipeline!r}: choose training or inference")

    @classmethod
    def from_env(cls, **overrides: Any) -> SubmitConfig:
        values = {
            "host": os.environ.get("KFP_HOST", ""),
            "namespace": os.environ.get("KFP_NAMESPACE", k8s.DEFAULT_NAMESPACE),
            "token": os.environ.get("KFP_TOKEN") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def submit_run(cfg: SubmitConfig, params: dict[str, Any], *, package: str | Path | None = None) -> str:
    """Upload the compiled pipeline as a new version and start a run (or recurring run); return its URL."""
    import kfp

    package = Path(package or COMPILED_DIR / f"{cfg.pipeline}.yaml")
    if not package.is_file():
        raise FileNotFoundError(f"{package}: not compiled; run `make compile` first")
    client = kfp.Client(host=cfg.host, namespace=cfg.namespace, existing_token=cfg.token)
    name = f"digilut-{cfg.pipeline}"
    version = time.strftime("v%Y%m%d-%H%M%S")
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=name).pipeline_id
    version_id = client.upload_pipeline_version(
        str(package), pipeline_version_name=version, pipeline_id=pipeline_id
    ).pipeline_version_id
    experiment = client.create_experiment(cfg.experiment, namespace=cfg.namespace)
    job = f"{name}-{version}"
    if cfg.cron:
        run = client.create_recurring_run(
            experiment.experiment_id,
            job,
            cron_expression=cfg.cron,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=cfg.service_account,
        )
        url = f"{cfg.host.rstrip('/')}/#/recurringrun/details/{run.recurring_run_id}"
    else:
        run = client.run_pipeline(
            experiment.experiment_id,
            job,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=cfg.service_account,
        )
        url = f"{cfg.host.rstrip('/')}/#/runs/details/{run.run_id}"
    log.info("submitted %s (%s) -> %s", job, package.name, url)
    return url
