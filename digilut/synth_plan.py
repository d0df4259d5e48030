"""Synthetic slide plans: tissue fragments, lesions and their boxes, drawn as on real DigiLut slides.

Box sizes follow the real DigiLut distribution (level-0 side ≈ √area: 5th/50th/95th percentiles
445 / 943 / 2119 px, from the 927 real training boxes), 1–5 boxes per positive slide, some slides
without any. Lesions lie as close together as on real slides: 30 % of the real boxes have their
nearest neighbour (Chebyshev gap between boxes of one slide) within 4096 px — 12.5 % within
512 px, 2.2 % overlapping — and the rest are far away (median 33,000 px); so each further box
is, with :data:`NEAR_PROBABILITY`, placed beside a placed one at a gap drawn from the real near
gaps (:data:`NEAR_GAP_DECILES_PX`), otherwise at least :data:`FAR_GAP_PX` from every other box
(the real far gaps are larger, but beyond 2048 px lesions no longer share a patch or a box fit;
a box that finds no room is left out). Masks are at a coarse grid (:data:`MASK_PX`); the slide is
drawn from them by :mod:`digilut.synth_render`. Deterministic per seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage

from digilut.errors import ConfigError

SizeName = Literal["tiny", "demo", "full"]
Realism = Literal["simple", "real"]
MPP0 = 0.25  # µm per level-0 pixel: 40x, as DigiLut
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


def place_box(
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


def draw_box(
    rng: np.random.Generator,
    tissue: np.ndarray,
    slide_wh: tuple[int, int],
    boxes: list[tuple[int, int, int, int]],
) -> tuple[int, int, int, int] | None:
    """A further box of a real DigiLut size and aspect, on tissue: with :data:`NEAR_PROBABILITY`
    beside a placed one at a real near gap, else far from all (:func:`place_box`); None: no room."""
    side = float(np.clip(rng.lognormal(np.log(BOX_SIDE_MEDIAN_PX), BOX_SIDE_SIGMA), *BOX_SIDE_RANGE_PX))
    aspect = float(np.clip(rng.lognormal(0, BOX_ASPECT_SIGMA), 1 / 3, 3))
    bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
    near = bool(boxes) and rng.random() < NEAR_PROBABILITY
    gap = float(np.interp(rng.random(), np.linspace(0, 1, 11), NEAR_GAP_DECILES_PX))
    return place_box(rng, tissue, slide_wh, (bw, bh), boxes, gap if near else None)


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
        box = draw_box(rng, tissue, (w0, h0), boxes)
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
