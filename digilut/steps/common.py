"""Small helpers the steps share: configs from pipeline parameters, JSON results, the boxes of an
annotations artifact (publishing a folder is :func:`digilut.locations.publish_results`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from digilut.files import atomic_write
from digilut.ingest import BOXES_NAME

log = logging.getLogger(__name__)


PREDICTIONS_NAME = "predictions.parquet"

C = TypeVar("C")


def config_from(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    """The config dataclass ``cls`` from the pipeline parameters in ``values`` named as its fields
    (``prefix`` + field name, e.g. ``label_mode`` for ``LabelConfig.mode``); the fields without a
    parameter keep their defaults. A component passes its ``locals()``."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: values[prefix + n] for n in names if prefix + n in values})


def write_json(path: Path, data: object) -> None:
    atomic_write(path, [json.dumps(data, indent=2, default=str).encode()])


def read_boxes(annotations: Path) -> pd.DataFrame:
    """The validated boxes of an ``annotations`` artifact."""
    return pd.read_csv(annotations / BOXES_NAME)
