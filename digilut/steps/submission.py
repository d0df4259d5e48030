"""Step ``submission``: heatmaps to N boxes per slide, the challenge CSV and GeoJSON.

:func:`write_boxes` is its boxes part, also what ``digilut boxes`` runs on a probabilities file."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from digilut.boxes import BOXES_CONFIG_NAME, BoxesConfig, load_boxes_config
from digilut.files import atomic_write
from digilut.geojson import GEOJSON_DIR, write_geojson
from digilut.heatmap import build_heatmaps
from digilut.locations import publish_results
from digilut.steps.common import PREDICTIONS_NAME

if TYPE_CHECKING:
    from digilut.heatmap import Heatmap

log = logging.getLogger(__name__)


@dataclass
class SlideBoxes:
    """The boxes of every slide, the heatmaps they were found on and the GeoJSON files written."""

    boxes: pd.DataFrame
    heatmaps: dict[str, Heatmap]
    geojson: dict[str, Path] = field(default_factory=dict)


def write_boxes(
    pred: pd.DataFrame,
    counts: dict[str, int] | None,
    cfg: BoxesConfig,
    out_csv: Path,
    geojson: Path | None,
    *,
    truth: pd.DataFrame | None = None,
    stride_px: int | None = None,
) -> SlideBoxes:
    """N boxes per slide of ``counts`` (None: every component of every slide) from the patch
    probabilities ``pred`` into ``out_csv``, and one GeoJSON per slide (boxes, ``truth`` when given,
    heatmap contours) into the folder ``geojson`` when given. ``stride_px``: the patch grid's step
    in level-0 px (default: inferred per slide)."""
    from digilut.boxes import slide_boxes

    hms = build_heatmaps(pred, stride_px=stride_px) if len(pred) else {}
    boxes = slide_boxes(pred, counts, cfg, heatmaps=hms)
    atomic_write(out_csv, [boxes.to_csv(index=False).encode()])
    paths: dict[str, Path] = {}
    if geojson is not None:
        slides = sorted(hms if counts is None else set(counts) & set(hms))
        paths = write_geojson(geojson, boxes, hms, truth, slides=slides)
    return SlideBoxes(boxes, hms, paths)


def submission_step(
    data_uri: str, predictions: Path, results: Path, cfg: BoxesConfig, results_uri: str = ""
) -> Path:
    """N boxes per slide of the source's ``test.csv`` (``filename,max_x,max_y,trustii_id``) in the
    challenge submission format ``trustii_id,filename,y1,y2,x1,x2``. The boxes config the ensemble's
    training run tuned (``predictions/boxes_config.json``, carried from the models) replaces ``cfg``
    when present; ``cfg`` applies to an ensemble without one. The ``results`` folder is then copied
    to ``results_uri`` (a folder or ``s3://`` prefix; "" = nowhere)."""
    from digilut.annotations import expected_counts, read_test_list
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
    found = write_boxes(pred, expected_counts(table.rows), cfg, results / "boxes.csv", results / GEOJSON_DIR)
    path = write_submission(found.boxes, table.rows, results / "submission.csv")
    publish_results(results, results_uri)
    return path
