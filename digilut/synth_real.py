"""Realistic synthetic slides (``digilut synth --realism real``): real H&E texture, per-slide stain,
lymphocytic-infiltrate lesions that differ from normal tissue by texture rather than hue, loose boxes.

Tissue is real: the Aperio CMU-1-Small-Region image (:func:`~digilut.reference_data.cmu_small_region_svs`,
CC0; skin H&E at 0.499 µm/px: pale dermis with few nuclei, purple cellular epidermis), turned by a
random flip/rotation per slide, shifted, mirror-tiled to the slide's size and shown at 0.25 µm/px
(each source pixel becomes 2×2), inside the same biopsy-like fragment masks as the simple
generator's; where the reference image is glass the fragment has a hole.

Drawn on top (before the stain change, so the stain applies to them too):

* **lesions**: perivascular lymphocytic infiltrates — small round dark nuclei (≈ 5 µm), densest
  at the centre and thinning towards an irregular edge (2–3 overlapping sub-blobs), usually around a
  vessel (a pale lumen in a pink wall, no lymphocytes inside);
  infiltrates range from mild to dense (centre density × 0.4–1.1, as grades A1–A3 do);
* **hard negatives on every slide**: lymphocytes scattered over all tissue, and small clusters
  (≤ 70 µm across, some round a vessel) too small to annotate; anthracotic pigment (black
  granules) and haemorrhage (packed red cells), common in lung; the epidermis of the reference
  image is naturally cellular and purple.

Per slide: uneven section thickness (optical density × a smooth random factor, ±20 % per sd over
≈ 0.2 mm), stain in HED space (Ruifrok & Johnston's matrix; haematoxylin and eosin each scaled by
0.6–1.4, DAB channel as a small colour cast), brightness 0.9–1.05, JPEG quality 70–95.

Boxes are loose, as an annotator draws them: a box size is drawn as in :mod:`digilut.synth` (the
real DigiLut sizes), the infiltrate fills the box less a random margin of 3–20 % per side. Box
counts per positive slide follow the real training CSV (927 boxes on 251 slides: mean 3.7, up to
40; :data:`REAL_BOX_COUNTS`) and are kept while they fit on the slide (far/near gaps as in
:mod:`digilut.synth`).

The generator proves the task is not a colour task: :func:`colour_auroc` trains a logistic regression
on the mean RGB of every tissue patch (256 px at 0.5 µm/px, stride 128, labelled by the labeller's
10 % rule) of half the slides and reports its AUROC on the other half (``realism.json``).

The slide is rendered at the reference image's own scale, 0.5 µm/px (level 1, the pipeline's 20x),
whole in memory, so only ``tiny`` and ``demo`` sizes are offered; level 0 shows each of its pixels as
2×2 (a 20x scan at 40x), the reduced levels are 2×2 area means of the level above.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage

from digilut.errors import ConfigError
from digilut.reference_data import cmu_small_region_svs
from digilut.synth import (
    BOX_ASPECT_SIGMA,
    BOX_SIDE_MEDIAN_PX,
    BOX_SIDE_RANGE_PX,
    BOX_SIDE_SIGMA,
    MASK_PX,
    MPP0,
    NEAR_GAP_DECILES_PX,
    NEAR_PROBABILITY,
    TILE_PX,
    SynthConfig,
    _place_box,
    level_shapes,
    patient_names,
    plan_slide,
)

log = logging.getLogger(__name__)

# Boxes per slide in the real DigiLut training CSV (251 slides with boxes): count -> slides.
REAL_BOX_COUNTS = {
    1: 64, 2: 60, 3: 40, 4: 30, 5: 10, 6: 19, 7: 7, 8: 4, 9: 4, 10: 2, 11: 1, 12: 3, 13: 1,
    14: 1, 15: 1, 19: 1, 24: 1, 30: 1, 40: 1,
}  # fmt: skip
SOURCE_MPP = 0.499  # CMU-1-Small-Region
GLASS = np.array([242.0, 242.0, 242.0], np.float32)
NUCLEUS_RGB = np.array([68.0, 45.0, 118.0], np.float32)  # a lymphocyte's dense haematoxylin
NUCLEUS_SIGMA_PX = 7.0  # level-0 px: discs ≈ 24 px ≈ 6 µm across
LYMPH_DENSITY = 1.0e-3  # nuclei per level-0 px² at an infiltrate's centre (1 per ~60 µm²)
SCATTER_DENSITY = 6.0e-5  # scattered lymphocytes per px² of tissue (1 per ~1,000 µm²)
CLUSTERS_PER_MPX = 3.0  # small unannotated clusters per million px² of tissue
MARGIN_RANGE = (0.05, 0.30)  # loose box: margin per side, share of the box side
STAIN_RANGE = (0.6, 1.4)  # per-slide scaling of haematoxylin and eosin
BRIGHTNESS_RANGE = (0.9, 1.05)
QUALITY_RANGE = (70, 95)
PATCH_PX, PATCH_STRIDE_PX, PATCH_LEVEL = 256, 128, 1  # the pipeline's grid: 256 px at 20x
LABEL_MIN_OVERLAP = 0.1
COLOUR_AUROC_GOAL = 0.80
STRIP_PX = 1024
PIGMENT_PER_MPX, PIGMENT_SIGMA_PX = 1.0, 3.0  # anthracotic deposits per million px² of tissue; granule
BLOOD_PER_MPX, RED_CELL_SIGMA_PX = 0.8, 5.0  # haemorrhages per million px² of tissue; red cell
THICKNESS_CELLS, THICKNESS_SIGMA = 12.0, 0.2  # uneven section: OD × e^(0.2·N(0,1)) over ~0.2 mm
PLACEMENT_TRIES = 12  # texture placements tried per slide (the most tissue wins)

# Ruifrok & Johnston: rows are the optical densities of haematoxylin, eosin and DAB.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


@dataclass(frozen=True)
class Stain:
    """A slide's stain and scanner: HED scaling, DAB cast, brightness, JPEG quality."""

    h: float = 1.0
    e: float = 1.0
    d: float = 0.0  # added DAB optical density (a brownish cast)
    brightness: float = 1.0
    quality: int = 85


