"""Writing a synthetic slide plan as a real 40x pyramid: a tiled-JPEG TIFF OpenSlide can read.

Level 0 and reduced levels halving down to a thumbnail, 512 px JPEG tiles, reduced pages marked
``subfiletype=1`` (so OpenSlide's generic-TIFF reader sees the pyramid), the mpp in the TIFF
resolution tags (pixels per centimetre) and in the description (``mpp=0.25``). Content: an
H&E-like texture (pink stroma, scattered purple nuclei) on white glass; lesions are cell-dense,
dark-purple regions inside tissue. Level 0 is drawn procedurally per tile from the plan's coarse
masks, and each reduced level is the 2×2 area average of the finer one (as scanners write their
pyramids), so even a full-size slide (83k × 197k px) is written with bounded memory.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from scipy import ndimage

from digilut.synth_plan import MASK_PX, MPP0, SlidePlan

TILE_PX = 512
THUMB_MAX_PX = 1024  # the last level is the first whose long side is at most this


def _texture(rng: np.random.Generator, size: int, mpp: float, lesion: bool) -> np.ndarray:
    """An H&E-like RGB float texture tile (0..255) at ``mpp`` µm/px."""
    # Nuclei: discs ~7 µm across; normal tissue sparse, lesions ~5× denser and darker.
    nucleus_px = 3.5 / mpp
    # ~1 nucleus per 350 µm² in normal tissue, ~1 per 55 µm² in a lesion (lymphocyte-dense).
    density = (0.0011 if lesion else 0.00018) * (mpp / MPP0) ** 2  # nuclei per pixel
    field_ = np.zeros((size, size), np.float32)
    n = rng.poisson(density * size * size)
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    np.add.at(field_, (ys, xs), 1.0)
    if nucleus_px >= 0.7:
        field_ = ndimage.gaussian_filter(field_, nucleus_px * 0.6, mode="wrap") * (nucleus_px**2) * 2.2
    else:
        field_ = ndimage.gaussian_filter(field_, 0.7, mode="wrap") * 2.2
    nuc = np.clip(field_, 0, 1)[..., None]
    fibres = ndimage.gaussian_filter(
        rng.standard_normal((size, size)).astype(np.float32), (1.0, 6.0), mode="wrap"
    )
    stroma_base = np.array([236, 160, 196] if not lesion else [205, 130, 185], np.float32)
    stroma = stroma_base + fibres[..., None] * np.array([18, 30, 20], np.float32) * 3
    nucleus_col = np.array([70, 40, 120] if not lesion else [52, 25, 100], np.float32)
    return np.clip(stroma * (1 - nuc) + nucleus_col * nuc, 0, 255).astype(np.float32)


BANK_PX = 1024


def _interp_weights(start_px: int, scale: float, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Linear-interpolation weights from mask cells to TILE_PX pixels starting at ``start_px``."""
    pos = np.clip((start_px + np.arange(TILE_PX) + 0.5) * scale - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).astype(np.float32)
    first, last = int(lo.min()), int(hi.max()) + 1
    w = np.zeros((TILE_PX, last - first), np.float32)
    rows = np.arange(TILE_PX)
    np.add.at(w, (rows, lo - first), 1 - frac)
    np.add.at(w, (rows, hi - first), frac)
    return w, (first, last)


