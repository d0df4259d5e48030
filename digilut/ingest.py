"""Ingest: find the slides and annotations of a data source and fetch slides for a worker.

A data source is a local folder or an S3 prefix with the same layout::

    DATA/images/<patient>_a.tif, <patient>_b.tif, ...
    DATA/train.csv            (training boxes; optional for inference)

``ingest_data`` lists the slides, validates ``train.csv`` against them (bad rows dropped and
reported) and cuts the slides into batches for parallel extraction. ``fetch_slides`` gives a worker
local paths for its batch: the files themselves for a local source, downloads for S3.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from digilut.annotations import (
    BOX_COLUMNS,
    SLIDE_SUFFIXES,
    check_slide_name,
    list_slides,
    patient_of,
    read_boxes_csv,
    safe_slide_names,
)
from digilut.errors import ConfigError, SlideNotFoundError
from digilut.shards import atomic_write

if TYPE_CHECKING:
    from digilut.storage import S3Config

log = logging.getLogger(__name__)
BOXES_NAME = "boxes.csv"
INGEST_NAME = "ingest.json"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_target(uri: str) -> tuple[S3Config, str]:
    """The S3 settings (bucket from the URI, endpoint and keys from the environment) and prefix."""
    from dataclasses import replace

    from digilut.storage import S3Config, parse_s3_uri

    bucket, prefix = parse_s3_uri(uri)
    return replace(S3Config.from_env(), bucket=bucket), prefix.strip("/")


def list_source_slides(data_uri: str) -> list[str]:
    """Slide names (``*.tif``/``*.tiff``) under ``DATA/images`` of a folder or S3 prefix, sorted."""
    if not is_s3(data_uri):
        images = Path(data_uri) / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"{images}: no images folder (expected DATA/images/*.tif)")
        return list_slides(images)
    from digilut.storage import list_keys

    cfg, prefix = s3_target(data_uri)
    base = f"{prefix}/images/" if prefix else "images/"
    names = []
    for key in list_keys(cfg, base):
        name = key[len(base) :]
        if "/" in name or not name.lower().endswith(SLIDE_SUFFIXES):
            continue
        names.append(name)
    return safe_slide_names(names)


def fetch_file(data_uri: str, name: str, dest: Path) -> Path | None:
    """A top-level file of the source (e.g. ``train.csv``) as a local path; None when absent."""
    if not is_s3(data_uri):
        p = Path(data_uri) / name
        return p if p.is_file() else None
    from digilut.storage import download_file, list_keys

    cfg, prefix = s3_target(data_uri)
    key = f"{prefix}/{name}" if prefix else name
    if key not in list_keys(cfg, key):
        return None
    return download_file(cfg, key, dest / name)


def fetch_slides(data_uri: str, names: list[str], dest: Path) -> dict[str, Path]:
    """Local paths of the slides ``names``: in place for a folder, downloaded into ``dest`` for S3."""
    paths: dict[str, Path] = {}
    for name in names:
        check_slide_name(name)  # before any path join
        if not is_s3(data_uri):
            p = Path(data_uri) / "images" / name
            if not p.is_file():
                raise SlideNotFoundError(f"{p}: slide not found")
            paths[name] = p
            continue
        from digilut.storage import download_file

        cfg, prefix = s3_target(data_uri)
        key = f"{prefix}/images/{name}" if prefix else f"images/{name}"
        paths[name] = download_file(cfg, key, dest / "images" / name)
    return paths


@dataclass
class IngestResult:
    """What a data source holds: its slides, the valid boxes and the batches for extraction."""

    slides: list[str]
    batches: list[list[str]]
    boxes: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / BOXES_NAME, [self.boxes.to_csv(index=False).encode()])
        info = {"slides": self.slides, "batches": self.batches, "problems": self.problems}
        atomic_write(out_dir / INGEST_NAME, [json.dumps(info, indent=2).encode()])


def make_batches(slides: list[str], batch_size: int) -> list[list[str]]:
    """Consecutive batches of at most ``batch_size`` slides; a patient's slides stay together."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be ≥ 1")
    batches: list[list[str]] = []
    for slide in slides:
        same_patient = batches and patient_of(batches[-1][-1]) == patient_of(slide)
        if batches and (len(batches[-1]) < batch_size or same_patient):
            batches[-1].append(slide)
        else:
            batches.append([slide])
    return batches


def ingest_data(
    data_uri: str, out_dir: str | Path, *, batch_size: int = 8, require_boxes: bool = True
) -> IngestResult:
    """List and validate a data source; write ``boxes.csv`` and ``ingest.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    slides = list_source_slides(data_uri)
    if not slides:
        raise SlideNotFoundError(f"{data_uri}: no slides under images/ (expected images/*.tif)")
    csv = fetch_file(data_uri, "train.csv", out_dir / "source")
    problems: list[str] = []
    if csv is None:
        if require_boxes:
            raise FileNotFoundError(f"{data_uri}: no train.csv (training needs the boxes)")
        boxes = pd.DataFrame(columns=[*BOX_COLUMNS, "patient"])
    else:
        table = read_boxes_csv(csv, slides=slides)
        table.log_problems()
        boxes, problems = table.rows, [str(p) for p in table.problems]
    result = IngestResult(slides, make_batches(slides, batch_size), boxes, problems)
    result.save(out_dir)
    log.info(
        "ingest %s: %d slides of %d patients in %d batch(es); %d boxes, %d CSV row problem(s)",
        data_uri,
        len(slides),
        len({patient_of(s) for s in slides}),
        len(result.batches),
        len(boxes),
        len(problems),
    )
    return result
