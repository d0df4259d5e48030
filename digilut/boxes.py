"""Heatmap → exactly N boxes per slide.

Methods (:class:`BoxesConfig` ``method``):

``hysteresis`` (default)
    Cells ≥ ``high`` seed components that grow through cells ≥ ``low`` (8-connected,
    :func:`scipy.ndimage.label`). A box is fitted to the cells a component covers — not to the full
    extents of its patches, which overshoot a lesion by up to a patch — through row and column
    profiles (:func:`fit_box`: a stray rim cell does not move an edge by a whole cell). A component
    larger than ``split_min_area_px2`` with several separate peaks (two lesions merged by the
    patches between them) is split at its peaks of ``distance-to-edge × smoothed probability``: two
    peaks are separate when that surface dips below ``split_saddle_ratio`` of the lower peak on the
    segment joining them; with ``fit="model"`` the split is kept only when one box per part explains
    the patch probabilities better than one box for all, by ``split_min_gain`` patches.
``dbscan``
    The original write-up's method: DBSCAN on the centres of patches with probability ≥ ``high``
    (``eps = dbscan_eps_cells`` grid steps); a box is the union of the patch extents of a cluster.
``fuse``
    The original write-up's other method: patches ≥ ``high`` with fewer than
    ``fuse_min_neighbours`` positive neighbours (of 8) are dropped, the overlapping rest fused; a
    box is the union of the fused patches' extents.

Every method then drops candidates smaller than ``min_area_px2``, ranks them by probability mass
(sum of the cell probabilities they cover) and keeps the best N. With ``fit="model"`` (default)
their edges are then moved to the box whose labels, by the labeller's rule, best explain the patch
probabilities (:mod:`digilut.boxfit`, sub-cell edges), ignoring the patches of other components;
a box up to ``hit_max_side_px`` (√area) then moves to the box most likely to hit the lesion among
those that explain its patches about as well (:func:`~digilut.boxfit.likeliest_hit`: a small
lesion's patches fit many boxes). ``margin_px`` is added to every side (negative shrinks).
When there are fewer than N (hysteresis, model fit), spare boxes first go to the two halves of
chosen boxes whose best straight cut in two explains at least ``alt_min_gain`` more patches
(:func:`best_cut`: two touching lesions that made one component, with no dip to split at; the
whole box stays, so a single lesion is still hit). The rest are filled with ``fill_side_px``
squares centred on the next-best heatmap peaks outside the chosen boxes (then on the best
remaining tissue cells) — never with ``(0,0,0,0)``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from digilut.boxfit import likeliest_hit, patch_window, refine_box, refine_boxes
from digilut.errors import ConfigError
from digilut.heatmap import Heatmap, build_heatmaps
from digilut.score import giou_matrix, score_slides

log = logging.getLogger(__name__)

Method = Literal["hysteresis", "dbscan", "fuse"]
Background = Literal["none", "slide", "local"]
BACKGROUNDS: tuple[str, ...] = ("none", "slide", "local")
Fit = Literal["model", "grid"]
METHODS: tuple[str, ...] = ("hysteresis", "dbscan", "fuse")
BOX_COLUMNS = ("filename", "x1", "x2", "y1", "y2", "score", "rank", "source")
# Median real DigiLut box side (√area, level-0 px, 927 training boxes): the size of a fill box.
MEDIAN_LESION_SIDE_PX = 943
_EIGHT = np.ones((3, 3), dtype=bool)
CUTS_REFINED = 64  # best_cut: the best cuts by profile fit that are refined against the patches


@dataclass(frozen=True)
class BoxesConfig:
    """Parameters of :func:`heatmap_to_boxes` (level-0 pixels throughout)."""

    method: Method = "hysteresis"
    background: Background = "slide"  # thresholds relative to the slide's (or local) background level
    background_quantile: float = 0.25  # the background is this quantile of the patch probabilities
    background_window_cells: int = 24  # local: side of the square window of the quantile
    high: float = 0.75  # hysteresis: seed threshold on cells; dbscan/fuse: positive-patch threshold
    low: float = 0.5  # hysteresis: grow threshold on cells (≤ high)
    min_area_px2: float = 0.0  # candidates with a smaller area are dropped
    margin_px: float = 0.0  # added to every side of a box; negative shrinks
    profile_fraction: float = 0.6  # hysteresis: box edges where row/column mass reaches this × max
    fit: Fit = "model"  # model: edges refined against the patch labels (boxfit); grid: as found
    label_min_overlap: float = 0.1  # the labeller's rule: positive from this share of box cover
    fit_miss_weight: float = 2.0  # model fit: cost of a positive patch left outside vs a negative inside
    split_min_area_px2: float = 1.0e6  # hysteresis: only components larger than this are split
    split_saddle_ratio: float = 0.85  # hysteresis: peaks are separate below this dip; 0 never splits
    split_min_gain: float = 8.0  # hysteresis + model fit: a split must explain this many more patches
    alt_min_gain: float = 1.0  # hysteresis + model fit: spare boxes split a chosen box when that gains this
    hit_max_side_px: float = 1500.0  # model fit: boxes up to this √area move to their likeliest hit; 0: off
    fill_side_px: int = MEDIAN_LESION_SIDE_PX  # side of the boxes filling up to N
    dbscan_eps_cells: float = 1.5  # dbscan: neighbourhood radius in grid steps (1.5 = 8 neighbours)
    dbscan_min_samples: int = 2  # dbscan: core points need this many patches within eps (self included)
    fuse_min_neighbours: int = 2  # fuse: positives with fewer positive neighbours (of 8) are dropped

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.background not in BACKGROUNDS:
            raise ConfigError(f"background={self.background!r}: choose one of {', '.join(BACKGROUNDS)}")
        if not 0.0 <= self.background_quantile < 1.0:
            raise ConfigError(f"background_quantile={self.background_quantile} must be in [0, 1)")
        if self.background_window_cells < 3:
            raise ConfigError(f"background_window_cells={self.background_window_cells} must be ≥ 3 cells")
        for name in ("high", "low"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} must be a probability in [0, 1]")
        if self.low > self.high:
            raise ConfigError(f"low={self.low} must not exceed high={self.high} (grow ≤ seed threshold)")
        if self.min_area_px2 < 0 or self.split_min_area_px2 < 0:
            raise ConfigError(
                f"min_area_px2={self.min_area_px2}, split_min_area_px2={self.split_min_area_px2} "
                "must be ≥ 0 (level-0 px²)"
            )
        if self.fit not in ("model", "grid"):
            raise ConfigError(f"fit={self.fit!r}: choose model or grid")
        if not 0.0 < self.label_min_overlap <= 1.0:
            raise ConfigError(f"label_min_overlap={self.label_min_overlap} must be in (0, 1]")
        if not 0.0 <= self.profile_fraction <= 1.0:
            raise ConfigError(f"profile_fraction={self.profile_fraction} must be in [0, 1]; 0 = cell extent")
        if not 0.0 <= self.split_saddle_ratio < 1.0:
            raise ConfigError(f"split_saddle_ratio={self.split_saddle_ratio} must be in [0, 1); 0 disables")
        if self.hit_max_side_px < 0:
            raise ConfigError(f"hit_max_side_px={self.hit_max_side_px} must be ≥ 0 level-0 px (0 = off)")
        if self.alt_min_gain < 0:
            raise ConfigError(f"alt_min_gain={self.alt_min_gain} must be ≥ 0 patches")
        if self.split_min_gain < 0 or self.fit_miss_weight <= 0:
            raise ConfigError(
                f"split_min_gain={self.split_min_gain} must be ≥ 0 and "
                f"fit_miss_weight={self.fit_miss_weight} > 0"
            )
        if self.fill_side_px < 1:
            raise ConfigError(f"fill_side_px={self.fill_side_px} must be ≥ 1 level-0 px")
        if self.dbscan_eps_cells <= 0 or self.dbscan_min_samples < 1:
            raise ConfigError(
                f"dbscan_eps_cells={self.dbscan_eps_cells} must be > 0 and "
                f"dbscan_min_samples={self.dbscan_min_samples} ≥ 1"
            )
        if not 0 <= self.fuse_min_neighbours <= 8:
            raise ConfigError(f"fuse_min_neighbours={self.fuse_min_neighbours} must be in 0..8")


BOXES_CONFIG_NAME = "boxes_config.json"  # the tuned config, beside an ensemble's model files


def save_boxes_config(cfg: BoxesConfig, path: Path) -> Path:
    """Write ``cfg`` as JSON (every field) to ``path``."""
    path.write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
    return path


def load_boxes_config(path: Path) -> BoxesConfig:
    """The :class:`BoxesConfig` saved at ``path``; a file that is not one is a :class:`ConfigError`
    naming it and the offending fields."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable boxes config ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a boxes config is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(BoxesConfig)})
    if unknown:
        raise ConfigError(f"{path}: unknown boxes config field(s) {', '.join(unknown)}")
    try:
        return BoxesConfig(**data)
    except (TypeError, ConfigError) as err:
        raise ConfigError(f"{path}: {err}") from err


