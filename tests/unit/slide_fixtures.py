"""Slides written by the tests themselves: pyramids stored the ways scanners and converters store them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from digilut.tissue import shrink


def resolution(mpp: float) -> dict[str, object]:
    """tifffile keywords for ``mpp`` µm/px."""
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def write_pyramid(
    path: Path, level0: np.ndarray, *, mpp: float = 0.25, levels: int = 3, subifds: bool = False
) -> Path:
    """``level0`` as a tiled JPEG pyramid halving ``levels - 1`` times: reduced levels as pages of
    their own (``subfiletype=1``) or, with ``subifds``, as SubIFDs of the base page (OME style)."""
    opts = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, subifds=levels - 1 if subifds else 0, **opts, **resolution(mpp))
        for k in range(1, levels):
            small = shrink(level0, max(level0.shape[:2]) // 2**k)
            tif.write(small, subfiletype=1, **opts, **resolution(mpp * 2**k))
    return path
