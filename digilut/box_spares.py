"""Spare boxes: when a slide has fewer candidates than the N boxes wanted.

First the halves of chosen boxes whose best straight cut in two explains more patches
(:func:`best_cut`, :func:`alternatives`: two touching lesions that made one component, with no dip
to split at); then squares centred on the next-best heatmap peaks outside the chosen boxes
(:func:`fill_candidates`), never ``(0,0,0,0)``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from digilut.box_candidates import BoxSettings, Candidate, fit_box, fit_window, mass, touching_patches
from digilut.boxfit import refine_boxes
from digilut.heatmap import Heatmap
from digilut.score import giou_matrix

log = logging.getLogger(__name__)
CUTS_REFINED = 64  # best_cut: the best cuts by profile fit that are refined against the patches


def _shifted(mask: np.ndarray, sl: tuple[slice, slice]) -> tuple[slice, slice]:
    """The bounding slices of ``mask`` (local to ``sl``) in the full image."""
    local = ndimage.find_objects(mask.astype(np.int32))[0]
    return (
        slice(local[0].start + sl[0].start, local[0].stop + sl[0].start),
        slice(local[1].start + sl[1].start, local[1].stop + sl[1].start),
    )


def best_cut(
    hm: Heatmap, parts: np.ndarray, label: int, box: tuple[float, float, float, float], cfg: BoxSettings
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
    win = fit_window(hm, box, explained, cfg)
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


def alternatives(
    hm: Heatmap, parts: np.ndarray, chosen: list[Candidate], k: int, cfg: BoxSettings
) -> list[Candidate]:
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
    out: list[Candidate] = []
    for gain, c, pair in alts:
        # With one spare box left, the half least like the whole box: the whole box may still hit
        # the larger lesion, the other half then finds the smaller one.
        pair = sorted(pair, key=lambda b: _giou(b, c.box))
        for b in pair[: k - len(out)]:
            out.append(Candidate(b, mass(hm, b), "alternative", c.part))
        log.debug("%s: box of part %d cut in two, gain %.1f patches", hm.slide, c.part, gain)
        if len(out) == k:
            break
    return out


def _inside_any(x: float, y: float, boxes: Sequence[tuple[float, float, float, float]]) -> bool:
    return any(b[0] <= x < b[1] and b[2] <= y < b[3] for b in boxes)


def fill_candidates(
    hm: Heatmap, chosen: list[tuple[float, float, float, float]], k: int, side_px: int
) -> list[Candidate]:
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
    out: list[Candidate] = []
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
        out.append(Candidate(box, mass(hm, box), "fill"))
        fills.append(box)
    while len(out) < k:  # only a heatmap without any tissue cell gets here
        x, y = (hm.extent_px[0] + hm.extent_px[1]) / 2, (hm.extent_px[2] + hm.extent_px[3]) / 2
        out.append(Candidate((x - half, x + half, y - half, y + half), 0.0, "fill"))
    return out