@dataclass(frozen=True)
class _Candidate:
    box: tuple[float, float, float, float]  # x1, x2, y1, y2
    mass: float
    source: str  # component | split | fill
    part: int = 0  # label in the hysteresis part image (0: none)


# --- relative heatmap ------------------------------------------------------------------------


def relative_heatmap(hm: Heatmap, background: str, quantile: float = 0.25, window_cells: int = 24) -> Heatmap:
    """``hm`` with its probabilities rescaled to ``(p − background) / (top − background)``, clipped to
    [0, 1], so that thresholds mean "how far above this slide's normal tissue" rather than absolute
    probabilities: a classifier whose normal tissue sits at 0.3–0.6 on one slide and 0.05 on the next
    gets the same boxes.

    ``background``: ``none`` (unchanged), ``slide`` (the ``quantile`` of the slide's patch
    probabilities: lesions cover a small share of tissue, so a low quantile is normal tissue even on
    a small slide with a large lesion), ``local`` (that quantile over a ``window_cells`` square
    around each patch: a background that drifts across the slide). ``top``: the slide's highest
    patch probability. A slide whose top is not above its background is unchanged.
    """
    if background == "none":
        return hm
    has = ~np.isnan(hm.patch_prob)
    if not has.any():
        return hm
    values = hm.patch_prob[has]
    level = float(np.quantile(values, quantile))
    if background == "local":
        filled = np.where(has, hm.patch_prob, level).astype(np.float64)
        bg_patch = ndimage.percentile_filter(filled, 100 * quantile, size=window_cells, mode="nearest")
    else:
        bg_patch = np.full(hm.patch_prob.shape, level)
    top = float(values.max())
    if top - bg_patch[has].min() <= 1e-6:
        return hm
    span = np.maximum(top - bg_patch, 1e-6)
    patch_rel = np.where(has, np.clip((hm.patch_prob - bg_patch) / span, 0.0, 1.0), np.nan).astype(np.float32)
    # Cells: the mean of the relative probabilities of the patches covering them (as build_heatmap).
    kr, kc = hm.patch_cells
    rows, cols = hm.shape
    starts = np.nan_to_num(patch_rel, nan=0.0).astype(np.float64)
    csum = np.zeros((rows, cols), np.float64)
    for dr in range(kr):
        for dc in range(kc):
            csum[dr:, dc:] += starts[: rows - dr, : cols - dc]
    cell = np.where(hm.count > 0, csum / np.maximum(hm.count, 1), 0.0).astype(np.float32)
    return replace(hm, prob=cell, patch_prob=patch_rel)


