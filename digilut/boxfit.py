"""Fit box edges to patch probabilities with the labeller's rule (a finer box than the grid gives).

The labeller marks a patch positive when a truth box covers at least ``min_overlap`` of its area.
So any candidate box predicts a label for every patch around it, and the box that best explains
the observed patch probabilities is a sub-cell estimate of the lesion's box. With a perfect
classifier at a 256 px stride (512 px patches) the edges of 300 random lesions land a median 41 px
(90th percentile 89 px) from the truth, against 73 px (176 px) and a 73 px outward bias for the
cells of the heatmap; with label noise every patch along an edge gets a vote.

Loss of a set of boxes over a window of patches (``q`` = observed probability, ``L`` = 1 when some
box covers ``min_overlap`` of the patch)::

    Σ  L·(1 − q) + miss_weight·(1 − L)·q

``miss_weight`` > 1 makes a positive patch left outside every box cost more than a negative patch
inside one (classifiers lose lesion patches more often than they invent them).

Size prior (``prior_weight`` > 0): each box also costs ``prior_weight · z² / 2`` patches, with
``z = ln(√area / PRIOR_SIDE_PX) / PRIOR_LOG_SD`` — the log-normal fitted to the 927 real DigiLut
training boxes (√area median 943 px, quartiles 714 / 1214 px, 1 %–99 % 289–3480 px at level 0).
Where the patches do not pin a box down (soft edges, a weak rim, two boxes fitting equally) it
prefers the sizes real lesions have, and a box does not grow to a slide-sized component for free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from digilut.heatmap import Heatmap
from digilut.score import GIOU_THRESHOLD, giou_matrix

Box = tuple[float, float, float, float]  # x1, x2, y1, y2 in level-0 px
STEPS_PER_CELL = 16  # edge search resolution: 1/16 cell (16 px at a 256 px stride)
SEARCH_CELLS = 1.5  # each edge moves at most this many cells per round
# The real DigiLut box sizes (927 training boxes, level-0 px at 0.25 µm/px): √area quantiles.
REAL_SIDE_QUANTILES_PX = {0.01: 289, 0.05: 446, 0.25: 714, 0.5: 943, 0.75: 1214, 0.95: 2116, 0.99: 3480}
PRIOR_SIDE_PX = 943.0  # median √area
PRIOR_LOG_SD = 0.39  # ln(1214 / 714) / 1.349: the log-normal with the real quartiles


@dataclass(frozen=True)
class PatchWindow:
    """The patches of one heatmap around a region, ready for loss evaluations."""

    q: np.ndarray  # (rows, cols) observed probabilities, 0 where no patch
    weight: np.ndarray  # (rows, cols) 1 for a patch, 0 where there is none
    miss: np.ndarray  # (rows, cols) cost of leaving the patch's probability outside every box
    px: np.ndarray  # (cols,) level-0 left edges of the patches
    py: np.ndarray  # (rows,) level-0 top edges
    pw: float  # patch width, level-0 px
    ph: float  # patch height
    need: float  # overlap area (px²) that makes a patch positive
    stride_px: float
    prior_weight: float = 0.0  # size prior: patches of cost per squared log-sd from the real sizes

    def size_cost(self, width: np.ndarray | float, height: np.ndarray | float) -> np.ndarray:
        """The size prior's cost of boxes ``width × height`` (level-0 px; 0 without a prior)."""
        area = np.maximum(np.asarray(width, np.float64) * np.asarray(height, np.float64), 1.0)
        if self.prior_weight <= 0:
            return np.zeros(area.shape)
        z = (0.5 * np.log(area) - np.log(PRIOR_SIDE_PX)) / PRIOR_LOG_SD
        return 0.5 * self.prior_weight * z**2

    def coverage(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """Overlap lengths of ``box`` with every patch column (x) and row (y)."""
        ox = np.clip(np.minimum(box[1], self.px + self.pw) - np.maximum(box[0], self.px), 0, None)
        oy = np.clip(np.minimum(box[3], self.py + self.ph) - np.maximum(box[2], self.py), 0, None)
        return ox, oy

    def labels(self, boxes: list[Box]) -> np.ndarray:
        """The labeller's labels of the window's patches given ``boxes``."""
        lab = np.zeros(self.q.shape, dtype=bool)
        for b in boxes:
            ox, oy = self.coverage(b)
            lab |= np.outer(oy, ox) >= self.need
        return lab

    def cost(self, lab: np.ndarray) -> np.ndarray:
        """Per-patch cost of labels ``lab`` (any leading batch dimensions)."""
        return self.weight * np.where(lab, 1.0 - self.q, self.miss * self.q)

    def loss(self, boxes: list[Box]) -> float:
        prior = sum(float(self.size_cost(b[1] - b[0], b[3] - b[2])) for b in boxes)
        return float(self.cost(self.labels(boxes)).sum()) + prior


def patch_window(
    hm: Heatmap,
    region: Box,
    min_overlap: float,
    *,
    miss_weight: float = 1.0,
    explained: np.ndarray | None = None,
    prior_weight: float = 0.0,
) -> PatchWindow:
    """The patches whose extent reaches within 1.5 cells of ``region``.

    ``explained`` (patch-grid bool, the heatmap's shape) marks patches whose positives another
    lesion may explain (they touch it): leaving them outside costs nothing, but a negative one
    still tells that no box covers it. ``prior_weight``: the size prior (module docstring).
    """
    s = hm.stride_px
    kr, kc = hm.patch_cells
    pw, ph = kc * s, kr * s
    reach = SEARCH_CELLS * s + max(pw, ph)
    c_lo = max(int(np.floor((region[0] - reach - hm.x_px) / s)), 0)
    c_hi = min(int(np.ceil((region[1] + reach - hm.x_px) / s)), hm.shape[1])
    r_lo = max(int(np.floor((region[2] - reach - hm.y_px) / s)), 0)
    r_hi = min(int(np.ceil((region[3] + reach - hm.y_px) / s)), hm.shape[0])
    q = hm.patch_prob[r_lo:r_hi, c_lo:c_hi].astype(np.float64)
    weight = (~np.isnan(q)).astype(np.float64)
    miss = np.full(q.shape, float(miss_weight))
    if explained is not None:
        miss[explained[r_lo:r_hi, c_lo:c_hi]] = 0.0
    return PatchWindow(
        np.nan_to_num(q), weight, miss,
        hm.x_px + np.arange(c_lo, c_hi, dtype=np.float64) * s,
        hm.y_px + np.arange(r_lo, r_hi, dtype=np.float64) * s,
        float(pw), float(ph), min_overlap * pw * ph, float(s), float(prior_weight),
    )  # fmt: skip


def _middle_of_first_flat_minimum(values: np.ndarray, losses: np.ndarray) -> float:
    best = np.flatnonzero(losses <= losses.min() + 1e-9)
    breaks = np.flatnonzero(np.diff(best) > 1)
    run = best[: breaks[0] + 1] if len(breaks) else best
    return float((values[run[0]] + values[run[-1]]) / 2.0)


def refine_box(win: PatchWindow, box: Box, rounds: int = 6) -> Box:
    """Coordinate descent on the four edges of ``box`` (1/16-cell steps, ±1.5 cells per round, at
    most ``rounds`` rounds) to the lowest loss; a flat optimum gives its middle. Other boxes are not
    modelled: mark their patches ``explained`` in the window."""
    if win.q.size == 0 or not win.weight.any():
        return box
    step = win.stride_px / STEPS_PER_CELL
    offsets = np.arange(-SEARCH_CELLS * STEPS_PER_CELL, SEARCH_CELLS * STEPS_PER_CELL + 1) * step
    cur = list(box)
    for _ in range(rounds):
        before = list(cur)
        for e in range(4):
            lo_edge, hi_edge = (0, 1) if e < 2 else (2, 3)
            cand = cur[e] + offsets
            keep = cand <= cur[hi_edge] - step if e == lo_edge else cand >= cur[lo_edge] + step
            cand = cand[keep]
            lo = cand if e == lo_edge else np.full_like(cand, cur[lo_edge])
            hi = cand if e == hi_edge else np.full_like(cand, cur[hi_edge])
            starts, extent = (win.px, win.pw) if e < 2 else (win.py, win.ph)
            moving = np.clip(
                np.minimum(hi[:, None], starts + extent) - np.maximum(lo[:, None], starts), 0, None
            )
            ox, oy = win.coverage((cur[0], cur[1], cur[2], cur[3]))
            if e < 2:
                lab = oy[None, :, None] * moving[:, None, :] >= win.need
            else:
                lab = moving[:, :, None] * ox[None, None, :] >= win.need
            if e < 2:
                size = win.size_cost(hi - lo, cur[3] - cur[2])
            else:
                size = win.size_cost(cur[1] - cur[0], hi - lo)
            cur[e] = _middle_of_first_flat_minimum(cand, win.cost(lab).sum(axis=(1, 2)) + size)
        if cur == before:
            break
    return (cur[0], cur[1], cur[2], cur[3])


def refine_boxes(
    win: PatchWindow, boxes: list[Box], rounds: int = 3, overlap_cost: float = 0.01
) -> list[Box]:
    """Refine several boxes together: each in turn by :func:`refine_box`, the patches the others
    label positive held fixed (their loss does not depend on it) except for ``overlap_cost`` per
    patch it covers too, so a box does not drift over its neighbour's patches for free."""
    cur = list(boxes)
    for _ in range(rounds):
        before = list(cur)
        for i in range(len(cur)):
            fixed = win.labels([b for j, b in enumerate(cur) if j != i])
            own = replace(
                win, q=np.where(fixed, 1.0 - overlap_cost, win.q), miss=np.where(fixed, 0.0, win.miss)
            )
            cur[i] = refine_box(own, cur[i])
        if cur == before:
            break
    return cur


def likeliest_hit(
    win: PatchWindow,
    box: Box,
    *,
    samples: int = 3000,
    span_cells: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
) -> Box:
    """The box most likely to hit (GIoU > 0.5) the lesion behind the patches, near ``box``.

    A small lesion's patches often fit many boxes equally well (the labeller's rule trades width
    for height), and :func:`refine_box`'s edge-by-edge middle is then not the middle of that set.
    So ``samples`` boxes with every edge moved by up to ``span_cells`` cells are weighted by
    ``exp(-(loss - best) / temperature)``, and the one whose weighted share of the others it would
    hit is largest is returned (``box`` itself is a candidate). The same offsets are drawn for
    every box (``seed``), so a shifted heatmap gives the shifted box.
    """
    if win.q.size == 0 or not win.weight.any():
        return box
    rng = np.random.default_rng(seed)
    span = span_cells * win.stride_px
    cand = np.asarray(box, np.float64)[None, :] + rng.uniform(-span, span, (samples, 4))
    cand = np.vstack([np.asarray(box, np.float64)[None, :], cand])
    cand = cand[(cand[:, 1] - cand[:, 0] >= 16) & (cand[:, 3] - cand[:, 2] >= 16)]
    ox = np.clip(np.minimum(cand[:, 1:2], win.px + win.pw) - np.maximum(cand[:, 0:1], win.px), 0, None)
    oy = np.clip(np.minimum(cand[:, 3:4], win.py + win.ph) - np.maximum(cand[:, 2:3], win.py), 0, None)
    lab = oy[:, :, None] * ox[:, None, :] >= win.need
    loss = win.cost(lab).sum(axis=(1, 2)) + win.size_cost(cand[:, 1] - cand[:, 0], cand[:, 3] - cand[:, 2])
    w = np.exp(-(loss - loss.min()) / temperature)
    keep = np.argsort(-w, kind="stable")[:1500]
    keep = keep[w[keep] > 1e-3]
    c, w = cand[keep], w[keep]
    giou = giou_matrix(c, c)
    best = int(np.argmax((giou > GIOU_THRESHOLD) @ w))
    return (float(c[best, 0]), float(c[best, 1]), float(c[best, 2]), float(c[best, 3]))
