"""Per-patch probabilities → a heatmap per slide at stride resolution.

Patches are read from a manifest with a ``prob`` column: ``slide, x0, y0, w0, h0, prob`` (level-0
top-left corner and extent, probability 0..1). Patches of one slide lie on a regular grid of
level-0 step ``stride_px`` (256 px for 128 px at 20x on a 0.25 µm/px slide) and overlap when the
extent is larger than the step (512 px patches at a 256 px step cover 2×2 cells).

The heatmap has one *cell* per grid step: cell ``(r, c)`` covers level-0
``[x_px + c·stride_px, x_px + (c+1)·stride_px) × [y_px + r·stride_px, …)``. Its value is the mean
probability of the patches that cover it, so a cell inside a lesion seen by four overlapping
patches is 1.0 and a cell on its rim, seen by two of four, is 0.5. Cells no patch covers (glass)
are 0 with ``count == 0``.

The stride is not stored in the manifest: :func:`infer_stride_px` takes the greatest common
divisor of the distinct corner offsets (x and y together), which is the grid step whenever two
patches are one step apart, or it can be given explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import reduce
from math import gcd

import numpy as np
import pandas as pd

from digilut.errors import ConfigError

log = logging.getLogger(__name__)

PATCH_COLUMNS = ("slide", "x0", "y0", "w0", "h0", "prob")
MAX_CELLS = 50_000_000  # a full DigiLut slide at 256 px is ~0.25 M cells; more means a wrong stride


@dataclass(frozen=True)
class Heatmap:
    """One slide's heatmap at stride resolution (arrays indexed ``[row, col]`` = ``[y, x]``).

    ``prob``: mean probability of the patches covering each cell (0 where none does).
    ``count``: number of patches covering each cell.
    ``patch_prob``: probability of the patch whose top-left corner is the cell (NaN where no patch
    starts there); the patch covers ``patch_cells = (rows, cols)`` cells from there.
    """

    slide: str
    x_px: int  # level-0 x of the left edge of column 0
    y_px: int  # level-0 y of the top edge of row 0
    stride_px: int  # level-0 side of one cell (the patch grid step)
    patch_cells: tuple[int, int]  # (rows, cols) of cells one patch covers
    prob: np.ndarray  # float32 (rows, cols)
    count: np.ndarray  # int32 (rows, cols)
    patch_prob: np.ndarray  # float32 (rows, cols), NaN where no patch starts

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.prob.shape[0]), int(self.prob.shape[1]))

    @property
    def patch_px(self) -> tuple[int, int]:
        """Level-0 (width, height) of one patch."""
        return (self.patch_cells[1] * self.stride_px, self.patch_cells[0] * self.stride_px)

    @property
    def extent_px(self) -> tuple[int, int, int, int]:
        """Level-0 ``(x1, x2, y1, y2)`` covered by the grid."""
        rows, cols = self.shape
        return (self.x_px, self.x_px + cols * self.stride_px, self.y_px, self.y_px + rows * self.stride_px)

    def cells_to_box(self, r1: int, r2: int, c1: int, c2: int) -> tuple[int, int, int, int]:
        """Level-0 ``(x1, x2, y1, y2)`` of the cell rows ``r1..r2`` and columns ``c1..c2`` (inclusive)."""
        s = self.stride_px
        return (self.x_px + c1 * s, self.x_px + (c2 + 1) * s, self.y_px + r1 * s, self.y_px + (r2 + 1) * s)


def infer_stride_px(x0: np.ndarray, y0: np.ndarray) -> int | None:
    """The patch grid step: gcd of the distinct corner offsets from the first corner (x and y).

    ``None`` when all patches share one corner (a single patch: the step is unknowable).
    """
    xs = np.unique(np.asarray(x0, dtype=np.int64))
    ys = np.unique(np.asarray(y0, dtype=np.int64))
    diffs = np.concatenate([xs[1:] - xs[0], ys[1:] - ys[0]]).tolist()
    if not diffs:
        return None
    return int(reduce(gcd, diffs))


def _check_patches(patches: pd.DataFrame) -> None:
    missing = [c for c in PATCH_COLUMNS if c not in patches.columns]
    if missing:
        raise ConfigError(
            f"patch table lacks column(s) {', '.join(missing)}; need {', '.join(PATCH_COLUMNS)} "
            "(the manifest plus a prob column)"
        )
    probs = patches["prob"].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(
            f"prob={float(probs[i])!r} of patch {patches['slide'].iloc[i]} x0={patches['x0'].iloc[i]} "
            f"y0={patches['y0'].iloc[i]} is not a probability in [0, 1] ({int(bad.sum())} such row(s))"
        )


def build_heatmap(patches: pd.DataFrame, *, stride_px: int | None = None) -> Heatmap:
    """Heatmap of ONE slide from its patches (``slide, x0, y0, w0, h0, prob``).

    ``stride_px``: the level-0 grid step; inferred with :func:`infer_stride_px` when ``None``.
    The patch extent in cells is the slide's most common ``w0``/``h0`` divided by the step,
    rounded (at least 1). Patches sharing a corner are averaged.
    """
    _check_patches(patches)
    slides = patches["slide"].unique()
    if len(slides) != 1:
        raise ConfigError(
            f"build_heatmap needs the patches of exactly one slide, got {len(slides)}; "
            "use build_heatmaps for many"
        )
    slide = str(slides[0])
    x0 = patches["x0"].to_numpy(dtype=np.int64)
    y0 = patches["y0"].to_numpy(dtype=np.int64)
    w0 = int(patches["w0"].mode().iloc[0])
    h0 = int(patches["h0"].mode().iloc[0])
    if w0 <= 0 or h0 <= 0:
        raise ConfigError(f"{slide}: patch extent w0={w0}, h0={h0} must be positive")
    if stride_px is None:
        stride_px = infer_stride_px(x0, y0) or min(w0, h0)
    if stride_px <= 0:
        raise ConfigError(f"stride_px={stride_px} must be a positive number of level-0 pixels")
    ox, oy = int(x0.min()), int(y0.min())
    if ((x0 - ox) % stride_px).any() or ((y0 - oy) % stride_px).any():
        raise ConfigError(
            f"{slide}: stride_px={stride_px} does not divide the patch corner offsets; "
            f"inferred step is {infer_stride_px(x0, y0)} px"
        )
    kr, kc = max(1, round(h0 / stride_px)), max(1, round(w0 / stride_px))
    col = ((x0 - ox) // stride_px).astype(np.int64)
    row = ((y0 - oy) // stride_px).astype(np.int64)
    rows, cols = int(row.max()) + kr, int(col.max()) + kc
    if rows * cols > MAX_CELLS:
        raise ConfigError(
            f"{slide}: a {rows}×{cols} cell grid at stride_px={stride_px} is implausibly large "
            f"(> {MAX_CELLS} cells); pass the patch step explicitly"
        )
    prob = patches["prob"].to_numpy(dtype=np.float64)
    psum = np.zeros((rows, cols), np.float64)
    pcount = np.zeros((rows, cols), np.int32)
    np.add.at(psum, (row, col), prob)
    np.add.at(pcount, (row, col), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        patch_prob = np.where(pcount > 0, psum / np.maximum(pcount, 1), np.nan).astype(np.float32)
    # Each cell sums the probabilities of the kr×kc patch corners above-left of it.
    starts = np.nan_to_num(patch_prob, nan=0.0).astype(np.float64)
    has = (pcount > 0).astype(np.int32)
    csum = np.zeros((rows, cols), np.float64)
    ccount = np.zeros((rows, cols), np.int32)
    for dr in range(kr):
        for dc in range(kc):
            csum[dr:, dc:] += starts[: rows - dr, : cols - dc]
            ccount[dr:, dc:] += has[: rows - dr, : cols - dc]
    cell = np.where(ccount > 0, csum / np.maximum(ccount, 1), 0.0).astype(np.float32)
    log.debug(
        "%s: heatmap %d×%d cells of %d px (patch %d×%d cells), %d patches",
        slide,
        rows,
        cols,
        stride_px,
        kr,
        kc,
        len(patches),
    )
    return Heatmap(slide, ox, oy, int(stride_px), (kr, kc), cell, ccount, patch_prob)


def build_heatmaps(patches: pd.DataFrame, *, stride_px: int | None = None) -> dict[str, Heatmap]:
    """Heatmaps of every slide in ``patches``, keyed by slide name (stride inferred per slide)."""
    _check_patches(patches)
    return {
        str(slide): build_heatmap(group, stride_px=stride_px)
        for slide, group in patches.groupby("slide", sort=True, observed=True)
    }
