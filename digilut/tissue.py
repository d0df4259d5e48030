"""Tissue masks with pyFAST (colour thresholding), and tissue fractions of a patch grid.

pyFAST segments every slide's tissue, from an overview image in memory: the reader here streams it
(a pyramid's coarsest level, or a shrunk copy of a striped/non-pyramidal slide, which pyFAST's own
importer cannot open or would read whole). pyFAST is imported inside the function (it prints a
banner, starts threads and compiles OpenCL kernels on first use): nothing happens at import time.
Its default ``TissueSegmentation`` downloads a neural network at run time; we use its offline
colour-thresholding method.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Iterator
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


def shrink(rgb: np.ndarray, max_side_px: int) -> np.ndarray:
    """``rgb`` shrunk by the smallest integer factor that brings its long side to ≤ ``max_side_px``
    (box mean; the last rows/columns that do not fill a box are dropped)."""
    f = max(1, -(-max(rgb.shape[:2]) // max_side_px))
    if f == 1:
        return rgb
    h, w = rgb.shape[0] // f, rgb.shape[1] // f
    block = rgb[: h * f, : w * f].reshape(h, f, w, f, 3)
    total = block.sum(axis=3, dtype=np.uint32).sum(axis=1)
    return ((total + f * f // 2) // (f * f)).astype(np.uint8)


_warm = threading.Lock()
_warmed = False  # this process has run pyFAST once: its OpenCL kernels are built and cached
CACHE_RACE = "OpenCL binary cache"  # pyFAST's error when it reads a cache file another process writes


@contextlib.contextmanager
def _first_use_lock() -> Iterator[None]:
    """Hold a machine-wide lock for this process's first pyFAST run.

    pyFAST compiles its OpenCL kernels on first use and writes the binaries to a cache shared by
    every process of the user (``~/FAST/kernel_binaries``), keyed by the installation; parallel
    extraction workers of a fresh installation race on it, and a reader of a half-written file fails
    with "Error parsing OpenCL binary cache file". Later runs read the cache and take no lock."""
    global _warmed
    if _warmed:
        yield
        return
    with _warm:
        path = Path(tempfile.gettempdir()) / f"digilut-pyfast-{os.getuid()}.lock"
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
                _warmed = True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _segment(rgb: np.ndarray, threshold: int, dilation_px: int, erosion_px: int) -> np.ndarray:
    import fast

    fast.Reporter.setGlobalReportMethod(fast.Reporter.NONE)
    image = fast.Image.createFromArray(np.ascontiguousarray(rgb))
    seg = fast.TissueSegmentation.create(
        useColorThresholdingMethod=True,
        threshold=threshold,
        dilationSize=dilation_px,
        erosionSize=erosion_px,
    ).connect(image)
    return np.asarray(seg.runAndGetOutputData())


def tissue_mask(
    rgb: np.ndarray,
    slide_width: int,
    slide_height: int,
    *,
    threshold: int = 85,
    dilation_px: int = 9,
    erosion_px: int = 9,
) -> TissueMask:
    """Segment tissue on ``rgb``, a whole-slide overview held in memory, with pyFAST's
    colour-thresholding ``TissueSegmentation`` (``fast.Image.createFromArray``).

    A pixel is tissue when its distance from white (255,255,255) exceeds ``threshold`` and it is not
    pure black (scan borders); the mask is then dilated by ``dilation_px`` and eroded by
    ``erosion_px`` (mask pixels). The overview is the slide's coarsest level or a streamed, shrunk
    copy of it (see :func:`digilut.patch_reader.read_overview`), so every slide — tiled, striped or
    non-pyramidal — gets the same rule; on a tiled pyramid the mask equals pyFAST's own
    ``WholeSlideImageImporter`` result (tested).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"tissue_mask needs an H×W×3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    for attempt in range(3):
        try:
            with _first_use_lock():
                mask = _segment(rgb, threshold, dilation_px, erosion_px)
            break
        except RuntimeError as err:
            if CACHE_RACE in str(err) and attempt < 2:  # written by another installation's run meanwhile
                time.sleep(0.5)
                continue
            raise SlideReadError(
                f"pyFAST tissue segmentation of a {rgb.shape[1]}×{rgb.shape[0]} overview failed ({err})"
            ) from err
    mask = mask.reshape(mask.shape[0], mask.shape[1]) > 0
    return TissueMask(mask, slide_width / mask.shape[1], slide_height / mask.shape[0])
