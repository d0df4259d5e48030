"""Step ``submission``: heatmaps to N boxes per slide, the challenge CSV and pictures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from digilut.boxes import BOXES_CONFIG_NAME, BoxesConfig, load_boxes_config
from digilut.files import atomic_write
from digilut.geojson import GEOJSON_DIR, write_geojson
from digilut.heatmap import build_heatmaps

if TYPE_CHECKING:  # torch and digilut.train load in the GPU steps only: the CPU image has no torch
    pass
from digilut.steps.common import PREDICTIONS_NAME

log = logging.getLogger(__name__)


def submission_step(data_uri: str, predictions: Path, results: Path, cfg: BoxesConfig) -> Path:
    """N boxes per slide of the source's ``test.csv`` (``filename,max_x,max_y,trustii_id``) in the
    challenge submission format ``trustii_id,filename,y1,y2,x1,x2``. The boxes config the ensemble's
    training run tuned (``predictions/boxes_config.json``, carried from the models) replaces ``cfg``
    when present; ``cfg`` applies to an ensemble without one."""
    from digilut.annotations import expected_counts, read_test_list
    from digilut.boxes import slide_boxes
    from digilut.locations import fetch_file
    from digilut.submission import write_submission

    results.mkdir(parents=True, exist_ok=True)
    test_csv = fetch_file(data_uri, "test.csv", results / "source")
    if test_csv is None:
        raise FileNotFoundError(f"{data_uri}: no test.csv (filename,max_x,max_y,trustii_id) to submit for")
    table = read_test_list(test_csv)
    table.log_problems()
    pred = pd.read_parquet(predictions / PREDICTIONS_NAME)
    if (predictions / BOXES_CONFIG_NAME).is_file():
        tuned = load_boxes_config(predictions / BOXES_CONFIG_NAME)
        if tuned.method != cfg.method:
            log.warning("boxes_method=%s ignored: the ensemble was tuned with %s", cfg.method, tuned.method)
        cfg = tuned
        log.info("submission: the ensemble's tuned boxes config: %s", cfg)
    counts = expected_counts(table.rows)
    hms = build_heatmaps(pred) if len(pred) else {}
    boxes = slide_boxes(pred, counts, cfg, heatmaps=hms)
    atomic_write(results / "boxes.csv", [boxes.to_csv(index=False).encode()])
    write_geojson(results / GEOJSON_DIR, boxes, hms, slides=sorted(set(counts) & set(hms)))
    return write_submission(boxes, table.rows, results / "submission.csv")
