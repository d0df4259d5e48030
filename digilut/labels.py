"""Patch labels: the overlap of every patch with its slide's boxes, vectorised.

``mode="patch_fraction"`` (the original method): intersection / patch area, a patch is a lesion
when it is at least ``min_overlap`` (default 0.1) covered by one box. ``mode="iou"``: intersection
over union with the best box. The score is stored beside the 0/1 label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from digilut.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelConfig:
    mode: Literal["patch_fraction", "iou"] = "patch_fraction"
    min_overlap: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("patch_fraction", "iou"):
            raise ConfigError(f"label mode={self.mode!r}: choose patch_fraction or iou")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ConfigError(f"min_overlap={self.min_overlap} must be in (0, 1]")


def overlap_scores(patches: np.ndarray, boxes: np.ndarray, mode: str = "patch_fraction") -> np.ndarray:
    """Best overlap of each patch with any box.

    ``patches``: n×4 ``x0, y0, w0, h0``; ``boxes``: m×4 ``x1, x2, y1, y2`` (level-0 px).
    Returns n floats in [0, 1] (zeros when m = 0). Memory O(n·m) per call: call per slide.
    """
    n = len(patches)
    if n == 0 or len(boxes) == 0:
        return np.zeros(n, np.float32)
    p = patches.astype(np.float64)
    b = boxes.astype(np.float64)
    px1, py1 = p[:, 0:1], p[:, 1:2]
    px2, py2 = px1 + p[:, 2:3], py1 + p[:, 3:4]
    iw = np.clip(np.minimum(px2, b[:, 1]) - np.maximum(px1, b[:, 0]), 0, None)
    ih = np.clip(np.minimum(py2, b[:, 3]) - np.maximum(py1, b[:, 2]), 0, None)
    inter = iw * ih
    parea = (p[:, 2] * p[:, 3])[:, None]
    if mode == "iou":
        barea = ((b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]))[None, :]
        score = inter / np.maximum(parea + barea - inter, 1e-9)
    else:
        score = inter / np.maximum(parea, 1e-9)
    return score.max(axis=1).astype(np.float32)


def label_patches(manifest: pd.DataFrame, boxes: pd.DataFrame, cfg: LabelConfig) -> pd.DataFrame:
    """Return ``manifest`` with ``overlap`` and ``label`` columns from ``boxes`` (filename,x1,x2,y1,y2)."""
    out = manifest.copy()
    overlap = np.zeros(len(out), np.float32)
    by_slide = {str(k): g[["x1", "x2", "y1", "y2"]].to_numpy() for k, g in boxes.groupby("filename")}
    for slide, idx in out.groupby("slide").indices.items():
        b = by_slide.get(str(slide))
        if b is not None:
            overlap[idx] = overlap_scores(out.iloc[idx][["x0", "y0", "w0", "h0"]].to_numpy(), b, cfg.mode)
    out["overlap"] = overlap
    out["label"] = (overlap >= cfg.min_overlap).astype(np.int8)
    log.info(
        "labels: %d of %d patches positive (%s ≥ %g) over %d slides with boxes",
        int(out["label"].sum()),
        len(out),
        cfg.mode,
        cfg.min_overlap,
        len(by_slide),
    )
    return out
