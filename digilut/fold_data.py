"""The rows one cross-validation fold trains and validates on, and their content hash.

:func:`fold_rows` selects them from a split manifest; :func:`fold_data_digest` hashes the columns
that decide a fold's result, so a checkpoint or a finished fold is reused only for the same rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from digilut.errors import ConfigError
from digilut.train_config import TrainConfig

# Columns that decide what a fold trains on: a changed manifest (other patches, labels, split) means
# the saved state belongs to other data and the fold is retrained.
_DATA_COLUMNS = ("slide", "x0", "y0", "w0", "h0", "shard", "offset", "nbytes", "label", "fold", "sampled")


@dataclass(frozen=True)
class FoldData:
    """The training and validation rows of one fold."""

    train: pd.DataFrame
    val: pd.DataFrame


def fold_rows(manifest: pd.DataFrame, fold: int, cfg: TrainConfig) -> FoldData:
    """Training rows (other folds, ``sampled`` if ``use_sampled``, positives at least
    ``train_min_overlap`` inside their box) and validation rows (fold ``fold``, all of them)."""
    missing = [c for c in ("split", "fold", "label") if c not in manifest.columns]
    if missing:
        raise ConfigError(
            f"manifest lacks {', '.join(missing)}: run digilut prepare (with boxes) and digilut split"
        )
    train_side = manifest["split"] == "train"
    folds = sorted(int(f) for f in manifest.loc[train_side, "fold"].unique())
    if fold not in folds:
        raise ConfigError(f"fold={fold}: the manifest's training folds are {folds}")
    val = manifest[train_side & (manifest["fold"] == fold)]
    keep = train_side & (manifest["fold"] != fold)
    if cfg.use_sampled and "sampled" in manifest.columns:
        keep &= manifest["sampled"].astype(bool)
    if cfg.train_min_overlap > 0:
        if "overlap" not in manifest.columns:
            raise ConfigError(
                f"train_min_overlap={cfg.train_min_overlap} needs the manifest's overlap column "
                "(written by the label step): label the patches again, or set train_min_overlap=0"
            )
        keep &= ~((manifest["label"] == 1) & (manifest["overlap"] < cfg.train_min_overlap))
    train = manifest[keep]
    if cfg.max_val_patches and len(val) > cfg.max_val_patches:
        rng = np.random.default_rng([cfg.seed, fold, 5])
        val = val.iloc[np.sort(rng.choice(len(val), cfg.max_val_patches, replace=False))]
    if train.empty or train["label"].nunique() < 2:
        raise ConfigError(
            f"fold {fold}: the training rows hold {len(train)} patches and "
            f"{int(train['label'].sum()) if len(train) else 0} positives; training needs both classes"
        )
    return FoldData(train.reset_index(drop=True), val.reset_index(drop=True))


def fold_data_digest(data: FoldData) -> str:
    """SHA-256 of the rows a fold trains and validates on (the columns that decide the result)."""
    h = hashlib.sha256()
    for part in (data.train, data.val):
        cols = [c for c in _DATA_COLUMNS if c in part.columns]
        h.update(pd.util.hash_pandas_object(part[cols], index=False).to_numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()