# --- candidates ------------------------------------------------------------------------------


def hysteresis_labels(prob: np.ndarray, high: float, low: float) -> tuple[np.ndarray, int]:
    """Components of ``prob ≥ low`` (8-connected) that contain a cell ``≥ high``, relabelled 1..n."""
    grow, n = ndimage.label(prob >= low, structure=_EIGHT)
    if n == 0:
        return grow, 0
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[np.unique(grow[(prob >= high) & (grow > 0)])] = True
    seeded[0] = False
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[seeded] = np.arange(1, int(seeded.sum()) + 1)
    return relabel[grow], int(seeded.sum())


def _peaks_separate(surface: np.ndarray, a: np.ndarray, b: np.ndarray, ratio: float) -> bool:
    steps = int(np.ceil(np.hypot(*(a - b)))) * 2 + 1
    line = np.linspace(a, b, steps).round().astype(int)
    dip = surface[line[:, 0], line[:, 1]].min()
    return bool(dip < ratio * min(surface[tuple(a)], surface[tuple(b)]))


def split_component(mask: np.ndarray, prob: np.ndarray, saddle_ratio: float) -> np.ndarray:
    """Split one component ``mask`` at its separate peaks; returns labels 1..k on the mask (0 off it).

    The surface is the distance to the component's edge times the smoothed probability, so two
    lesions joined by a thin bridge give two hills with a dip between them, while one elongated
    lesion gives a ridge without a dip (not split).
    """
    surface = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    surface = surface * ndimage.gaussian_filter(np.where(mask, prob, 0.0), 1.0)
    is_peak = mask & (surface == ndimage.maximum_filter(surface, size=3)) & (surface > 0)
    coords = np.argwhere(is_peak)
    order = np.argsort(-surface[is_peak], kind="stable")
    kept: list[np.ndarray] = []
    for p in coords[order]:
        if all(_peaks_separate(surface, p, q, saddle_ratio) for q in kept):
            kept.append(p)
    if len(kept) < 2:
        return mask.astype(np.int32)
    markers = np.zeros(mask.shape, dtype=np.int32)
    for i, p in enumerate(kept, start=1):
        markers[tuple(p)] = i
    _, (ri, ci) = ndimage.distance_transform_edt(markers == 0, return_indices=True)
    return np.where(mask, markers[ri, ci], 0).astype(np.int32)


