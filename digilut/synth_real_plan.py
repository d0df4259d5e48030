"""Realistic synthetic slide plans: where the real texture goes, the stain, the infiltrates and boxes.

A plan (:class:`RealSlidePlan`) holds the fragment masks of :func:`digilut.synth_plan.plan_slide`,
the placement (turn, flip, offset) of the reference H&E image that fills them best, the slide's
stain (:class:`Stain`), its lesions (perivascular lymphocytic infiltrates with loose boxes, counts
per slide as in the real training CSV: :data:`REAL_BOX_COUNTS`) and its hard negatives (small
clusters, scattered lymphocytes, anthracotic pigment, haemorrhage) as points in level-0 px.
:mod:`digilut.synth_real_render` paints it; :mod:`digilut.synth_real` describes the whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import tifffile
from scipy import ndimage

from digilut.errors import ConfigError
from digilut.reference_data import cmu_small_region_svs
from digilut.synth_plan import MASK_PX, SlidePlan, SynthConfig, draw_box, plan_slide

# Boxes per slide in the real DigiLut training CSV (251 slides with boxes): count -> slides.
REAL_BOX_COUNTS = {
    1: 64, 2: 60, 3: 40, 4: 30, 5: 10, 6: 19, 7: 7, 8: 4, 9: 4, 10: 2, 11: 1, 12: 3, 13: 1,
    14: 1, 15: 1, 19: 1, 24: 1, 30: 1, 40: 1,
}  # fmt: skip
SOURCE_MPP = 0.499  # CMU-1-Small-Region
LYMPH_DENSITY = 1.0e-3  # nuclei per level-0 px² at an infiltrate's centre (1 per ~60 µm²)
SCATTER_DENSITY = 6.0e-5  # scattered lymphocytes per px² of tissue (1 per ~1,000 µm²)
CLUSTERS_PER_MPX = 3.0  # small unannotated clusters per million px² of tissue
MARGIN_RANGE = (0.05, 0.30)  # loose box: margin per side, share of the box side
STAIN_RANGE = (0.6, 1.4)  # per-slide scaling of haematoxylin and eosin
BRIGHTNESS_RANGE = (0.9, 1.05)
QUALITY_RANGE = (70, 95)
PIGMENT_PER_MPX = 1.0  # anthracotic deposits per million px² of tissue
BLOOD_PER_MPX = 0.8  # haemorrhages per million px² of tissue
THICKNESS_CELLS, THICKNESS_SIGMA = 12.0, 0.2  # uneven section: OD × e^(0.2·N(0,1)) over ~0.2 mm
PLACEMENT_TRIES = 12  # texture placements tried per slide (the most tissue wins)


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
def reference_image() -> tuple[np.ndarray, np.ndarray]:
    """The reference RGB image (uint8) and its tissue mask (bool), both at source resolution."""
    rgb = tifffile.imread(cmu_small_region_svs())
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"reference image has shape {rgb.shape}; expected RGB")
    sat = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    tissue = ndimage.binary_opening((sat > 25) & (rgb.mean(axis=2) < 225), iterations=2)
    return rgb, tissue


def turned(a: np.ndarray, turn: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, turn)
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror-tiling indices: 0..n-1, n-1..0, 0..n-1, …"""
    m = np.mod(idx, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _reference_tissue_cells(plan: RealSlidePlan) -> np.ndarray:
    """Share of reference tissue in each MASK_PX cell of the slide (float32)."""
    _, tissue = reference_image()
    t = turned(tissue, plan.turn, plan.flip).astype(np.float32)
    h, w = t.shape
    half = MASK_PX // 2  # source px per cell
    mh, mw = plan.fragments.shape
    rows = mirror(np.arange(mh * half) + plan.offset[1], h)
    cols = mirror(np.arange(mw * half) + plan.offset[0], w)
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


def _place_texture(
    rng: np.random.Generator, base: SlidePlan, stain: Stain, ref_hw: tuple[int, int]
) -> RealSlidePlan:
    """The reference image is 2/3 glass: of a few random placements (turn, flip, offset) keep the one
    whose tissue fills the fragments of ``base`` best."""
    trials = []
    for _ in range(PLACEMENT_TRIES):
        turn, flip = int(rng.integers(4)), bool(rng.integers(2))
        h_src, w_src = (ref_hw[1], ref_hw[0]) if turn % 2 else ref_hw
        offset = (int(rng.integers(2 * w_src)), int(rng.integers(2 * h_src)))
        trial = RealSlidePlan(
            base.name, base.width, base.height, base.tissue, base.tissue, turn, flip, offset, stain
        )
        trial.tissue = (trial.fragments * _reference_tissue_cells(trial)).astype(np.float32)
        trials.append(trial)
    return max(trials, key=lambda t: float(t.tissue.sum()))


def _add_lesions(rng: np.random.Generator, plan: RealSlidePlan, n_boxes: int) -> list[np.ndarray]:
    """Add up to ``n_boxes`` lesions to ``plan``: loose boxes with the real sizes, the infiltrate
    filling the box less the margins. Returns their nuclei."""
    nuclei = []
    for _ in range(n_boxes):
        box = draw_box(rng, plan.tissue, (plan.width, plan.height), plan.boxes)
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
    return nuclei


def _add_hard_negatives(rng: np.random.Generator, plan: RealSlidePlan, area_mpx: float) -> list[np.ndarray]:
    """Add small unannotated clusters to ``plan``; return their nuclei and lymphocytes scattered
    over all tissue (``area_mpx``: the tissue area in million level-0 px²)."""
    nuclei: list[np.ndarray] = []
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
    return nuclei


def plan_real_slide(name: str, size: str, seed: int, positive: bool) -> RealSlidePlan:
    """Draw fragments, texture transform, stain, infiltrates (lesions and clusters), nuclei and boxes."""
    if size not in ("tiny", "demo"):
        raise ConfigError(
            f"size={size!r}: realistic slides are rendered in memory, so only tiny and demo sizes; "
            "use --realism simple for full-size slides"
        )
    base = plan_slide(name, SynthConfig(size=size), seed=seed, positive=False)  # the fragments only
    rng = np.random.default_rng([seed, 31])
    ref, _ = reference_image()
    stain = Stain(
        h=float(rng.uniform(*STAIN_RANGE)),
        e=float(rng.uniform(*STAIN_RANGE)),
        d=float(rng.uniform(0.0, 0.06)),
        brightness=float(rng.uniform(*BRIGHTNESS_RANGE)),
        quality=int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1)),
    )
    plan = _place_texture(rng, base, stain, ref.shape[:2])
    plan.seed = seed
    noise = ndimage.gaussian_filter(rng.standard_normal(plan.fragments.shape), THICKNESS_CELLS, mode="wrap")
    noise /= max(float(noise.std()), 1e-9)
    plan.thickness = np.exp(np.clip(noise, -2.5, 2.5) * THICKNESS_SIGMA).astype(np.float32)
    nuclei = _add_lesions(rng, plan, _draw_count(rng) if positive else 0)
    area_mpx = float(plan.tissue.sum()) * MASK_PX**2 / 1e6
    nuclei += _add_hard_negatives(rng, plan, area_mpx)
    plan.nuclei = np.concatenate(nuclei).astype(np.float32)
    # Lung hard negatives as dark or saturated as an infiltrate: anthracotic pigment (black
    # granules, often round vessels) and haemorrhage (packed red cells).
    plan.pigment = _deposits(rng, plan, int(rng.poisson(PIGMENT_PER_MPX * area_mpx)), (40, 200), 4e-3)
    plan.blood = _deposits(rng, plan, int(rng.poisson(BLOOD_PER_MPX * area_mpx)), (80, 400), 3e-3)
    return plan
