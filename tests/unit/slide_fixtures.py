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
    path: Path,
    level0: np.ndarray,
    *,
    mpp: float = 0.25,
    levels: int = 3,
    subifds: bool = False,
    factor: int = 2,
    tile_px: int = 256,
) -> Path:
    """``level0`` as a tiled JPEG pyramid shrinking by ``factor`` ``levels - 1`` times (4: Aperio
    style): reduced levels as pages of their own (``subfiletype=1``) or, with ``subifds``, as
    SubIFDs of the base page (OME style)."""
    opts = {"tile": (tile_px, tile_px), "compression": "jpeg", "photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, subifds=levels - 1 if subifds else 0, **opts, **resolution(mpp))
        for k in range(1, levels):
            small = shrink(level0, max(level0.shape[:2]) // factor**k)
            tif.write(small, subfiletype=1, **opts, **resolution(mpp * factor**k))
    return path