def _profile_span(profile: np.ndarray, fraction: float) -> tuple[int, int]:
    """First and last index where ``profile`` reaches ``fraction`` of its maximum."""
    idx = np.flatnonzero(profile >= fraction * profile.max())
    return int(idx[0]), int(idx[-1])


def fit_box(
    hm: Heatmap, parts: np.ndarray, label: int, fraction: float, where: tuple[slice, slice] | None = None
) -> tuple[int, int, int, int]:
    """Level-0 box of the part ``label`` of the label image ``parts`` (same grid as ``hm``).

    ``fraction == 0``: the cells the part covers. Otherwise the columns (rows) whose probability
    mass — over the part's cells and the unlabelled cells around it, one cell beyond its bounding
    box — reaches ``fraction`` of the strongest column (row): one stray cell on a lesion's rim no
    longer moves the box by a whole cell, and faint rim cells count where the whole side is strong.
    ``where``: the part's bounding slices when known (:func:`scipy.ndimage.find_objects`).
    """
    if where is None:
        rows, cols = np.nonzero(parts == label)
        r1, r2, c1, c2 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    else:
        r1, r2, c1, c2 = where[0].start, where[0].stop - 1, where[1].start, where[1].stop - 1
    if fraction <= 0:
        return hm.cells_to_box(r1, r2, c1, c2)
    wr1, wc1 = max(r1 - 1, 0), max(c1 - 1, 0)
    win = (slice(wr1, r2 + 2), slice(wc1, c2 + 2))
    own = (parts[win] == label) | (parts[win] == 0)
    weight = np.where(own, hm.prob[win], 0.0)
    y1, y2 = _profile_span(weight.sum(axis=1), fraction)
    x1, x2 = _profile_span(weight.sum(axis=0), fraction)
    return hm.cells_to_box(wr1 + y1, wr1 + y2, wc1 + x1, wc1 + x2)


def touching_patches(hm: Heatmap, cells: np.ndarray) -> np.ndarray:
    """Patch-grid mask of the patches whose extent covers any of the ``cells`` (heatmap-shaped bool)."""
    kr, kc = hm.patch_cells
    rows, cols = cells.shape
    out = np.zeros_like(cells, dtype=bool)
    for dr in range(kr):
        for dc in range(kc):
            out[: rows - dr, : cols - dc] |= cells[dr:, dc:]
    return out


def _refined(
    hm: Heatmap,
    box: tuple[float, float, float, float],
    explained: np.ndarray | None,
    cfg: BoxesConfig,
    *,
    hit: bool = False,
) -> tuple[float, float, float, float]:
    win = patch_window(hm, box, cfg.label_min_overlap, miss_weight=cfg.fit_miss_weight, explained=explained)
    box = refine_box(win, box)
    if hit and (box[1] - box[0]) * (box[3] - box[2]) <= cfg.hit_max_side_px**2:
        box = likeliest_hit(win, box)
    return box


def _split_pays(
    hm: Heatmap, labels: np.ndarray, i: int, sl: tuple[slice, slice], split: np.ndarray, cfg: BoxesConfig
) -> bool:
    """Do one box per part explain the component's patches better than one box, by split_min_gain?"""
    others = (labels != 0) & (labels != i)
    explained = touching_patches(hm, others)
    parts = np.where(others, -1, 0).astype(np.int32)
    parts[sl] = np.where(labels[sl] == i, split, parts[sl])
    whole = np.where(parts > 0, 1, parts)
    single = fit_box(hm, whole, 1, cfg.profile_fraction, sl)
    win = patch_window(
        hm, single, cfg.label_min_overlap, miss_weight=cfg.fit_miss_weight, explained=explained
    )
    single = refine_box(win, single)
    boxes = []
    for j in range(1, int(split.max()) + 1):
        b = fit_box(hm, parts, j, cfg.profile_fraction)
        boxes.append(_refined(hm, b, explained | touching_patches(hm, (parts > 0) & (parts != j)), cfg))
    loss = win.loss([single])
    gain = loss - win.loss(boxes)
    ok = gain >= cfg.split_min_gain
    log.debug("%s: split into %d: gain %.1f of loss %.1f patches → %s", hm.slide, len(boxes), gain, loss, ok)
    return ok


