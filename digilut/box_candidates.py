"""Box candidates on a slide's heatmap: components of high probability and the box fitted to each.

:func:`relative_heatmap` rescales probabilities against the slide's background; then one of three
methods finds candidates: :func:`hysteresis_candidates` (components seeded at ``high``, grown through
``low``, split at separate peaks, :func:`fit_box` through row and column profiles),
:func:`dbscan_candidates` and :func:`fuse_candidates` (the original write-up's methods, boxes the
union of patch extents). :func:`refined_box` moves a box's edges to best explain the patch
probabilities (:mod:`digilut.boxfit`). :mod:`digilut.boxes` chooses N of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from scipy import ndimage

from digilut.boxfit import PatchWindow, likeliest_hit, patch_window, refine_box
from digilut.heatmap import Heatmap

log = logging.getLogger(__name__)
_EIGHT = np.ones((3, 3), dtype=bool)


class BoxSettings(Protocol):
    """The :class:`~digilut.boxes.BoxesConfig` fields that finding, splitting and refining boxes read."""

    @property
    def high(self) -> float: ...
    @property
    def low(self) -> float: ...
    @property
    def profile_fraction(self) -> float: ...
    @property
    def fit(self) -> str: ...
    @property
    def label_min_overlap(self) -> float: ...
    @property
    def fit_miss_weight(self) -> float: ...
    @property
    def split_min_area_px2(self) -> float: ...
    @property
    def split_saddle_ratio(self) -> float: ...
    @property
    def split_min_gain(self) -> float: ...
    @property
    def alt_min_gain(self) -> float: ...
    @property
    def hit_max_side_px(self) -> float: ...
    @property
    def size_prior_weight(self) -> float: ...
    @property
    def dbscan_eps_cells(self) -> float: ...
    @property
    def dbscan_min_samples(self) -> int: ...
    @property
    def fuse_min_neighbours(self) -> int: ...


@dataclass(frozen=True)
class Candidate:
    """A box found on a heatmap, with its probability mass and where it came from."""

    box: tuple[float, float, float, float]  # x1, x2, y1, y2
    mass: float
    source: str  # component | split | fill
    part: int = 0  # label in the hysteresis part image (0: none)


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


def fit_window(
    hm: Heatmap, box: tuple[float, float, float, float], explained: np.ndarray | None, cfg: BoxSettings
) -> PatchWindow:
    """The patches around ``box`` for the model fit, with ``cfg``'s miss weight and size prior."""
    return patch_window(
        hm,
        box,
        cfg.label_min_overlap,
        miss_weight=cfg.fit_miss_weight,
        explained=explained,
        prior_weight=cfg.size_prior_weight,
    )


def refined_box(
    hm: Heatmap,
    box: tuple[float, float, float, float],
    explained: np.ndarray | None,
    cfg: BoxSettings,
    *,
    hit: bool = False,
) -> tuple[float, float, float, float]:
    win = fit_window(hm, box, explained, cfg)
    box = refine_box(win, box)
    if hit and (box[1] - box[0]) * (box[3] - box[2]) <= cfg.hit_max_side_px**2:
        box = likeliest_hit(win, box)
    return box


def _split_pays(
    hm: Heatmap, labels: np.ndarray, i: int, sl: tuple[slice, slice], split: np.ndarray, cfg: BoxSettings
) -> bool:
    """Do one box per part explain the component's patches better than one box, by split_min_gain?"""
    others = (labels != 0) & (labels != i)
    explained = touching_patches(hm, others)
    parts = np.where(others, -1, 0).astype(np.int32)
    parts[sl] = np.where(labels[sl] == i, split, parts[sl])
    whole = np.where(parts > 0, 1, parts)
    single = fit_box(hm, whole, 1, cfg.profile_fraction, sl)
    win = fit_window(hm, single, explained, cfg)
    single = refine_box(win, single)
    boxes = []
    for j in range(1, int(split.max()) + 1):
        b = fit_box(hm, parts, j, cfg.profile_fraction)
        boxes.append(refined_box(hm, b, explained | touching_patches(hm, (parts > 0) & (parts != j)), cfg))
    loss = win.loss([single])
    gain = loss - win.loss(boxes)
    ok = gain >= cfg.split_min_gain
    log.debug("%s: split into %d: gain %.1f of loss %.1f patches → %s", hm.slide, len(boxes), gain, loss, ok)
    return ok


def hysteresis_candidates(hm: Heatmap, cfg: BoxSettings) -> tuple[np.ndarray, list[Candidate]]:
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
        Candidate(fit_box(hm, parts, j, cfg.profile_fraction, where[j - 1]), float(masses[j - 1]), source, j)
        for j, source in zip(index.tolist(), sources, strict=True)
    ]
    return parts, cands


def _patch_box(hm: Heatmap, rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int]:
    kr, kc = hm.patch_cells
    return hm.cells_to_box(
        int(rows.min()), int(rows.max()) + kr - 1, int(cols.min()), int(cols.max()) + kc - 1
    )


def mass(hm: Heatmap, box: tuple[float, float, float, float]) -> float:
    s = hm.stride_px
    c1, c2 = int(np.floor((box[0] - hm.x_px) / s)), int(np.ceil((box[1] - hm.x_px) / s))
    r1, r2 = int(np.floor((box[2] - hm.y_px) / s)), int(np.ceil((box[3] - hm.y_px) / s))
    return float(hm.prob[max(r1, 0) : max(r2, 0), max(c1, 0) : max(c2, 0)].sum())


def dbscan_candidates(hm: Heatmap, cfg: BoxSettings) -> list[Candidate]:
    from sklearn.cluster import DBSCAN  # heavy import, only for this method

    pos = np.argwhere(np.nan_to_num(hm.patch_prob, nan=-1.0) >= cfg.high)
    if len(pos) == 0:
        return []
    found = DBSCAN(eps=cfg.dbscan_eps_cells, min_samples=cfg.dbscan_min_samples).fit_predict(pos)
    out = []
    for k in sorted(set(found.tolist()) - {-1}):
        member = pos[found == k]
        box = _patch_box(hm, member[:, 0], member[:, 1])
        out.append(Candidate(box, mass(hm, box), "component"))
    return out


def fuse_candidates(hm: Heatmap, cfg: BoxSettings) -> list[Candidate]:
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
        out.append(Candidate(box, mass(hm, box), "component"))
    return out