@dataclass
class Infiltrate:
    """Lymphocytes around ``(cx, cy)`` in an ellipse (level-0 px); ``vessel_px`` 0: no vessel."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float
    vessel_px: float
    annotated: bool
    extent: tuple[float, float, float, float] | None = None  # level-0 x1, x2, y1, y2 of its nuclei


@dataclass
class RealSlidePlan:
    """One realistic slide: size, fragment mask, texture transform, stain, infiltrates, boxes."""

    name: str
    width: int
    height: int
    fragments: np.ndarray  # float32 alpha per MASK_PX cell
    tissue: np.ndarray  # float32: fragments × reference tissue, per MASK_PX cell
    turn: int  # rot90 count of the reference image
    flip: bool
    offset: tuple[int, int]  # (x, y) in source px
    stain: Stain
    infiltrates: list[Infiltrate] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    nuclei: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # x, y, weight
    pigment: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # anthracotic granules
    blood: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # red cells
    thickness: np.ndarray | None = None  # float32 optical-density factor per MASK_PX cell (section thickness)
    seed: int = 0


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray]:
    """The reference RGB image (uint8) and its tissue mask (bool), both at source resolution."""
    rgb = tifffile.imread(cmu_small_region_svs())
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"reference image has shape {rgb.shape}; expected RGB")
    sat = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    tissue = ndimage.binary_opening((sat > 25) & (rgb.mean(axis=2) < 225), iterations=2)
    return rgb, tissue


def _turned(a: np.ndarray, turn: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, turn)
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror-tiling indices: 0..n-1, n-1..0, 0..n-1, …"""
    m = np.mod(idx, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _source_index(plan: RealSlidePlan, start: int, stop: int, axis: int, n: int) -> np.ndarray:
    """Source pixel of each level-0 row (axis 0) or column (axis 1) in ``start..stop``."""
    off = plan.offset[1 - axis]
    return _mirror(np.arange(start, stop) // 2 + off, n)


def _reference_tissue_cells(plan: RealSlidePlan) -> np.ndarray:
    """Share of reference tissue in each MASK_PX cell of the slide (float32)."""
    _, tissue = _reference()
    t = _turned(tissue, plan.turn, plan.flip).astype(np.float32)
    h, w = t.shape
    half = MASK_PX // 2  # source px per cell
    mh, mw = plan.fragments.shape
    rows = _mirror(np.arange(mh * half) + plan.offset[1], h)
    cols = _mirror(np.arange(mw * half) + plan.offset[0], w)
    return t[rows][:, cols].reshape(mh, half, mw, half).mean(axis=(1, 3))


def _draw_count(rng: np.random.Generator) -> int:
    counts = np.array(list(REAL_BOX_COUNTS))
    p = np.array(list(REAL_BOX_COUNTS.values()), np.float64)
    return int(rng.choice(counts, p=p / p.sum()))


def _ellipse_points(
    rng: np.random.Generator, inf: Infiltrate, density: float, edge_power: float
) -> np.ndarray:
    """Nuclei of one infiltrate: 2–3 overlapping sub-blobs, denser at their centres, none in the vessel."""
    pts = []
    for k in range(int(rng.integers(2, 4))):
        scale = 1.0 if k == 0 else rng.uniform(0.45, 0.75)
        sx, sy = inf.rx * scale, inf.ry * scale
        # sub-blobs stay inside the ellipse: their centre is within (1 - scale) of it
        ang = rng.uniform(0, 2 * np.pi)
        dist = (1 - scale) * rng.uniform(0, 1)
        bx, by = dist * inf.rx * np.cos(ang), dist * inf.ry * np.sin(ang)
        n = rng.poisson(density * np.pi * sx * sy)
        u, v = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
        r2 = u * u + v * v
        keep = (r2 <= 1) & (rng.random(n) < np.clip(1.08 - r2, 0, 1) ** edge_power)
        x, y = bx + u[keep] * sx, by + v[keep] * sy
        pts.append(np.stack([x, y], axis=1))
    xy = np.concatenate(pts)
    c, s = np.cos(inf.angle), np.sin(inf.angle)
    gx, gy = inf.cx + xy[:, 0] * c - xy[:, 1] * s, inf.cy + xy[:, 0] * s + xy[:, 1] * c
    if inf.vessel_px > 0:
        out = np.hypot(gx - inf.cx, gy - inf.cy) > inf.vessel_px * 1.15
        gx, gy = gx[out], gy[out]
    w = rng.uniform(0.8, 1.3, len(gx))
    return np.stack([gx, gy, w], axis=1).astype(np.float32)


def _tissue_points(rng: np.random.Generator, tissue: np.ndarray, n: int) -> np.ndarray:
    """``n`` random level-0 points on cells with tissue (probability ∝ the cell's tissue share)."""
    p = tissue.ravel().astype(np.float64)
    if n <= 0 or p.sum() <= 0:
        return np.zeros((0, 2), np.float32)
    cells = rng.choice(p.size, size=n, p=p / p.sum())
    r, c = np.divmod(cells, tissue.shape[1])
    return np.stack([(c + rng.random(n)) * MASK_PX, (r + rng.random(n)) * MASK_PX], axis=1).astype(np.float32)


def _on_tissue(pts: np.ndarray, tissue: np.ndarray, least: float = 0.5) -> np.ndarray:
    """The points (rows ``x, y, …``, level-0 px) that lie on cells with at least ``least`` tissue."""
    r = np.clip((pts[:, 1] // MASK_PX).astype(int), 0, tissue.shape[0] - 1)
    c = np.clip((pts[:, 0] // MASK_PX).astype(int), 0, tissue.shape[1] - 1)
    return pts[tissue[r, c] >= least]


def _deposits(
    rng: np.random.Generator, plan: RealSlidePlan, n: int, radius_px: tuple[float, float], density: float
) -> np.ndarray:
    """Points (``x, y, weight``) of ``n`` irregular deposits on tissue away from the lesions."""
    pts = [np.zeros((0, 3), np.float32)]
    for cx, cy in _tissue_points(rng, plan.tissue, n):
        if any(b[0] - 300 < cx < b[1] + 300 and b[2] - 300 < cy < b[3] + 300 for b in plan.boxes):
            continue
        r = rng.uniform(*radius_px)
        blob = Infiltrate(
            float(cx), float(cy), r * rng.uniform(0.5, 1.5), r, rng.uniform(0, np.pi), 0.0, False
        )
        pts.append(_on_tissue(_ellipse_points(rng, blob, density * rng.uniform(0.5, 1.0), 1.0), plan.tissue))
    return np.concatenate(pts).astype(np.float32)


def plan_real_slide(name: str, size: str, seed: int, positive: bool) -> RealSlidePlan:
    """Draw fragments, texture transform, stain, infiltrates (lesions and clusters), nuclei and boxes."""
    if size not in ("tiny", "demo"):
        raise ConfigError(
            f"size={size!r}: realistic slides are rendered in memory, so only tiny and demo sizes; "
            "use --realism simple for full-size slides"
        )
    base = plan_slide(name, SynthConfig(size=size), seed=seed, positive=False)  # the fragments only
    rng = np.random.default_rng([seed, 31])
    ref, _ = _reference()
    stain = Stain(
        h=float(rng.uniform(*STAIN_RANGE)),
        e=float(rng.uniform(*STAIN_RANGE)),
        d=float(rng.uniform(0.0, 0.06)),
        brightness=float(rng.uniform(*BRIGHTNESS_RANGE)),
        quality=int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1)),
    )
    # The reference image is 2/3 glass: of a few random placements keep the one whose tissue
    # fills the fragments best.
    trials = []
    for _ in range(PLACEMENT_TRIES):
        turn, flip = int(rng.integers(4)), bool(rng.integers(2))
        h_src, w_src = (ref.shape[1], ref.shape[0]) if turn % 2 else ref.shape[:2]
        offset = (int(rng.integers(2 * w_src)), int(rng.integers(2 * h_src)))
        trial = RealSlidePlan(
            name, base.width, base.height, base.tissue, base.tissue, turn, flip, offset, stain
        )
        trial.tissue = (trial.fragments * _reference_tissue_cells(trial)).astype(np.float32)
        trials.append(trial)
    plan = max(trials, key=lambda t: float(t.tissue.sum()))
    plan.seed = seed
    noise = ndimage.gaussian_filter(rng.standard_normal(plan.fragments.shape), THICKNESS_CELLS, mode="wrap")
    noise /= max(float(noise.std()), 1e-9)
    plan.thickness = np.exp(np.clip(noise, -2.5, 2.5) * THICKNESS_SIGMA).astype(np.float32)
    # Lesions: loose boxes with the real sizes; the infiltrate fills the box less the margins.
    n_boxes = _draw_count(rng) if positive else 0
    nuclei = []
    for _ in range(n_boxes):
        side = float(np.clip(rng.lognormal(np.log(BOX_SIDE_MEDIAN_PX), BOX_SIDE_SIGMA), *BOX_SIDE_RANGE_PX))
        aspect = float(np.clip(rng.lognormal(0, BOX_ASPECT_SIGMA), 1 / 3, 3))
        bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
        near = bool(plan.boxes) and rng.random() < NEAR_PROBABILITY
        gap = float(np.interp(rng.random(), np.linspace(0, 1, 11), NEAR_GAP_DECILES_PX))
        box = _place_box(
            rng, plan.tissue, (plan.width, plan.height), (bw, bh), plan.boxes, gap if near else None
        )
        if box is None:
            continue
        x1, x2, y1, y2 = box
        ml, mr, mt, mb = rng.uniform(*MARGIN_RANGE, 4)
        ix1, ix2 = x1 + ml * (x2 - x1), x2 - mr * (x2 - x1)
        iy1, iy2 = y1 + mt * (y2 - y1), y2 - mb * (y2 - y1)
        rx, ry = (ix2 - ix1) / 2, (iy2 - iy1) / 2
        vessel = (
            float(np.clip(min(rx, ry) * rng.uniform(0.12, 0.25), 30, 220)) if rng.random() < 0.75 else 0.0
        )
        inf = Infiltrate((ix1 + ix2) / 2, (iy1 + iy2) / 2, rx, ry, 0.0, vessel, True)
        pts = _on_tissue(_ellipse_points(rng, inf, LYMPH_DENSITY * rng.uniform(0.4, 1.1), 1.5), plan.tissue)
        if len(pts):  # the box is the infiltrate's extent plus the margins
            ex1, ex2, ey1, ey2 = (
                float(v) for v in (pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
            )
            inf.extent = (ex1, ex2, ey1, ey2)
            box = (
                max(0, int(ex1 - ml * (x2 - x1))),
                min(plan.width, int(ex2 + mr * (x2 - x1))),
                max(0, int(ey1 - mt * (y2 - y1))),
                min(plan.height, int(ey2 + mb * (y2 - y1))),
            )
        plan.infiltrates.append(inf)
        plan.boxes.append(box)
        nuclei.append(pts)
    # Hard negatives: small unannotated clusters and scattered lymphocytes over all tissue.
    area_mpx = float(plan.tissue.sum()) * MASK_PX**2 / 1e6
    n_clusters = max(1, int(rng.poisson(CLUSTERS_PER_MPX * area_mpx)))  # at least one per slide
    spots = [
        (cx, cy)
        for cx, cy in _tissue_points(rng, plan.tissue, 4 * n_clusters)
        if not any(b[0] - 300 < cx < b[1] + 300 and b[2] - 300 < cy < b[3] + 300 for b in plan.boxes)
    ]
    for cx, cy in spots[:n_clusters]:
        r = rng.uniform(50, 140)
        vessel = float(r * rng.uniform(0.2, 0.35)) if rng.random() < 0.4 else 0.0
        inf = Infiltrate(
            float(cx), float(cy), r * rng.uniform(0.7, 1.3), r, rng.uniform(0, np.pi), vessel, False
        )
        plan.infiltrates.append(inf)
        nuclei.append(
            _on_tissue(_ellipse_points(rng, inf, LYMPH_DENSITY * rng.uniform(0.6, 1.0), 1.0), plan.tissue)
        )
    scatter = _tissue_points(rng, plan.tissue, int(rng.poisson(SCATTER_DENSITY * area_mpx * 1e6)))
    nuclei.append(
        np.concatenate([scatter, rng.uniform(0.8, 1.3, (len(scatter), 1)).astype(np.float32)], axis=1)
    )
    plan.nuclei = np.concatenate(nuclei).astype(np.float32)
    # Lung hard negatives as dark or saturated as an infiltrate: anthracotic pigment (black
    # granules, often round vessels) and haemorrhage (packed red cells).
    plan.pigment = _deposits(rng, plan, int(rng.poisson(PIGMENT_PER_MPX * area_mpx)), (40, 200), 4e-3)
    plan.blood = _deposits(rng, plan, int(rng.poisson(BLOOD_PER_MPX * area_mpx)), (80, 400), 3e-3)
    return plan


def _alpha(mask: np.ndarray, y0: int, y1: int, width: int, cell_px: float) -> np.ndarray:
    """The coarse ``mask`` (cells of ``cell_px`` image px) bilinearly at rows ``y0..y1`` (float32)."""
    ys = (np.arange(y0, y1) + 0.5) / cell_px - 0.5
    xs = (np.arange(width) + 0.5) / cell_px - 0.5
    rows = np.clip(ys, 0, mask.shape[0] - 1)
    r0 = np.floor(rows).astype(int)
    r1 = np.minimum(r0 + 1, mask.shape[0] - 1)
    fr = (rows - r0).astype(np.float32)[:, None]
    m = mask[r0] * (1 - fr) + mask[r1] * fr  # (rows, mask cols)
    cols = np.clip(xs, 0, mask.shape[1] - 1)
    c0 = np.floor(cols).astype(int)
    c1 = np.minimum(c0 + 1, mask.shape[1] - 1)
    fc = (cols - c0).astype(np.float32)[None, :]
    return (m[:, c0] * (1 - fc) + m[:, c1] * fc).astype(np.float32)


def _stain(rgb: np.ndarray, s: Stain) -> np.ndarray:
    """``rgb`` (float, 0..255) with the slide's stain: HED concentrations scaled, DAB cast, brightness."""
    od = -np.log((np.asarray(rgb, np.float32) + 1.0) / 256.0)
    hed = od @ _HED_FROM_RGB
    hed *= np.array([s.h, s.e, 1.0], np.float32)
    hed[..., 2] = np.maximum(hed[..., 2], 0) + s.d
    out = 256.0 * np.exp(-(hed @ _RGB_FROM_HED)) - 1.0
    return np.clip(out * s.brightness, 0, 255).astype(np.float32)


def _vessels(
    plan: RealSlidePlan, y0: int, y1: int, rgb: np.ndarray, wall: np.ndarray, lumen: np.ndarray
) -> None:
    """Paint each vessel crossing level-1 rows ``y0..y1``: a pale lumen in a pink wall (in place)."""
    for inf in plan.infiltrates:
        r, cx, cy = inf.vessel_px / 2, inf.cx / 2, inf.cy / 2
        if r <= 0 or cy + r < y0 or cy - r >= y1:
            continue
        ya, yb = max(y0, int(cy - r)), min(y1, int(cy + r) + 1)
        xa, xb = max(0, int(cx - r)), min(rgb.shape[1], int(cx + r) + 1)
        yy, xx = np.mgrid[ya:yb, xa:xb]
        d = np.hypot(yy - cy, (xx - cx) * 1.2) / r
        sub = rgb[ya - y0 : yb - y0, xa:xb]
        sub[:] = np.where(
            ((d <= 1) & (d > 0.7))[..., None], wall, np.where((d <= 0.7)[..., None], lumen, sub)
        )


def _coverage(points: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Coverage (0..0.95) at level 1 of round bodies at ``points`` (``x, y, weight``, level-0 px):
    a Gaussian stamp of ``sigma_px`` (level-0 px) per body, summed and thresholded into discs."""
    sigma = sigma_px / 2
    k = int(3 * sigma) + 1
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    stamp = np.exp(-(ox**2 + oy**2) / (2 * sigma**2)).astype(np.float32).ravel()
    h, w = shape
    x = np.round(points[:, 0] / 2).astype(np.int64)
    y = np.round(points[:, 1] / 2).astype(np.int64)
    xs, ys = x[:, None] + ox.ravel(), y[:, None] + oy.ravel()
    ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    weights = points[:, 2:3] * stamp[None, :]
    field_ = np.bincount((ys * w + xs)[ok], weights=weights[ok], minlength=h * w).reshape(h, w)
    return np.clip((field_.astype(np.float32) - 0.3) * 2.5, 0, 0.95)


def render_level1(plan: RealSlidePlan) -> np.ndarray:
    """Level 1 (0.5 µm/px, the reference image's own scale) of ``plan``: (height/2, width/2, 3) uint8.

    The stain is applied to the reference image and to the painted colours (a per-pixel map, so
    blending after it is the same picture up to rounding)."""
    ref, _ = _reference()
    src = _stain(_turned(ref, plan.turn, plan.flip), plan.stain)
    glass, nucleus = _stain(GLASS, plan.stain), _stain(NUCLEUS_RGB, plan.stain)
    wall, lumen = (
        _stain(np.float32([205, 120, 165]), plan.stain),
        _stain(np.float32([238, 222, 228]), plan.stain),
    )
    h, w = -(-plan.height // 2), -(-plan.width // 2)
    out = np.empty((h, w, 3), np.uint8)
    cols = _mirror(np.arange(w) + plan.offset[0], src.shape[1])
    layers = [
        (_coverage(plan.blood, (h, w), RED_CELL_SIGMA_PX), _stain(np.float32([196, 52, 72]), plan.stain)),
        (_coverage(plan.pigment, (h, w), PIGMENT_SIGMA_PX), _stain(np.float32([38, 32, 30]), plan.stain)),
        (_coverage(plan.nuclei, (h, w), NUCLEUS_SIGMA_PX), nucleus),
    ]
    for y0 in range(0, h, STRIP_PX):
        y1 = min(h, y0 + STRIP_PX)
        rgb = src[_mirror(np.arange(y0, y1) + plan.offset[1], src.shape[0])][:, cols]
        a = _alpha(plan.fragments, y0, y1, w, MASK_PX / 2)[..., None]
        rgb = glass + (rgb - glass) * a
        _vessels(plan, y0, y1, rgb, wall, lumen)
        for cover, colour in layers:
            d = cover[y0:y1, :, None]
            rgb = rgb + (colour - rgb) * d
        if plan.thickness is not None:  # a thicker section absorbs more: optical density × factor
            t = _alpha(plan.thickness, y0, y1, w, MASK_PX / 2)[..., None]
            rgb = 256.0 * np.power((rgb + 1.0) / 256.0, t) - 1.0
        out[y0:y1] = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def _halve(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    a = a[: 2 * h, : 2 * w].astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _level0_tiles(level1: np.ndarray, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """Level-0 tiles: each level-1 pixel as 2×2 (the texture's own scale is 0.5 µm/px)."""
    h, w = shape
    half = TILE_PX // 2
    for ty in range(-(-h // TILE_PX)):
        for tx in range(-(-w // TILE_PX)):
            block = level1[ty * half : (ty + 1) * half, tx * half : (tx + 1) * half]
            tile = np.zeros((TILE_PX, TILE_PX, 3), np.uint8)
            up = block.repeat(2, axis=0).repeat(2, axis=1)
            tile[: up.shape[0], : up.shape[1]] = up
            yield tile


def write_real_slide(plan: RealSlidePlan, path: Path) -> list[np.ndarray]:
    """Write ``plan`` as a pyramidal tiled-JPEG TIFF laid out as :func:`digilut.synth.write_slide`
    lays it out; returns the levels from level 1 on (level 0 is level 1 at 2×2 per pixel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = level_shapes(plan.width, plan.height)
    levels = [render_level1(plan)]
    for shape in shapes[2:]:
        levels.append(_halve(levels[-1], shape))
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=plan.width * plan.height > 2**31) as tif:
        for level, shape in enumerate(shapes):
            px_per_cm = 1e4 / (MPP0 * 2**level)
            data = (
                _level0_tiles(levels[0], shape) if level == 0 else levels[level - 1][: shape[0], : shape[1]]
            )
            tif.write(
                data,
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                compressionargs={"level": plan.stain.quality},
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                description=f"digilut synthetic slide (realistic)|mpp={MPP0}" if level == 0 else None,
                metadata=None,
                software="digilut",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
            )
    tmp.replace(path)
    return levels


def patch_features(
    slide: str, boxes: list[tuple[int, int, int, int]] | pd.DataFrame, level1: np.ndarray
) -> pd.DataFrame:
    """Mean RGB and label of every tissue patch of ``slide``'s level 1 (0.5 µm/px) on the pipeline's
    grid (256 px, stride 128; ≥ 50 % non-glass; positive when one of ``boxes`` — level-0
    ``x1, x2, y1, y2`` — covers ≥ 10 % of it, the labeller's rule)."""
    h, w = level1.shape[:2]
    down = 2**PATCH_LEVEL
    glass = level1.min(axis=2) > 215
    rows = []
    if isinstance(boxes, pd.DataFrame):
        boxes = list(boxes[["x1", "x2", "y1", "y2"]].itertuples(index=False, name=None))
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    p0 = PATCH_PX * down
    for y in range(0, h - PATCH_PX + 1, PATCH_STRIDE_PX):
        for x in range(0, w - PATCH_PX + 1, PATCH_STRIDE_PX):
            if glass[y : y + PATCH_PX, x : x + PATCH_PX].mean() > 0.5:
                continue
            mean = level1[y : y + PATCH_PX, x : x + PATCH_PX].reshape(-1, 3).mean(axis=0)
            X, Y = x * down, y * down
            iw = np.clip(np.minimum(X + p0, b[:, 1]) - np.maximum(X, b[:, 0]), 0, None)
            ih = np.clip(np.minimum(Y + p0, b[:, 3]) - np.maximum(Y, b[:, 2]), 0, None)
            cover = float((iw * ih).max(initial=0.0)) / p0**2
            rows.append((slide, X, Y, *mean, int(cover >= LABEL_MIN_OVERLAP)))
    df = pd.DataFrame(rows, columns=["slide", "x0", "y0", "r", "g", "b", "label"])
    return df.astype(
        {"x0": "int64", "y0": "int64", "r": "float64", "g": "float64", "b": "float64", "label": "int64"}
    )


def colour_auroc(features: pd.DataFrame) -> dict[str, float | int | None]:
    """Cross-slide AUROC of a logistic regression on a patch's mean RGB: trained on half the slides
    (alternate slides by name), tested on the other half, and the other way round.

    Returns ``auroc_ab``, ``auroc_ba`` (None where a half lacks a class), their mean ``auroc`` and
    the counts.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = sorted(features["slide"].unique())
    halves = (set(names[::2]), set(names[1::2]))
    out: dict[str, float | int | None] = {
        "patches": len(features),
        "positive_patches": int(features["label"].sum()),
        "slides": len(names),
    }
    aucs = []
    for key, (a, b) in (("auroc_ab", halves), ("auroc_ba", halves[::-1])):
        tr, te = features[features["slide"].isin(a)], features[features["slide"].isin(b)]
        if tr["label"].nunique() < 2 or te["label"].nunique() < 2:
            out[key] = None
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression())
        model.fit(tr[["r", "g", "b"]].to_numpy(), tr["label"].to_numpy())
        auc = float(roc_auc_score(te["label"], model.predict_proba(te[["r", "g", "b"]].to_numpy())[:, 1]))
        out[key] = auc
        aucs.append(auc)
    out["auroc"] = float(np.mean(aucs)) if aucs else None  # 2-fold cross-validation over slides
    return out


@dataclass(frozen=True)
class RealismReport:
    """What :func:`synth_real_dataset` measured: the colour baseline and the per-slide stains."""

    colour: dict[str, float | int | None]
    stains: dict[str, dict[str, float]]
    boxes_per_positive_slide: float

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def synth_real_dataset(out: str | Path, cfg: SynthConfig) -> tuple[pd.DataFrame, RealismReport]:
    """Write a realistic synthetic dataset (``images/``, ``train.csv``, ``realism.json``) to ``out``."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 1])
    rows, feats, stains, n_pos = [], [], {}, 0
    t0 = time.perf_counter()
    for p, patient in enumerate(patient_names(cfg.patients, cfg.seed)):
        for s, suffix in enumerate(("a", "b")):
            name = f"{patient}_{suffix}.tif"
            positive = bool(rng.random() < cfg.positive_fraction)
            plan = plan_real_slide(name, cfg.size, seed=cfg.seed * 100_003 + p * 2 + s, positive=positive)
            levels = write_real_slide(plan, images / name)
            feats.append(patch_features(name, plan.boxes, levels[PATCH_LEVEL - 1]))
            stains[name] = asdict(plan.stain)
            n_pos += bool(plan.boxes)
            rows += [(name, *box, plan.width, plan.height) for box in plan.boxes]
            log.info("synth real %s: %d box(es), stain %s", name, len(plan.boxes), plan.stain)
    df = pd.DataFrame(rows, columns=["filename", "x1", "x2", "y1", "y2", "max_x", "max_y"])
    df.to_csv(out / "train.csv", index=False)
    report = RealismReport(colour_auroc(pd.concat(feats, ignore_index=True)), stains, len(df) / max(n_pos, 1))
    report.save(out / "realism.json")
    log.info(
        "synth real: %d slides, %d boxes in %.1fs; mean-RGB logistic cross-slide AUROC %s (goal ≤ %.2f)",
        2 * cfg.patients,
        len(df),
        time.perf_counter() - t0,
        report.colour["auroc"],
        COLOUR_AUROC_GOAL,
    )
    return df, report
