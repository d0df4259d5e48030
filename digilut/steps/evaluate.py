"""Step ``evaluate``: tune threshold and boxes on out-of-fold predictions, score the test slides."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from digilut.boxes import BOXES_CONFIG_NAME, BoxesConfig, save_boxes_config
from digilut.evaluate import evaluate_predictions
from digilut.geojson import GEOJSON_DIR, write_geojson
from digilut.heatmap import build_heatmaps
from digilut.report import RunFigures, run_figures, write_report
from digilut.steps.common import PREDICTIONS_NAME, read_boxes
from digilut.train_config import FoldResult

log = logging.getLogger(__name__)


def _oof(model_dirs: list[Path]) -> pd.DataFrame:
    parts = [pd.read_parquet(d / FoldResult.load(d).oof_file) for d in model_dirs]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def evaluate_step(
    predictions: Path,
    model_dirs: list[Path],
    annotations: Path,
    thumbnails: Path | None,
    results: Path,
    boxes_cfg: BoxesConfig | None = None,
    *,
    tune_boxes: bool = True,
    title: str = "digilut run",
) -> RunFigures:
    """Boxes (N per test slide; post-processing tuned on out-of-fold slides), score and report into
    ``results``; return what the KFP UI shows of it (scalars, ROC, confusion matrix)."""
    results.mkdir(parents=True, exist_ok=True)
    pred = pd.read_parquet(predictions / PREDICTIONS_NAME)
    truth = read_boxes(annotations)
    test_truth = truth[truth["filename"].isin(set(pred["slide"]))]
    oof = _oof(model_dirs)
    oof_truth = truth[truth["filename"].isin(set(oof["slide"]))] if len(oof) else None
    ev = evaluate_predictions(
        pred,
        test_truth,
        oof=oof if len(oof) else None,
        oof_truth=oof_truth if tune_boxes else None,
        boxes_config=None if tune_boxes else boxes_cfg,
        tune_base=boxes_cfg,
    )
    ev.save(results)
    hms = build_heatmaps(pred) if len(pred) else {}
    write_geojson(results / GEOJSON_DIR, ev.boxes, hms, test_truth, slides=sorted(hms))
    folds = [FoldResult.load(d) for d in model_dirs]
    models = [f"fold {r.fold}: {r.init.get('words', 'initialisation not recorded')}" for r in folds]
    write_report(
        ev, pred, test_truth, results, thumbnails=thumbnails, title=title, heatmaps=hms, models=models
    )
    (results / "models").mkdir(exist_ok=True)
    for d in model_dirs:  # the ensemble travels with the results: the inference pipeline reads it
        r = FoldResult.load(d)
        shutil.copy2(d / r.model_file, results / "models" / f"fold{r.fold}.pt")
    save_boxes_config(ev.boxes_config, results / "models" / BOXES_CONFIG_NAME)  # tuned: travels too
    return run_figures(ev, pred)