def _hysteresis_candidates(hm: Heatmap, cfg: BoxesConfig) -> tuple[np.ndarray, list[_Candidate]]:
    """The part image (components, split where they hold several lesions) and a candidate per part."""
    labels, _ = hysteresis_labels(hm.prob, cfg.high, cfg.low)
    cell_area = float(hm.stride_px) ** 2
    parts = np.zeros_like(labels)
    sources: list[str] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == i
        split = mask.astype(np.int32)
        if cfg.split_saddle_ratio > 0 and mask.sum() * cell_area > cfg.split_min_area_px2:
            proposal = split_component(mask, hm.prob[sl], cfg.split_saddle_ratio)
            if proposal.max() > 1 and (cfg.fit != "model" or _split_pays(hm, labels, i, sl, proposal, cfg)):
                split = proposal
        k = int(split.max())
        parts[sl] = np.where(mask, split + len(sources), parts[sl])
        sources += ["split" if k > 1 else "component"] * k
    if not sources:
        return parts, []
    index = np.arange(1, len(sources) + 1)
    masses = ndimage.sum_labels(hm.prob, parts, index)
    where = ndimage.find_objects(parts)
    cands = [
        _Candidate(fit_box(hm, parts, j, cfg.profile_fraction, where[j - 1]), float(masses[j - 1]), source, j)
        for j, source in zip(index.tolist(), sources, strict=True)
    ]
    return parts, cands


def _patch_box(hm: Heatmap, rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int]:
    kr, kc = hm.patch_cells
    return hm.cells_to_box(
        int(rows.min()), int(rows.max()) + kr - 1, int(cols.min()), int(cols.max()) + kc - 1
    )


def _mass(hm: Heatmap, box: tuple[float, float, float, float]) -> float:
    s = hm.stride_px
    c1, c2 = int(np.floor((box[0] - hm.x_px) / s)), int(np.ceil((box[1] - hm.x_px) / s))
    r1, r2 = int(np.floor((box[2] - hm.y_px) / s)), int(np.ceil((box[3] - hm.y_px) / s))
    return float(hm.prob[max(r1, 0) : max(r2, 0), max(c1, 0) : max(c2, 0)].sum())


def _dbscan_candidates(hm: Heatmap, cfg: BoxesConfig) -> list[_Candidate]:
    from sklearn.cluster import DBSCAN  # heavy import, only for this method

    pos = np.argwhere(np.nan_to_num(hm.patch_prob, nan=-1.0) >= cfg.high)
    if len(pos) == 0:
        return []
    found = DBSCAN(eps=cfg.dbscan_eps_cells, min_samples=cfg.dbscan_min_samples).fit_predict(pos)
    out = []
    for k in sorted(set(found.tolist()) - {-1}):
        member = pos[found == k]
        box = _patch_box(hm, member[:, 0], member[:, 1])
        out.append(_Candidate(box, _mass(hm, box), "component"))
    return out


def _fuse_candidates(hm: Heatmap, cfg: BoxesConfig) -> list[_Candidate]:
    positive = np.nan_to_num(hm.patch_prob, nan=-1.0) >= cfg.high
    neighbours = ndimage.convolve(positive.astype(np.int32), _EIGHT.astype(np.int32), mode="constant")
    keep = positive & (neighbours - 1 >= cfg.fuse_min_neighbours)
    # Patches overlap when their corners are less than a patch apart (touch, for 1-cell patches).
    kr, kc = hm.patch_cells
    structure = np.ones((2 * max(kr - 1, 1) + 1, 2 * max(kc - 1, 1) + 1), dtype=bool)
    labels, _ = ndimage.label(keep, structure=structure)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        rows, cols = np.nonzero(labels[sl] == i)
        box = _patch_box(hm, rows + sl[0].start, cols + sl[1].start)
        out.append(_Candidate(box, _mass(hm, box), "component"))
    return out


