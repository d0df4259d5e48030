"""Step ``label``: each patch 1/0 by its overlap with its slide's boxes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from digilut.annotations import check_slide_sizes
from digilut.extract import PrepareReport
from digilut.labels import LabelConfig, label_patches
from digilut.manifest import (
    MANIFEST_NAME,
    read_manifest,
    write_manifest,
)
from digilut.steps.common import read_boxes

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """The labelled manifest and the boxes dropped on the way (slides whose ``max_x/max_y`` disagree
    with their real size), one message each."""

    manifest: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    @property
    def positives(self) -> int:
        return int(self.manifest["label"].sum())


def label_step(patches: Path, annotations: Path, labels: Path, cfg: LabelConfig) -> Labelled:
    """Label every patch of ``patches`` by its overlap with the boxes of ``annotations``."""
    labels.mkdir(parents=True, exist_ok=True)
    manifest, boxes = read_manifest(patches), read_boxes(annotations)
    problems: list[str] = []
    if (patches / "report.json").is_file():  # boxes must be in the frame of the slides' real size
        report = PrepareReport.load(patches / "report.json")
        sizes = {s: (r.width, r.height) for s, r in report.slides.items() if r.status == "ok"}
        boxes, problems, wrong_size = check_slide_sizes(boxes, sizes)
        for msg in problems:
            log.warning("%s", msg)
        manifest = manifest[~manifest["slide"].isin(wrong_size)].reset_index(drop=True)
    df = label_patches(manifest, boxes, cfg)
    write_manifest(df, labels / MANIFEST_NAME)
    return Labelled(df, problems)
