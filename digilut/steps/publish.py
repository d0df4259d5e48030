"""Step ``publish``: results and models to S3, and the ensemble to the MLflow registry."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from digilut.boxes import BOXES_CONFIG_NAME
from digilut.locations import publish_results
from digilut.registry import register_ensemble
from digilut.report import RunFigures
from digilut.tracking import Tracker, TrackingConfig

if TYPE_CHECKING:  # torch and digilut.train load in the GPU steps only: the CPU image has no torch
    pass

log = logging.getLogger(__name__)


def publish_step(
    results: Path,
    results_uri: str,
    tracking: TrackingConfig,
    parent_run_id: str,
    figures: RunFigures,
    *,
    register_model: str = "",
) -> None:
    """Copy the results folder to ``results_uri`` (a folder or ``s3://`` prefix; "" = nowhere),
    log the figures and report to the MLflow parent run (registering the ensemble as
    ``register_model`` when given), then close the run."""
    publish_results(results, results_uri)
    if parent_run_id:
        with Tracker(tracking) as tracker:
            run = tracker.attach(parent_run_id)
            tracker.log_metrics(run, figures.scalars, step=0)
            tracker.log_artifacts(run, results, "results")
            if register_model:
                extra = [p for p in [results / "models" / BOXES_CONFIG_NAME] if p.is_file()]
                register_ensemble(
                    tracker, run, sorted((results / "models").glob("*.pt")), register_model, extra_files=extra
                )
            tracker.end_run(run)


# --- inference -------------------------------------------------------------------------------