def _shifted(mask: np.ndarray, sl: tuple[slice, slice]) -> tuple[slice, slice]:
    """The bounding slices of ``mask`` (local to ``sl``) in the full image."""
    local = ndimage.find_objects(mask.astype(np.int32))[0]
    return (
        slice(local[0].start + sl[0].start, local[0].stop + sl[0].start),
        slice(local[1].start + sl[1].start, local[1].stop + sl[1].start),
    )


def best_cut(
    hm: Heatmap, parts: np.ndarray, label: int, box: tuple[float, float, float, float], cfg: BoxesConfig
) -> tuple[float, list[tuple[float, float, float, float]]]:
    """The two boxes that best explain part ``label`` of ``parts`` when it is cut in two by a
    straight row or column line, and how many patches (loss) they explain better than ``box``.

    Every cut between two rows or columns of the part is tried with profile-fitted boxes on either
    side; the three best by loss are refined against the patches (:mod:`digilut.boxfit`), each box
    with the other's patches marked explained. Returns ``(gain, [box_a, box_b])``; ``(0, [])`` when
    the part is a single cell wide and tall.
    """
    sl = ndimage.find_objects((parts == label).astype(np.int32))[0]
    mask = parts[sl] == label
    rows, cols = mask.shape
    if rows < 2 and cols < 2:
        return 0.0, []
    others = (parts != 0) & (parts != label)
    explained = touching_patches(hm, others)
    win = patch_window(hm, box, cfg.label_min_overlap, miss_weight=cfg.fit_miss_weight, explained=explained)
    single = win.loss([box])
    rr, cc = np.mgrid[0:rows, 0:cols]
    background = np.where(others, -1, 0).astype(np.int32)
    trials = []
    for axis, n in ((0, rows), (1, cols)):
        for cut in range(1, n):
            side = (rr if axis == 0 else cc) >= cut
            a, b = mask & ~side, mask & side
            if not a.any() or not b.any():
                continue
            sub = background.copy()
            sub[sl] = np.where(a, 1, np.where(b, 2, sub[sl]))
            pair = [fit_box(hm, sub, k, cfg.profile_fraction, _shifted(h, sl)) for k, h in ((1, a), (2, b))]
            trials.append((win.loss(pair), sub, pair))
    if not trials:
        return 0.0, []
    trials.sort(key=lambda t: t[0])
    best_loss, best_pair = np.inf, []
    for _, _sub, pair in trials[:CUTS_REFINED]:
        refined = refine_boxes(win, pair)
        loss = win.loss(refined)
        if loss < best_loss:
            best_loss, best_pair = loss, refined
    return float(single - best_loss), best_pair


def _giou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return float(giou_matrix(np.array([a]), np.array([b]))[0, 0])


def _alternatives(
    hm: Heatmap, parts: np.ndarray, chosen: list[_Candidate], k: int, cfg: BoxesConfig
) -> list[_Candidate]:
    """Up to ``k`` spare boxes: the halves of chosen boxes whose best cut in two (:func:`best_cut`)
    explains at least ``alt_min_gain`` more patches — two touching lesions that made one box. The
    whole box stays: if it was one lesion it still hits, if it was two the halves may."""
    alts = []
    for c in chosen:
        if c.part <= 0:
            continue
        gain, pair = best_cut(hm, parts, c.part, c.box, cfg)
        log.debug("%s: part %d box %s: best cut gains %.2f patches", hm.slide, c.part, c.box, gain)
        if pair and gain >= cfg.alt_min_gain:
            alts.append((gain, c, pair))
    alts.sort(key=lambda a: -a[0])
    out: list[_Candidate] = []
    for gain, c, pair in alts:
        # With one spare box left, the half least like the whole box: the whole box may still hit
        # the larger lesion, the other half then finds the smaller one.
        pair = sorted(pair, key=lambda b: _giou(b, c.box))
        for b in pair[: k - len(out)]:
            out.append(_Candidate(b, _mass(hm, b), "alternative", c.part))
        log.debug("%s: box of part %d cut in two, gain %.1f patches", hm.slide, c.part, gain)
        if len(out) == k:
            break
    return out


# --- N boxes ---------------------------------------------------------------------------------


def _inside_any(x: float, y: float, boxes: Sequence[tuple[float, float, float, float]]) -> bool:
    return any(b[0] <= x < b[1] and b[2] <= y < b[3] for b in boxes)


