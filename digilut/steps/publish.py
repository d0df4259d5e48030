"""Step ``publish``: the results folder to a folder or S3, its figures to the MLflow parent run,
the ensemble to the MLflow registry, then the parent run closed. ``evaluate`` ends with it in the
pipeline; ``digilut train-folds`` ends with it too."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from digilut.boxes import BOXES_CONFIG_NAME
from digilut.locations import publish_results
from digilut.registry import register_ensemble
from digilut.tracking import Tracker, TrackingConfig

log = logging.getLogger(__name__)


def publish_step(
    results: Path,
    results_uri: str,
    tracking: TrackingConfig,
    parent_run_id: str,
    scalars: Mapping[str, float],
    *,
    register_model: str = "",
    models: Sequence[Path] | None = None,
) -> None:
    """Copy ``results`` to ``results_uri`` (a folder or ``s3://`` prefix; "" = nowhere), log
    ``scalars`` and the folder to the MLflow parent run, register the ensemble (``models``, default
    ``results/models/*.pt``, with the tuned boxes config beside them) as ``register_model`` when
    given, then close the run."""
    publish_results(results, results_uri)
    if not parent_run_id:
        return
    with Tracker(tracking) as tracker:
        run = tracker.attach(parent_run_id)
        tracker.log_metrics(run, dict(scalars), step=0)
        tracker.log_artifacts(run, results, "results")
        if register_model:
            files = sorted((results / "models").glob("*.pt")) if models is None else list(models)
            extra = [p for p in [results / "models" / BOXES_CONFIG_NAME] if p.is_file()]
            register_ensemble(tracker, run, files, register_model, extra_files=extra)
        tracker.end_run(run)
