"""Steps ``predict`` (the test patches of a run) and ``predict_all`` (every patch of new slides)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from digilut.boxes import BOXES_CONFIG_NAME
from digilut.manifest import (
    read_manifest,
    shard_store,
    write_manifest,
)
from digilut.model import select_device
from digilut.predict import PredictConfig, predict_patches
from digilut.steps.common import PREDICTIONS_NAME
from digilut.train_config import FoldResult

log = logging.getLogger(__name__)


def predict_step(
    patches: Path,
    split: Path,
    models: list[Path],
    predictions: Path,
    cfg: PredictConfig,
    *,
    rows: str = "test",
    device: str = "auto",
) -> pd.DataFrame:
    """Mean probability of the fold models on the ``rows`` split's patches (``all``, or a manifest
    without a split: every patch); writes ``predictions.parquet``.

    ``split``: the split artifact (folder) or a manifest file; ``patches``: the folder whose
    ``shards.json`` names the shard store (without one, the folder holding the shards); ``models``:
    fold folders (their ``result.json`` names the model file) or model files; ``predictions``: the
    output folder, or a ``.parquet`` file (``digilut predict``)."""
    df = read_manifest(split)
    if rows != "all" and "split" in df.columns:
        df = df[df["split"] == rows]
    files = [m / FoldResult.load(m).model_file if m.is_dir() else m for m in models]
    out = predict_patches(df, shard_store(patches), files, cfg, select_device(device))
    write_manifest(out, predictions if predictions.suffix == ".parquet" else predictions / PREDICTIONS_NAME)
    return out


def predict_all_step(patches: Path, models: Path, predictions: Path, cfg: PredictConfig) -> pd.DataFrame:
    """Mean probability of the ensemble in ``models`` on every patch of ``patches``."""
    predictions.mkdir(parents=True, exist_ok=True)
    files = sorted(models.glob("model*.pt"))
    out = predict_patches(read_manifest(patches), shard_store(patches), files, cfg, select_device())
    write_manifest(out, predictions / PREDICTIONS_NAME)
    if (models / BOXES_CONFIG_NAME).is_file():  # the ensemble's tuned boxes config goes with its output
        shutil.copy2(models / BOXES_CONFIG_NAME, predictions / BOXES_CONFIG_NAME)
    return out
