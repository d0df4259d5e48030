"""Patch tables from truth boxes: a perfect classifier with the labeller's rule (≥ 10 % box cover)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def oracle_patches(
    boxes: list[tuple[int, int, int, int]],
    *,
    slide: str = "s_a.tif",
    width: int = 8192,
    height: int = 8192,
    stride: int = 256,
    patch: int = 512,
    origin: tuple[int, int] = (0, 0),
) -> pd.DataFrame:
    """Every patch of a ``width × height`` region at ``stride``; ``prob`` = 1 where one box covers
    at least 10 % of the patch. ``boxes`` are ``(x1, x2, y1, y2)``, level-0 px."""
    xs = origin[0] + np.arange(0, width - patch + 1, stride)
    ys = origin[1] + np.arange(0, height - patch + 1, stride)
    x0, y0 = (a.ravel() for a in np.meshgrid(xs, ys))
    prob = np.zeros(len(x0))
    if boxes:
        b = np.asarray(boxes, dtype=np.int64)
        iw = np.clip(np.minimum(x0[:, None] + patch, b[:, 1]) - np.maximum(x0[:, None], b[:, 0]), 0, None)
        ih = np.clip(np.minimum(y0[:, None] + patch, b[:, 3]) - np.maximum(y0[:, None], b[:, 2]), 0, None)
        prob = ((iw * ih).max(axis=1) / patch**2 >= 0.1).astype(float)
    return pd.DataFrame({"slide": slide, "x0": x0, "y0": y0, "w0": patch, "h0": patch, "prob": prob})


def truth_frame(slide: str, boxes: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame([(slide, *b) for b in boxes], columns=["filename", "x1", "x2", "y1", "y2"])
