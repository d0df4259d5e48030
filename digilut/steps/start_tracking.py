"""Step ``start_tracking``: open the MLflow parent run of a pipeline run (or of ``digilut train-folds``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from digilut.tracking import Tracker, TrackingConfig, kfp_run_tags

log = logging.getLogger(__name__)


def start_tracking_step(
    run_name: str,
    cfg: TrackingConfig,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    kfp_run_id: str = "",
    kfp_run_name: str = "",
) -> str:
    """Open the parent run with ``params`` and ``tags``, plus tags naming the KFP run (its id, name
    and, when ``KFP_HOST`` is set, URL); return its id ("" when tracking is off or down)."""
    tags = {**(tags or {}), **kfp_run_tags(kfp_run_id, kfp_run_name, os.environ.get("KFP_HOST", ""))}
    with Tracker(cfg) as tracker:
        if not tracker.enabled:
            log.info("tracking: no MLflow tracking URI configured; runs are not logged")
            return ""
        run = tracker.start_run(run_name, tags={"digilut.kind": "pipeline", **tags})
        tracker.log_params(run, params or {})
        run_id = run.wait(cfg.request_timeout_s * 3) or ""
    if not run_id:
        log.warning("tracking: MLflow at %s did not answer; this run is not logged", cfg.tracking_uri)
    return run_id
