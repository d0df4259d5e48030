"""Small helpers the steps share: JSON results, the boxes of an annotations artifact, the device."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from digilut.files import atomic_write
from digilut.ingest import (
    BOXES_NAME,
)

if TYPE_CHECKING:  # torch and digilut.train load in the GPU steps only: the CPU image has no torch
    import torch

log = logging.getLogger(__name__)


PREDICTIONS_NAME = "predictions.parquet"


def pick_device() -> torch.device:
    """The device for training/prediction, chosen once per step: CUDA when present, else CPU; a
    task the pipeline put on a GPU (``DIGILUT_REQUIRE_GPU=1``) fails here when CUDA is missing."""
    from digilut.model import select_device

    return select_device("auto")


def write_json(path: Path, data: object) -> None:
    atomic_write(path, [json.dumps(data, indent=2, default=str).encode()])


def read_boxes(annotations: Path) -> pd.DataFrame:
    """The validated boxes of an ``annotations`` artifact."""
    return pd.read_csv(annotations / BOXES_NAME)