@functools.lru_cache(maxsize=16)
def _texture_bank(level: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal and lesion textures at a level's scale (shared by all slides; tiles vary by offset)."""
    rng = np.random.default_rng([level, 99])
    mpp = MPP0 * 2**level
    return _texture(rng, BANK_PX, mpp, lesion=False), _texture(rng, BANK_PX, mpp, lesion=True)


GLASS = 242  # background grey level


class _Renderer:
    """Renders level-0 tiles of one slide from its plan and texture banks."""

    def __init__(self, plan: SlidePlan) -> None:
        self.plan = plan
        self.normal, self.lesion = _texture_bank(0)
        self.bank = BANK_PX

    def _mask(self, m: np.ndarray, ty: int, tx: int) -> np.ndarray:
        """The coarse mask sampled bilinearly at the tile's pixel centres (separable: Wy @ M @ Wxᵀ)."""
        wy, iy = _interp_weights(ty * TILE_PX, 1 / MASK_PX, m.shape[0])
        wx, ix = _interp_weights(tx * TILE_PX, 1 / MASK_PX, m.shape[1])
        return (wy @ m[iy[0] : iy[1], ix[0] : ix[1]] @ wx.T).astype(np.float32)

    def tile(self, ty: int, tx: int) -> np.ndarray | None:
        """RGB pixels of level-0 tile ``(tx, ty)``; None for bare glass (no tissue near it)."""
        scale = 1 / MASK_PX
        y0, x0 = int(ty * TILE_PX * scale), int(tx * TILE_PX * scale)
        y1, x1 = int((ty + 1) * TILE_PX * scale) + 2, int((tx + 1) * TILE_PX * scale) + 2
        if self.plan.tissue[max(0, y0 - 1) : y1, max(0, x0 - 1) : x1].max(initial=0) <= 0.0:
            return None
        t = self._mask(self.plan.tissue, ty, tx)[..., None]
        le = self._mask(self.plan.lesion, ty, tx)[..., None]
        # Textures are periodic: sampling them at the tile's global pixel positions (plus a
        # per-slide shift) gives a seamless slide.
        shift = zlib.crc32(str(self.plan.seed).encode())
        rows = (ty * TILE_PX + np.arange(TILE_PX) + (shift & 0x3FF)) % self.bank
        cols = (tx * TILE_PX + np.arange(TILE_PX) + (shift >> 10 & 0x3FF)) % self.bank
        tex_n = self.normal[rows][:, cols]
        tex_l = self.lesion[rows][:, cols]
        tissue_rgb = tex_n + (tex_l - tex_n) * le
        rgb = np.float32(GLASS) + (tissue_rgb - np.float32(GLASS)) * t
        return rgb.astype(np.uint8)


def level_shapes(width: int, height: int) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level: halving until the long side is ≤ THUMB_MAX_PX."""
    shapes = [(height, width)]
    while max(shapes[-1]) > THUMB_MAX_PX:
        h, w = shapes[-1]
        shapes.append((max(1, h // 2), max(1, w // 2)))
    return shapes


class _Pyramid:
    """Builds the reduced levels as scanners do: each level the 2×2 area average of the finer one.

    Level-0 tiles are fed in raster order (:meth:`add`); each reduced tile is averaged from its
    four finer tiles as they arrive (one row of pending tiles per level in memory), JPEG-encoded
    and kept until its page is written. Bare-glass tiles stay ``None`` and share one JPEG.
    """

    def __init__(self, shapes: list[tuple[int, int]], quality: int) -> None:
        self.grids = [(-(-h // TILE_PX), -(-w // TILE_PX)) for h, w in shapes]
        self.quality = quality
        self.tiles: list[list[bytes]] = [[] for _ in shapes]
        self._pending: list[dict[int, np.ndarray | None]] = [{} for _ in shapes]
        self._seen: list[dict[int, int]] = [{} for _ in shapes]
        glass = np.full((TILE_PX, TILE_PX, 3), GLASS, np.uint8)
        self.white_jpeg = imagecodecs.jpeg8_encode(glass, level=quality)

    def encode(self, pixels: np.ndarray | None) -> bytes:
        return self.white_jpeg if pixels is None else imagecodecs.jpeg8_encode(pixels, level=self.quality)

    def add(self, level: int, ty: int, tx: int, pixels: np.ndarray | None) -> None:
        """Take tile ``(tx, ty)`` of ``level`` and pass its area average on to the next level."""
        nxt = level + 1
        if nxt >= len(self.grids):
            return
        (ny, nx), (py, px) = self.grids[level], (ty // 2, tx // 2)
        if py >= self.grids[nxt][0] or px >= self.grids[nxt][1]:
            return  # beyond the reduced level (its size is rounded down)
        buf = self._pending[nxt].get(px)
        if pixels is not None:
            if buf is None:
                buf = np.full((TILE_PX, TILE_PX, 3), GLASS, np.uint8)
            half = TILE_PX // 2
            total = pixels.reshape(half, 2, half, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
            qy, qx = (ty % 2) * half, (tx % 2) * half
            buf[qy : qy + half, qx : qx + half] = (total + 2) // 4
        self._pending[nxt][px] = buf
        seen = self._seen[nxt][px] = self._seen[nxt].get(px, 0) + 1
        children = min(2, ny - 2 * py) * min(2, nx - 2 * px)
        if seen == children:
            del self._pending[nxt][px], self._seen[nxt][px]
            self.tiles[nxt].append(self.encode(buf))
            self.add(nxt, py, px, buf)


def write_slide(plan: SlidePlan, path: str | Path, *, quality: int = 85, mpp: float | None = MPP0) -> Path:
    """Write ``plan`` as a pyramidal tiled-JPEG TIFF at ``path``.

    Level 0 is rendered tile by tile; every reduced level is the 2×2 area average of the finer
    level's pixels, as a scanner writes its pyramid. ``mpp=None`` writes no resolution (a slide
    without mpp metadata, for error tests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shapes = level_shapes(plan.width, plan.height)
    pyramid = _Pyramid(shapes, quality)
    renderer = _Renderer(plan)

    def level0_tiles() -> Iterator[bytes]:
        ny, nx = pyramid.grids[0]
        for ty in range(ny):
            for tx in range(nx):
                pixels = renderer.tile(ty, tx)
                pyramid.add(0, ty, tx, pixels)
                yield pyramid.encode(pixels)

    with tifffile.TiffWriter(tmp, bigtiff=plan.width * plan.height > 2**31) as tif:
        for level, (h, w) in enumerate(shapes):
            # Level 0's tiles are made while it is written; they fill the reduced levels' tiles.
            tiles = level0_tiles() if level == 0 else iter(pyramid.tiles[level])
            kwargs: dict[str, object] = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**level)
                kwargs = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                tiles,
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                description=f"digilut synthetic slide|mpp={mpp}" if level == 0 and mpp else None,
                metadata=None,
                software="digilut",
                **kwargs,
            )
            pyramid.tiles[level] = []  # written: free the bytes
    tmp.replace(path)
    return path