def _fill_candidates(
    hm: Heatmap, chosen: list[tuple[float, float, float, float]], k: int, side_px: int
) -> list[_Candidate]:
    """``k`` squares of ``side_px`` centred, in turn, on: the best heatmap peaks outside the chosen
    boxes; the best cells with any probability outside them; the best such cells inside them (a
    lesion merged into a bigger one); then on any tissue cell. Never on a cell already used."""
    smooth = ndimage.gaussian_filter(hm.prob.astype(np.float64), 1.0)
    tissue = hm.count > 0
    some = tissue & (smooth > 1e-6)
    peak = some & (smooth == ndimage.maximum_filter(smooth, size=3))

    def best(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask)[np.argsort(-smooth[mask], kind="stable")]

    s, half = hm.stride_px, side_px / 2.0
    out: list[_Candidate] = []
    fills: list[tuple[float, float, float, float]] = []
    pools = itertools.chain(
        ((rc, "outside") for rc in best(peak)),
        ((rc, "outside") for rc in best(some)),
        ((rc, "new") for rc in best(some)),
        ((rc, "new") for rc in best(tissue)),
        ((rc, "any") for rc in itertools.cycle(best(tissue))),  # more boxes wanted than cells
    )
    for rc, rule in pools:
        if len(out) == k:
            break
        x, y = hm.x_px + (rc[1] + 0.5) * s, hm.y_px + (rc[0] + 0.5) * s
        if rule != "any" and _inside_any(x, y, fills):
            continue
        if rule == "outside" and _inside_any(x, y, chosen):
            continue
        box = (x - half, x + half, y - half, y + half)
        out.append(_Candidate(box, _mass(hm, box), "fill"))
        fills.append(box)
    while len(out) < k:  # only a heatmap without any tissue cell gets here
        x, y = (hm.extent_px[0] + hm.extent_px[1]) / 2, (hm.extent_px[2] + hm.extent_px[3]) / 2
        out.append(_Candidate((x - half, x + half, y - half, y + half), 0.0, "fill"))
    return out


def heatmap_to_boxes(hm: Heatmap, n: int | None, cfg: BoxesConfig | None = None) -> pd.DataFrame:
    """Boxes of one slide, best first: exactly ``n`` (filled up if needed), or all when ``n`` is None.

    Returns :data:`BOX_COLUMNS`: ``filename,x1,x2,y1,y2`` (level-0 px, ints), ``score`` (probability
    mass), ``rank`` (1 = best) and ``source`` (component, split or fill).
    """
    cfg = cfg or BoxesConfig()
    if n is not None and n < 0:
        raise ConfigError(f"n={n}: the number of boxes must be ≥ 0")
    hm = relative_heatmap(hm, cfg.background, cfg.background_quantile, cfg.background_window_cells)
    parts = None
    if cfg.method == "hysteresis":
        parts, cands = _hysteresis_candidates(hm, cfg)
    else:
        cands = (_dbscan_candidates if cfg.method == "dbscan" else _fuse_candidates)(hm, cfg)
    cands = [c for c in cands if (c.box[1] - c.box[0]) * (c.box[3] - c.box[2]) >= cfg.min_area_px2]
    cands.sort(key=lambda c: -c.mass)
    if n is not None:
        cands = cands[:n]
    if cfg.fit == "model":
        cands = [
            replace(
                c,
                box=_refined(
                    hm,
                    c.box,
                    None if parts is None else touching_patches(hm, (parts != 0) & (parts != c.part)),
                    cfg,
                    hit=True,
                ),
            )
            for c in cands
        ]
    if n is not None and len(cands) < n and parts is not None and cfg.fit == "model":
        cands += _alternatives(hm, parts, cands, n - len(cands), cfg)
    m = cfg.margin_px
    cands = [replace(c, box=(c.box[0] - m, c.box[1] + m, c.box[2] - m, c.box[3] + m)) for c in cands]
    if n is not None and len(cands) < n:
        cands += _fill_candidates(hm, [c.box for c in cands], n - len(cands), cfg.fill_side_px)
    rows = []
    for rank, c in enumerate(cands, start=1):
        x1, x2, y1, y2 = (round(v) for v in c.box)
        x1, y1 = max(x1, 0), max(y1, 0)
        rows.append((hm.slide, x1, max(x2, x1 + 1), y1, max(y2, y1 + 1), c.mass, rank, c.source))
    log.debug("%s: %d box(es) (%s)", hm.slide, len(rows), cfg.method)
    return _frame(rows)


