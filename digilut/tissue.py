"""Tissue masks with pyFAST (colour thresholding), and tissue fractions of a patch grid.

pyFAST is imported inside the function (it prints a banner, starts threads and compiles OpenCL
kernels on first use): nothing happens at import time. Its default ``TissueSegmentation`` downloads
a neural network at run time; we use its offline colour-thresholding method.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digilut.errors import SlideReadError


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and its scale: level-0 px per mask px along x and y."""

    mask: np.ndarray  # H×W bool
    scale_x: float
    scale_y: float

    def fractions(self, x0: np.ndarray, y0: np.ndarray, w0: np.ndarray, h0: np.ndarray) -> np.ndarray:
        """Tissue fraction of each level-0 rectangle (vectorised, via a summed-area table)."""
        sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int32)  # masks < 2**31 px
        sat[1:, 1:] = self.mask.cumsum(0, dtype=np.int32)
        sat[1:, 1:].cumsum(1, out=sat[1:, 1:])
        hm, wm = self.mask.shape
        c0 = np.clip(np.floor(x0 / self.scale_x).astype(np.int64), 0, wm)
        c1 = np.clip(np.ceil((x0 + w0) / self.scale_x).astype(np.int64), 0, wm)
        r0 = np.clip(np.floor(y0 / self.scale_y).astype(np.int64), 0, hm)
        r1 = np.clip(np.ceil((y0 + h0) / self.scale_y).astype(np.int64), 0, hm)
        area = np.maximum((c1 - c0) * (r1 - r0), 1)
        inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        return (inside / area).astype(np.float32)


def fast_tissue_mask(
    path: str | Path,
    slide_width: int,
    slide_height: int,
    *,
    threshold: int = 85,
    dilation_px: int = 9,
    erosion_px: int = 9,
) -> TissueMask:
    """Segment tissue with pyFAST's colour-thresholding ``TissueSegmentation``.

    ``threshold`` is FAST's distance from white (255,255,255) above which a pixel is tissue.
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import fast

    fast.Reporter.setGlobalReportMethod(fast.Reporter.NONE)
    try:
        importer = fast.WholeSlideImageImporter.create(str(path))
        seg = fast.TissueSegmentation.create(
            useColorThresholdingMethod=True,
            threshold=threshold,
            dilationSize=dilation_px,
            erosionSize=erosion_px,
        ).connect(importer)
        out = seg.runAndGetOutputData()
        mask = np.asarray(out)
    except RuntimeError as err:
        raise SlideReadError(f"{path}: pyFAST tissue segmentation failed ({err})") from err
    mask = mask.reshape(mask.shape[0], mask.shape[1]) > 0
    return TissueMask(mask, slide_width / mask.shape[1], slide_height / mask.shape[0])


def threshold_tissue_mask(
    rgb: np.ndarray, slide_width: int, slide_height: int, *, threshold: int = 85, closing_px: int = 2
) -> TissueMask:
    """Tissue mask of a small whole-slide image by pyFAST's colour rule, without pyFAST.

    A pixel is tissue when its distance from white exceeds ``threshold`` (the rule of pyFAST's
    colour-thresholding ``TissueSegmentation``), then holes of ``closing_px`` are closed. Used for
    slides pyFAST cannot open or would read whole (striped or non-pyramidal TIFFs): ``rgb`` is then a
    streamed, shrunk copy of the slide, so memory stays bounded.
    """
    from scipy import ndimage

    dist2 = np.zeros(rgb.shape[:2], np.int32)  # squared distance from white, channel by channel
    for c in range(3):
        dist2 += (255 - rgb[..., c].astype(np.int32)) ** 2
    mask = dist2 > threshold * threshold
    if closing_px > 0:
        mask = ndimage.binary_closing(mask, iterations=closing_px, border_value=0)
    return TissueMask(mask, slide_width / mask.shape[1], slide_height / mask.shape[0])
