"""Small helpers the steps share: JSON results, the boxes of an annotations artifact, publishing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from digilut.files import atomic_write
from digilut.ingest import (
    BOXES_NAME,
)

log = logging.getLogger(__name__)


PREDICTIONS_NAME = "predictions.parquet"


def write_json(path: Path, data: object) -> None:
    atomic_write(path, [json.dumps(data, indent=2, default=str).encode()])


def read_boxes(annotations: Path) -> pd.DataFrame:
    """The validated boxes of an ``annotations`` artifact."""
    return pd.read_csv(annotations / BOXES_NAME)


def publish_results(results: Path, results_uri: str) -> None:
    """Copy the results folder to ``results_uri``: a folder or ``s3://`` prefix ("" = nowhere)."""
    if results_uri.startswith("s3://"):
        from digilut.ingest import s3_target
        from digilut.storage import upload_dir

        cfg, prefix = s3_target(results_uri)
        upload_dir(cfg, results, prefix)
        log.info("results uploaded to %s", results_uri)
    elif results_uri:
        shutil.copytree(results, results_uri, dirs_exist_ok=True)
        log.info("results copied to %s", results_uri)