def _frame(rows: Iterable[tuple[object, ...]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=list(BOX_COLUMNS))
    return df.astype(
        {"x1": "int64", "x2": "int64", "y1": "int64", "y2": "int64", "score": "float64", "rank": "int64"}
    )


def slide_boxes(
    patches: pd.DataFrame,
    counts: Mapping[str, int] | None,
    cfg: BoxesConfig | None = None,
    *,
    stride_px: int | None = None,
    heatmaps: Mapping[str, Heatmap] | None = None,
) -> pd.DataFrame:
    """Boxes of many slides: N per slide from ``counts`` (slides not in it are skipped), or all
    components of every slide when ``counts`` is None. A slide in ``counts`` without patches gets no
    boxes and a warning. ``heatmaps`` (from :func:`~digilut.heatmap.build_heatmaps`) skips rebuilding.
    """
    cfg = cfg or BoxesConfig()
    hms = dict(heatmaps) if heatmaps is not None else build_heatmaps(patches, stride_px=stride_px)
    names = sorted(counts) if counts is not None else sorted(hms)
    parts = []
    for slide in names:
        if slide not in hms:
            log.warning("%s: no patches, so no boxes (expected %d)", slide, (counts or {}).get(slide, 0))
            continue
        parts.append(heatmap_to_boxes(hms[slide], None if counts is None else int(counts[slide]), cfg))
    skipped = sorted(set(hms) - set(names))
    if skipped:
        log.info(
            "%d slide(s) with patches but no expected count skipped: %s", len(skipped), ", ".join(skipped)
        )
    return pd.concat(parts, ignore_index=True) if parts else _frame([])


# --- tuning ----------------------------------------------------------------------------------

DEFAULT_GRID: dict[str, tuple[object, ...]] = {
    "high": (0.5, 0.65, 0.8),
    "low": (0.3, 0.5),
    "fit_miss_weight": (1.0, 2.0, 3.0),
}


@dataclass(frozen=True)
class TuneResult:
    """The best configuration, its mean F2 and the score of every configuration tried."""

    best: BoxesConfig
    best_f2: float
    table: pd.DataFrame  # one row per configuration: its grid values and mean_f2, best first


def tune_boxes(
    oof: pd.DataFrame,
    truth: pd.DataFrame,
    grid: Mapping[str, Sequence[object]] | None = None,
    *,
    base: BoxesConfig | None = None,
    stride_px: int | None = None,
) -> TuneResult:
    """Grid-search :class:`BoxesConfig` fields to maximise mean F2 on out-of-fold predictions.

    ``oof``: patches with ``prob`` (slides of any fold); ``truth``: ``filename,x1,x2,y1,y2``; N per
    slide is its number of truth boxes. ``grid`` maps field names to values (default
    :data:`DEFAULT_GRID`); combinations that are invalid (``low > high``) are skipped. Ties keep
    the earlier combination.
    """
    base = base or BoxesConfig()
    grid = dict(grid or DEFAULT_GRID)
    fields = set(asdict(base))
    unknown = sorted(set(grid) - fields)
    if unknown:
        raise ConfigError(
            f"tune grid names unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    counts = {str(k): int(v) for k, v in truth.groupby("filename").size().items()}
    hms = build_heatmaps(oof[oof["slide"].isin(counts)], stride_px=stride_px)
    missing = sorted(set(counts) - set(hms))
    if missing:
        log.warning("tune_boxes: %d slide(s) with truth boxes have no patches (score 0)", len(missing))
    keys = list(grid)
    rows, best, best_f2 = [], base, -1.0
    for values in itertools.product(*(grid[k] for k in keys)):
        try:
            cfg = replace(base, **dict(zip(keys, values, strict=True)))
        except ConfigError:
            continue
        parts = [heatmap_to_boxes(hm, counts[name], cfg) for name, hm in hms.items()]
        pred = pd.concat(parts, ignore_index=True) if parts else _frame([])
        f2 = score_slides(pred, truth, counts).mean_f2
        rows.append((*values, f2))
        if f2 > best_f2:
            best, best_f2 = cfg, f2
    if not rows:
        raise ConfigError(f"tune grid {grid} has no valid combination")
    table = pd.DataFrame(rows, columns=[*keys, "mean_f2"]).sort_values(
        "mean_f2", ascending=False, kind="stable"
    )
    log.info(
        "tune_boxes: best mean F2 %.4f of %d configurations: %s",
        best_f2,
        len(rows),
        dict(zip(keys, [getattr(best, k) for k in keys], strict=True)),
    )
    return TuneResult(best, best_f2, table.reset_index(drop=True))
