"""Synthetic DigiLut-like slides: pyramidal tiled-JPEG TIFFs with lesions and their boxes.

``synth_dataset(out, patients=N)`` writes ``out/images/<patient>_a.tif`` / ``_b.tif`` and
``out/train.csv`` in the challenge format. Slides are real 40x (0.25 µm/px) pyramids: level 0 and
reduced levels halving down to a thumbnail, 512 px JPEG tiles, reduced pages marked
``subfiletype=1`` (so OpenSlide's generic-TIFF reader sees the pyramid), the mpp in the TIFF
resolution tags (pixels per centimetre) and in the description (``mpp=0.25``).

Content: a few biopsy-like tissue fragments on white glass with an H&E-like texture (pink stroma,
scattered purple nuclei); lesions are cell-dense, dark-purple regions inside tissue. Box sizes
follow the real DigiLut distribution (level-0 side ≈ √area: 5th/50th/95th percentiles
445 / 943 / 2119 px, from the 927 real training boxes), 1–5 boxes per positive slide, some slides
without any. Lesions lie as close together as on real slides: 30 % of the real boxes have their
nearest neighbour (Chebyshev gap between boxes of one slide) within 4096 px — 12.5 % within
512 px, 2.2 % overlapping — and the rest are far away (median 33,000 px); so each further box
is, with :data:`NEAR_PROBABILITY`, placed beside a placed one at a gap drawn from the real near
gaps (:data:`NEAR_GAP_DECILES_PX`), otherwise at least :data:`FAR_GAP_PX` from every other box
(the real far gaps are larger, but beyond 2048 px lesions no longer share a patch or a box fit;
a box that finds no room is left out). Level 0 is drawn procedurally per tile from masks at a
coarse grid, and each reduced level is the 2×2 area average of the finer one (as scanners write
their pyramids), so even a full-size slide (83k × 197k px) is written with bounded memory.
Deterministic per seed.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

from digilut.errors import ConfigError

log = logging.getLogger(__name__)

SizeName = Literal["tiny", "demo", "full"]
Realism = Literal["simple", "real"]
MPP0 = 0.25  # µm per level-0 pixel: 40x, as DigiLut
TILE_PX = 512
THUMB_MAX_PX = 1024  # the last level is the first whose long side is at most this
MASK_PX = 64  # level-0 pixels per cell of the content masks (16 µm)
# Real DigiLut box side ≈ √(w·h): lognormal through the 5th/50th/95th percentiles 445/943/2119 px.
BOX_SIDE_MEDIAN_PX = 943.0
BOX_SIDE_SIGMA = 0.475
BOX_SIDE_RANGE_PX = (250.0, 3500.0)  # the real 1st/99th percentiles are 287 / 3465 px
BOX_ASPECT_SIGMA = 0.375  # real width/height: sd of its log 0.375, 1st/99th percentiles 0.36 / 2.9
# Nearest-neighbour gaps of the real boxes (863 boxes on slides with more than one): deciles of
# the gaps below 4096 px (281 boxes, 30 % of all boxes; negative = overlapping boxes).
NEAR_GAP_DECILES_PX = (-438, 47, 227, 340, 469, 741, 1081, 1457, 1887, 2560, 3946)
NEAR_PROBABILITY = 0.2  # a further box lies beside a placed one (→ ~30 % of boxes near another)
FAR_GAP_PX = 2048  # other boxes keep this gap: beyond the reach of a 512 px patch and the box fit

# Level-0 (width, height), fragments per slide, fragment radius range (level-0 px)
_SIZES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "tiny": ((4096, 3072), (1, 2), (900, 1300)),
    "demo": ((12288, 9216), (2, 4), (1800, 3000)),
    "full": ((82944, 197632), (4, 7), (5000, 9000)),
}


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of :func:`synth_dataset`."""

    patients: int = 4
    seed: int = 0
    size: SizeName = "tiny"
    positive_fraction: float = 0.75  # share of slides that carry lesions
    max_boxes_per_slide: int = 5
    jpeg_quality: int = 85
    realism: Realism = "simple"  # real: digilut.synth_real (real H&E texture, stain, infiltrates)

    def __post_init__(self) -> None:
        if self.realism not in ("simple", "real"):
            raise ConfigError(f"realism={self.realism!r}: choose simple or real")
        if self.patients < 1:
            raise ConfigError(f"patients={self.patients}: need at least 1")
        if self.size not in _SIZES:
            raise ConfigError(f"size={self.size!r}: choose one of {', '.join(_SIZES)}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ConfigError(f"positive_fraction={self.positive_fraction} must be in [0, 1]")
        if not 1 <= self.max_boxes_per_slide <= 40:
            raise ConfigError(f"max_boxes_per_slide={self.max_boxes_per_slide} must be in 1..40")


@dataclass
class SlidePlan:
    """What one synthetic slide contains: size, tissue and lesion masks, boxes (level-0 px)."""

    name: str
    width: int
    height: int
    tissue: np.ndarray  # float32 alpha per MASK_PX cell
    lesion: np.ndarray  # float32 alpha per MASK_PX cell
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x1, x2, y1, y2
    seed: int = 0


def patient_names(n: int, seed: int) -> list[str]:
    """``n`` distinct 10-character DigiLut-like patient ids, deterministic per seed."""
    rng = np.random.default_rng([seed, 7])
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"))
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(alphabet, 10))
        if name not in names:
            names.append(name)
    return names


