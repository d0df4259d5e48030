"""Step ``split``: train/test by patient, negatives undersampled, GroupKFold folds."""

from __future__ import annotations

import logging
from pathlib import Path

from digilut.manifest import (
    MANIFEST_NAME,
    read_manifest,
    write_manifest,
)
from digilut.split import SplitConfig, split_dataset
from digilut.steps.common import write_json

log = logging.getLogger(__name__)


def split_step(labels: Path, split: Path, cfg: SplitConfig) -> list[int]:
    """Split patients, undersample and assign folds; return the fold ids to train.

    ``labels``: a labelled patch set (folder or manifest file). ``split``: the output folder
    (``manifest.parquet`` + ``split.json``) or, for ``digilut split``, a ``.parquet`` file (and the
    summary beside it as ``<stem>.json``)."""
    manifest = split if split.suffix == ".parquet" else split / MANIFEST_NAME
    summary_path = manifest.with_suffix(".json") if split.suffix == ".parquet" else split / "split.json"
    df = split_dataset(read_manifest(labels, require=("patient", "label")), cfg)
    write_manifest(df, manifest)
    summary = {
        "test_patients": sorted(df.loc[df["split"] == "test", "patient"].unique().tolist()),
        "folds": {
            int(k): sorted(g["patient"].unique().tolist())
            for k, g in df[df["split"] == "train"].groupby("fold")
        },
        "config": cfg.__dict__,
    }
    write_json(summary_path, summary)
    return sorted(summary["folds"])


# --- model side ------------------------------------------------------------------------------