def _blob(
    h: int, w: int, cy: float, cx: float, ry: float, rx: float, rng: np.random.Generator, rough: float
) -> np.ndarray:
    """A soft irregular ellipse on an h×w grid (values 0..1)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(ang) + dy * np.sin(ang)) / rx
    v = (-dx * np.sin(ang) + dy * np.cos(ang)) / ry
    r = np.sqrt(u * u + v * v)
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 3) * rough * 8
    return np.clip((1.0 - r + noise) * 4.0, 0.0, 1.0)


def _gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Chebyshev gap between two boxes ``(x1, x2, y1, y2)`` (negative when they overlap)."""
    return max(max(a[0], b[0]) - min(a[1], b[1]), max(a[2], b[2]) - min(a[3], b[3]))


def _place_box(
    rng: np.random.Generator,
    tissue: np.ndarray,
    slide_wh: tuple[int, int],
    box_wh: tuple[float, float],
    boxes: list[tuple[int, int, int, int]],
    near_gap: float | None,
    tries: int = 200,
) -> tuple[int, int, int, int] | None:
    """A box of ``box_wh`` centred on tissue, inside the slide: beside a random placed box at
    ``near_gap`` (and no closer to the others), or, with ``near_gap`` None, at least
    :data:`FAR_GAP_PX` from every placed box. None: no room after ``tries`` positions."""
    (w0, h0), (bw, bh) = slide_wh, box_wh
    inside = np.argwhere(tissue > 0.95)
    if len(inside) == 0:
        return None
    for _ in range(tries):
        if near_gap is not None:
            x1, x2, y1, y2 = boxes[int(rng.integers(len(boxes)))]
            g, side = near_gap, int(rng.integers(4))
            if side < 2:  # left / right of the anchor, overlapping it vertically
                x = (x2 + g + bw / 2) if side == 0 else (x1 - g - bw / 2)
                y = rng.uniform(y1 - bh / 2, y2 + bh / 2)
            else:
                y = (y2 + g + bh / 2) if side == 2 else (y1 - g - bh / 2)
                x = rng.uniform(x1 - bw / 2, x2 + bw / 2)
            r, c = int(y // MASK_PX), int(x // MASK_PX)
            if not (0 <= r < tissue.shape[0] and 0 <= c < tissue.shape[1]) or tissue[r, c] <= 0.95:
                continue
            need = near_gap - 2  # int rounding of the edges
        else:
            cy, cx = inside[int(rng.integers(len(inside)))]
            x, y = (cx + 0.5) * MASK_PX, (cy + 0.5) * MASK_PX
            need = FAR_GAP_PX
        box = (int(x - bw / 2), int(x + bw / 2), int(y - bh / 2), int(y + bh / 2))
        if box[0] < 0 or box[2] < 0 or box[1] > w0 or box[3] > h0:
            continue
        if all(_gap(box, b) >= need for b in boxes):
            return box
    return None


def plan_slide(name: str, cfg: SynthConfig, seed: int, positive: bool) -> SlidePlan:
    """Draw tissue fragments, lesions and their boxes for one slide."""
    rng = np.random.default_rng(seed)
    (w0, h0), (fmin, fmax), (rmin, rmax) = _SIZES[cfg.size]
    mh, mw = -(-h0 // MASK_PX), -(-w0 // MASK_PX)
    tissue = np.zeros((mh, mw), np.float32)
    for _ in range(int(rng.integers(fmin, fmax + 1))):
        r = rng.uniform(rmin, rmax) / MASK_PX
        cx = rng.uniform(r * 1.1, mw - r * 1.1) if mw > 2.2 * r else mw / 2
        cy = rng.uniform(r * 1.1, mh - r * 1.1) if mh > 2.2 * r else mh / 2
        tissue = np.maximum(tissue, _blob(mh, mw, cy, cx, r * rng.uniform(0.6, 1.0), r, rng, 0.15))
    lesion = np.zeros_like(tissue)
    boxes: list[tuple[int, int, int, int]] = []
    n_boxes = int(rng.integers(1, cfg.max_boxes_per_slide + 1)) if positive else 0
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32) + 0.5
    for _ in range(n_boxes):
        side = float(np.clip(rng.lognormal(np.log(BOX_SIDE_MEDIAN_PX), BOX_SIDE_SIGMA), *BOX_SIDE_RANGE_PX))
        aspect = float(np.clip(rng.lognormal(0, BOX_ASPECT_SIGMA), 1 / 3, 3))
        bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
        near = bool(boxes) and rng.random() < NEAR_PROBABILITY
        gap = float(np.interp(rng.random(), np.linspace(0, 1, 11), NEAR_GAP_DECILES_PX))
        box = _place_box(rng, tissue, (w0, h0), (bw, bh), boxes, gap if near else None)
        if box is None:
            continue  # no room on this slide: one lesion fewer
        x1, x2, y1, y2 = box
        # The lesion fills its box as a solid ellipse (blurred edge inside the box).
        u = (xx - (x1 + x2) / 2 / MASK_PX) / ((x2 - x1) / 2 / MASK_PX)
        v = (yy - (y1 + y2) / 2 / MASK_PX) / ((y2 - y1) / 2 / MASK_PX)
        ell = np.clip((1.0 - np.sqrt(u * u + v * v)) * 6.0 + 0.5, 0.0, 1.0)
        lesion = np.maximum(lesion, ell)
        tissue = np.maximum(tissue, ell)  # a lesion is always tissue
        boxes.append(box)
    return SlidePlan(name, w0, h0, tissue, lesion, boxes, seed)


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


def synth_dataset(out: str | Path, cfg: SynthConfig) -> pd.DataFrame:
    """Write a synthetic DigiLut dataset to ``out`` and return its boxes (the rows of train.csv)."""
    if cfg.realism == "real":
        from digilut.synth_real import synth_real_dataset

        return synth_real_dataset(out, cfg)[0]
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 1])
    rows = []
    t0 = time.perf_counter()
    names = patient_names(cfg.patients, cfg.seed)
    for p, patient in enumerate(names):
        for s, suffix in enumerate(("a", "b")):
            name = f"{patient}_{suffix}.tif"
            positive = bool(rng.random() < cfg.positive_fraction)
            plan = plan_slide(name, cfg, seed=cfg.seed * 100_003 + p * 2 + s, positive=positive)
            write_slide(plan, images / name, quality=cfg.jpeg_quality)
            for x1, x2, y1, y2 in plan.boxes:
                rows.append((name, x1, x2, y1, y2, plan.width, plan.height))
            log.info("synth %s: %d×%d px, %d box(es)", name, plan.width, plan.height, len(plan.boxes))
    df = pd.DataFrame(rows, columns=["filename", "x1", "x2", "y1", "y2", "max_x", "max_y"])
    df.to_csv(out / "train.csv", index=False)
    log.info(
        "synth: %d slides, %d boxes in %.1fs -> %s", 2 * cfg.patients, len(df), time.perf_counter() - t0, out
    )
    return df
