"""Boxes benchmark — the oracle check of heatmap → boxes → DigiLut score.

Lesions with the real DigiLut box sizes and per-slide counts (``bench/data/digilut_box_sizes.csv``:
the 927 training boxes of 251 slides, anonymised, sizes and nearest-neighbour gaps only) are placed
on a synthetic slide; a *perfect classifier* then gives each patch the label the labeller gives it:
1 when a truth box covers at least 10 % of the patch (intersection / patch area ≥ 0.1, the best box,
as :func:`digilut.labels.overlap_scores` does), else 0.
Patches tile the whole lesion region (all tissue) at

* stride 128 px at 20x = 256 level-0 px, patch 512 level-0 px (the pipeline's prediction grid),
* stride 256 px at 20x = 512 level-0 px, patch 512 level-0 px (non-overlapping tiles, contrast).

Two layouts: ``spread`` places the lesions of a slide at random at least 2048 px apart in a square
region ~40× their total area; ``real gaps`` puts each box whose real nearest neighbour is closer
than 2048 px at that gap beside another (12.5 % of real boxes lie within 512 px of another, 2 %
overlap one; the synthetic layout gets 16.8 % and 3 %, slightly more crowded), so neighbouring
lesions merge as they do on real slides.

Noise: 5 % of negative patches flipped to positive and 20 % of positive patches dropped.

Goals (overlapping grid, default hysteresis method, spread layout): mean F2 ≥ 0.93 without noise,
≥ 0.85 with noise; non-overlapping tiles are expected near 0.6.

Classifier-like heatmaps (:data:`CLASSIFIERS`, :func:`classifier_like`): the perfect labels of the
real-gap layout as an imperfect classifier scores them — background 0.3–0.6 per slide
(miscalibrated), lesions at 0.75–0.95 each with soft edges, lesion-sized false-positive blobs
(spatially correlated, not salt-and-pepper), per-patch noise. Goal: the box step within
:data:`REALISTIC_GOAL_GAP` of its perfect-label F2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from digilut.box_tuning import tune_boxes
from digilut.boxes import BoxesConfig, slide_boxes
from digilut.heatmap import build_heatmaps
from digilut.render import render_heatmap_png
from digilut.score import score_slides

SIZES_CSV = Path(__file__).parent / "data" / "digilut_box_sizes.csv"
LABEL_MIN_OVERLAP = 0.1  # the labeller's rule: a patch is positive from 10 % box cover
PATCH_PX = 512  # 256 px at 20x on a 0.25 µm/px slide
MARGIN_PX = 2048  # tissue around the lesion region
GOALS = {"clean": 0.93, "noisy": 0.85}


@dataclass(frozen=True)
class Grid:
    name: str
    stride_px: int
    patch_px: int = PATCH_PX


GRIDS = (Grid("overlap 128@20x", 256), Grid("tiles 256@20x", 512))


def load_sizes(path: Path = SIZES_CSV) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")


def _gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Chebyshev gap between two boxes (negative when they overlap)."""
    return max(max(a[0], b[0]) - min(a[1], b[1]), max(a[2], b[2]) - min(a[3], b[3]))


def _beside(
    anchor: tuple[int, int, int, int], w: int, h: int, g: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    x1, x2, y1, y2 = anchor
    side = int(rng.integers(4))
    if side < 2:  # left / right of the anchor, overlapping it vertically
        nx = x2 + g if side == 0 else x1 - g - w
        ny = int(rng.integers(y1 - h + 1, y2))
    else:  # above / below
        ny = y2 + g if side == 2 else y1 - g - h
        nx = int(rng.integers(x1 - w + 1, x2))
    return (nx, nx + w, ny, ny + h)


def place_slide(
    sizes: pd.DataFrame, layout: str, rng: np.random.Generator
) -> list[tuple[int, int, int, int]]:
    """Level-0 boxes ``(x1, x2, y1, y2)`` for one slide's real box sizes, placed per ``layout``.

    ``spread``: at random, ≥ 2048 px apart. ``real gaps``: a box whose real nearest neighbour is
    closer than 2048 px is put at exactly that gap beside an already placed box (preferring its
    mutual partner, the placed box with the same recorded gap) and no closer to any other; the rest
    at random, as far from the others as their real gap (up to 4096 px).
    """
    area = float((sizes["w_px"] * sizes["h_px"]).sum())
    side = int(max(8192.0, np.sqrt(40 * area)))
    boxes: list[tuple[int, int, int, int]] = []
    gaps: list[float] = []
    for w, h, gap in sizes[["w_px", "h_px", "gap_px"]].itertuples(index=False):
        w, h = int(w), int(h)
        gap = float(gap) if np.isfinite(gap) else np.inf
        placed = None
        if layout == "real gaps" and boxes and gap < 2048:
            partners = [j for j, gj in enumerate(gaps) if abs(gj - gap) <= 1]
            lonely = [
                j
                for j, b in enumerate(boxes)
                if min((_gap(b, o) for o in boxes if o is not b), default=np.inf) > gap
            ]
            pool = partners or lonely
            for _ in range(100 if pool else 0):
                j = pool[int(rng.integers(len(pool)))]
                cand = _beside(boxes[j], w, h, int(gap), rng)
                others = [o for k, o in enumerate(boxes) if k != j]
                if min(cand[0], cand[2]) >= MARGIN_PX and all(_gap(cand, o) >= gap for o in others):
                    placed = cand
                    break
        far = 2048.0 if layout == "spread" else min(gap, 4096.0)
        tries = 0
        while placed is None:
            tries += 1
            nx = MARGIN_PX + int(rng.integers(0, max(side - w, 1)))
            ny = MARGIN_PX + int(rng.integers(0, max(side - h, 1)))
            cand = (nx, nx + w, ny, ny + h)
            if all(_gap(cand, o) >= (far if tries < 1000 else 0) for o in boxes):
                placed = cand
        boxes.append(placed)
        gaps.append(gap)
    return boxes


def oracle_patches(
    slide: str, boxes: list[tuple[int, int, int, int]], grid: Grid, rng: np.random.Generator, noisy: bool
) -> pd.DataFrame:
    """Every patch of the region around ``boxes`` with the perfect classifier's probability."""
    b = np.asarray(boxes, dtype=np.int64)
    width, height = int(b[:, 1].max()) + MARGIN_PX, int(b[:, 3].max()) + MARGIN_PX
    xs = np.arange(0, width - grid.patch_px + 1, grid.stride_px)
    ys = np.arange(0, height - grid.patch_px + 1, grid.stride_px)
    x0, y0 = (a.ravel() for a in np.meshgrid(xs, ys))
    p = grid.patch_px
    iw = np.clip(np.minimum(x0[:, None] + p, b[None, :, 1]) - np.maximum(x0[:, None], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(y0[:, None] + p, b[None, :, 3]) - np.maximum(y0[:, None], b[None, :, 2]), 0, None)
    cover = (iw * ih).max(axis=1) / (p * p)  # the labeller's rule: the best single box
    prob = (cover >= LABEL_MIN_OVERLAP).astype(np.float64)
    if noisy:
        flip = (prob == 0) & (rng.random(len(prob)) < 0.05)
        drop = (prob == 1) & (rng.random(len(prob)) < 0.20)
        prob[flip], prob[drop] = 1.0, 0.0
    n = len(x0)
    return pd.DataFrame(
        {"slide": slide, "x0": x0, "y0": y0, "w0": np.full(n, p), "h0": np.full(n, p), "prob": prob}
    )


def synth_case(
    layout: str, grid: Grid, noisy: bool, seed: int = 0, slides: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(patches of every slide — or the first ``slides`` — and truth boxes) for one layout × grid ×
    noise; the same lesions per seed."""
    sizes = load_sizes()
    patches, truth = [], []
    groups = list(sizes.groupby("slide", sort=True))[:slides]
    for k, (slide_idx, group) in enumerate(groups):
        name = f"oracle{slide_idx:03d}_a.tif"
        boxes = place_slide(group, layout, np.random.default_rng([seed, k]))
        truth += [(name, *bx) for bx in boxes]
        patches.append(oracle_patches(name, boxes, grid, np.random.default_rng([seed, k, 1]), noisy))
    return pd.concat(patches, ignore_index=True), pd.DataFrame(
        truth, columns=["filename", "x1", "x2", "y1", "y2"]
    )


def evaluate(patches: pd.DataFrame, truth: pd.DataFrame, cfg: BoxesConfig) -> dict[str, float]:
    counts = {str(k): int(v) for k, v in truth.groupby("filename").size().items()}
    pred = slide_boxes(patches, counts, cfg)
    strict = score_slides(pred, truth, counts)
    lenient = score_slides(pred, truth, counts, lenient=True)
    t = strict.slides
    return {
        "mean_f2": strict.mean_f2,
        "lenient_f2": lenient.mean_f2,
        "recall": float(t["tp"].sum() / t["n_truth"].sum()),
        "perfect_slides": float((t["f2"] == 1.0).mean()),
    }


def miss_reasons(patches: pd.DataFrame, truth: pd.DataFrame, pred: pd.DataFrame) -> pd.DataFrame:
    """Why each truth box was not hit (GIoU > 0.5, one-to-one): one row per missed box.

    ``patches``: ``slide,x0,y0,w0,h0,prob`` (the heatmap's input); ``pred``/``truth``:
    ``filename,x1,x2,y1,y2``. ``reason``, the first that applies:

    * ``no patch`` — no patch covers the box (no tissue there);
    * ``no positive patch`` — no patch with prob ≥ 0.5 touches it;
    * ``merged`` — the prediction overlapping it most also overlaps another truth box;
    * ``not chosen`` — no prediction overlaps it (lost to the ranking or absorbed elsewhere);
    * ``taken`` — its best prediction (GIoU > 0.5) went to another truth box in the matching;
    * ``too large`` / ``too small`` — the best prediction's area is > 1.5× / < 1/1.5× the box's;
    * ``offset`` — about the right size, in the wrong place (edges off).

    Also: ``side_px`` (√area), ``gap_px`` (Chebyshev gap to the nearest other truth box of the
    slide), ``best_giou``, ``area_ratio`` (best prediction / truth).
    """
    from scipy.optimize import linear_sum_assignment

    from digilut.score import GIOU_THRESHOLD, giou_matrix

    rows = []
    cols = ["x1", "x2", "y1", "y2"]
    for slide, t in truth.groupby("filename", sort=True):
        tb = t[cols].to_numpy(np.float64)
        pb = pred.loc[pred["filename"] == slide, cols].to_numpy(np.float64)
        pp = patches[patches["slide"] == slide]
        g = giou_matrix(pb, tb) if len(pb) else np.zeros((0, len(tb)))
        hit = g > GIOU_THRESHOLD
        matched = set()
        if len(pb):
            r, c = linear_sum_assignment(hit.astype(float), maximize=True)
            matched = {int(j) for i, j in zip(r, c, strict=True) if hit[i, j]}
        px1, py1 = pp["x0"].to_numpy(), pp["y0"].to_numpy()
        px2, py2 = px1 + pp["w0"].to_numpy(), py1 + pp["h0"].to_numpy()
        for j, b in enumerate(tb):
            if j in matched:
                continue
            others = [_gap(tuple(b), tuple(o)) for k, o in enumerate(tb) if k != j]
            touch = (px1 < b[1]) & (px2 > b[0]) & (py1 < b[3]) & (py2 > b[2])
            area = (b[1] - b[0]) * (b[3] - b[2])
            best, ratio, reason = -1.0, float("nan"), ""
            if len(pb):
                i = int(np.argmax(g[:, j]))
                best = float(g[i, j])
                ratio = float((pb[i, 1] - pb[i, 0]) * (pb[i, 3] - pb[i, 2]) / area)
                iw = np.clip(np.minimum(pb[:, 1:2], tb[:, 1]) - np.maximum(pb[:, 0:1], tb[:, 0]), 0, None)
                ih = np.clip(np.minimum(pb[:, 3:4], tb[:, 3]) - np.maximum(pb[:, 2:3], tb[:, 2]), 0, None)
                inter = iw * ih
                k = int(np.argmax(inter[:, j]))
            if not touch.any():
                reason = "no patch"
            elif not (pp["prob"].to_numpy()[touch] >= 0.5).any():
                reason = "no positive patch"
            elif not len(pb) or inter[k, j] <= 0:
                reason = "not chosen"
            elif (inter[k] > 0).sum() > 1:
                reason = "merged"
            elif best > GIOU_THRESHOLD:
                reason = "taken"
            elif ratio > 1.5:
                reason = "too large"
            elif ratio < 1 / 1.5:
                reason = "too small"
            else:
                reason = "offset"
            rows.append(
                (slide, *b.astype(int), np.sqrt(area), min(others, default=np.inf), best, ratio, reason)
            )
    return pd.DataFrame(
        rows,
        columns=["filename", *cols, "side_px", "gap_px", "best_giou", "area_ratio", "reason"],
    )


@dataclass(frozen=True)
class Classifier:
    """How an imperfect classifier's patch probabilities differ from the perfect labels.

    ``background``: range of a slide's normal-tissue level (one value per slide); ``peak``: range of
    a lesion's level (one value per lesion, so weak lesions exist); ``soft_cells``: Gaussian blur of
    the lesion signal in grid steps (soft edges); ``blobs_per_mpx``: false-positive blobs per million
    level-0 px² (lesion-sized, spatially correlated, 0.3–0.7 × as bright as a lesion); ``noise``: sd of
    the independent per-patch noise.
    """

    name: str
    background: tuple[float, float] = (0.0, 0.0)
    peak: tuple[float, float] = (1.0, 1.0)
    soft_cells: float = 0.0
    blobs_per_mpx: float = 0.0
    noise: float = 0.0


CLASSIFIERS = (
    Classifier("perfect labels"),
    Classifier("miscalibrated", background=(0.3, 0.6), peak=(0.75, 0.95), soft_cells=1.0, noise=0.05),
    Classifier("correlated FP blobs", background=(0.02, 0.1), peak=(0.75, 0.95), soft_cells=1.0,
               blobs_per_mpx=0.03, noise=0.05),
    Classifier("miscalibrated + blobs", background=(0.3, 0.6), peak=(0.75, 0.95), soft_cells=1.0,
               blobs_per_mpx=0.03, noise=0.05),
)  # fmt: skip


def classifier_like(patches: pd.DataFrame, clf: Classifier, rng: np.random.Generator) -> pd.DataFrame:
    """``patches`` (one slide's perfect-label ``prob`` on a regular grid) as ``clf`` would score them.

    Lesions are the connected positive areas of the perfect labels, each scaled to its own peak;
    the signal is blurred (soft edges) and rides on the slide's background; false-positive blobs are
    smoothed random lesion-sized bumps placed anywhere; then independent noise, clipped to [0, 1].
    """
    if clf == Classifier(clf.name):
        return patches
    x0, y0 = patches["x0"].to_numpy(), patches["y0"].to_numpy()
    stride = int(np.gcd.reduce(np.diff(np.unique(np.concatenate([x0, y0])))))
    c, r = (x0 - x0.min()) // stride, (y0 - y0.min()) // stride
    grid = np.zeros((int(r.max()) + 1, int(c.max()) + 1))
    grid[r, c] = patches["prob"].to_numpy()
    lesions, n = ndimage.label(grid > 0.5)
    peaks = rng.uniform(*clf.peak, n + 1)
    peaks[0] = 0.0
    signal = peaks[lesions]
    if clf.soft_cells > 0:
        signal = ndimage.gaussian_filter(signal, clf.soft_cells)
    area_mpx = grid.size * stride**2 / 1e6
    blobs = np.zeros_like(grid)
    for _ in range(int(rng.poisson(clf.blobs_per_mpx * area_mpx))):
        side = float(np.clip(rng.lognormal(np.log(943), 0.475), 250, 3500)) / stride  # lesion-sized
        cy, cx = rng.uniform(0, grid.shape[0]), rng.uniform(0, grid.shape[1])
        yy, xx = np.ogrid[: grid.shape[0], : grid.shape[1]]
        bump = np.exp(-(((yy - cy) / (side / 2)) ** 2 + ((xx - cx) / (side / 2)) ** 2))
        blobs = np.maximum(blobs, bump * rng.uniform(0.3, 0.7) * np.mean(clf.peak))
    background = rng.uniform(*clf.background)
    prob = background + (1 - background) * np.maximum(signal, blobs)
    prob = prob + rng.normal(0, clf.noise, grid.shape) if clf.noise else prob
    out = patches.copy()
    out["prob"] = np.clip(prob[r, c], 0.0, 1.0)
    return out


def realistic_case(clf: Classifier, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(patches, truth) of the real-gap layout on the overlapping grid, scored by ``clf``."""
    patches, truth = synth_case("real gaps", GRIDS[0], False, seed=seed)
    parts = [
        classifier_like(g, clf, np.random.default_rng([seed, k, 7]))
        for k, (_, g) in enumerate(patches.groupby("slide", sort=True))
    ]
    return pd.concat(parts, ignore_index=True), truth


METHODS = {
    "hysteresis+fit": BoxesConfig(),
    "hysteresis grid": BoxesConfig(fit="grid"),
    "dbscan": BoxesConfig(method="dbscan", high=0.5, fit="grid"),
    "fuse": BoxesConfig(method="fuse", high=0.5, fit="grid"),
}
TUNE_GRID = {"high": (0.3, 0.45, 0.6, 0.75), "low": (0.15, 0.3), "fit_miss_weight": (1.0, 2.0, 3.0)}


def main(out: Path) -> None:
    from bench import quick, write_table

    out.mkdir(parents=True, exist_ok=True)
    # quick: 6 slides, one layout and grid, one tuning point
    slides = 6 if quick() else None
    layouts, grids = (("real gaps",), GRIDS[:1]) if quick() else (("spread", "real gaps"), GRIDS)
    tune_grid = {"high": (0.6,)} if quick() else TUNE_GRID
    rows = []
    for layout in layouts:
        for grid in grids:
            for noisy in (False, True):
                patches, truth = synth_case(layout, grid, noisy, slides=slides)
                for mname, cfg in METHODS.items():
                    t0 = time.perf_counter()
                    res = evaluate(patches, truth, cfg)
                    rows.append(
                        {
                            "layout": layout,
                            "grid": grid.name,
                            "noise": "5%+/20%-" if noisy else "none",
                            "method": mname,
                            **res,
                            "s": time.perf_counter() - t0,
                        }
                    )
                if grid is GRIDS[0]:
                    _figures(
                        out,
                        patches,
                        truth,
                        METHODS["hysteresis+fit"],
                        f"{layout.replace(' ', '_')}_{'noisy' if noisy else 'clean'}",
                    )
    table = pd.DataFrame(rows)
    table.to_csv(out / "boxes_bench.csv", index=False)
    pd.set_option("display.width", 200)
    sizes = load_sizes()
    n_slides = sizes["slide"].nunique() if slides is None else min(slides, sizes["slide"].nunique())
    lines = [
        f"real box sizes of {n_slides} slides; "
        f"perfect classifier = patch positive when boxes cover ≥ {LABEL_MIN_OVERLAP:.0%} of it",
        table.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
    ]

    # Tuning as on out-of-fold predictions: an under-confident classifier (noisy probabilities × 0.6,
    # so the default seed threshold 0.75 is never reached); tune on even slides, score the odd ones.
    patches, truth = synth_case("real gaps", GRIDS[0], True, seed=1, slides=slides)
    patches["prob"] *= 0.6
    names = sorted(truth["filename"].unique())
    a, b = set(names[::2]), set(names[1::2])
    t0 = time.perf_counter()
    tuned = tune_boxes(patches[patches["slide"].isin(a)], truth[truth["filename"].isin(a)], tune_grid)
    held_p, held_t = patches[patches["slide"].isin(b)], truth[truth["filename"].isin(b)]
    held, base = evaluate(held_p, held_t, tuned.best), evaluate(held_p, held_t, BoxesConfig())
    best = tuned.best
    lines.append(
        f"\ntune_boxes ({len(tuned.table)} configurations, {time.perf_counter() - t0:.0f}s) on {len(a)} "
        f"noisy real-gap slides with probabilities × 0.6 (seed 1): high={best.high} low={best.low} "
        f"fit_miss_weight={best.fit_miss_weight}, tuning F2 {tuned.best_f2:.3f}; "
        f"on the other {len(b)}: {held['mean_f2']:.3f} (defaults {base['mean_f2']:.3f})"
    )
    _print_realistic(realistic_table(slides))
    key = table[(table["grid"] == GRIDS[0].name) & (table["method"] == "hysteresis+fit")]
    key = key[key["layout"] == layouts[0]]
    for noise, goal_name in (("none", "clean"), ("5%+/20%-", "noisy")):
        got = float(key.loc[key["noise"] == noise, "mean_f2"].iloc[0])
        verdict = "PASS" if got >= GOALS[goal_name] else "FAIL"
        where = f"{layouts[0]}, {GRIDS[0].name}, defaults"
        lines.append(f"goal {goal_name} ({where}): mean F2 {got:.3f} ≥ {GOALS[goal_name]} → {verdict}")
    write_table(out, "\n".join(lines))


REALISTIC_GOAL_GAP = 0.10  # the box step on a classifier-like heatmap: within this of the perfect-label F2


# The box step's settings compared on classifier-like heatmaps: thresholds absolute, relative to the
# slide or to a local window; and relative to the slide with the size prior from the real box sizes,
# fitted fill boxes and miss weight 1 (soft edges: a rim patch at 0.35 no longer pays for growth).
REALISTIC_CONFIGS = {
    "none": BoxesConfig(background="none"),
    "slide": BoxesConfig(background="slide"),
    "local": BoxesConfig(background="local"),
    "slide+prior": BoxesConfig(fit_fills=True, size_prior_weight=1.0, fit_miss_weight=1.0),
}


def realistic_table(slides: int | None = None) -> pd.DataFrame:
    """Mean F2 of the box step (each of :data:`REALISTIC_CONFIGS`) on each :data:`CLASSIFIERS`
    heatmap of the real-gap layout, the first ``slides`` slides (all:
    None), next to the perfect-label bound."""
    rows = []
    for clf in CLASSIFIERS:
        patches, truth = realistic_case(clf)
        if slides is not None:
            names = sorted(truth["filename"].unique())[:slides]
            patches, truth = patches[patches["slide"].isin(names)], truth[truth["filename"].isin(names)]
        for background, cfg in REALISTIC_CONFIGS.items():
            t0 = time.perf_counter()
            res = evaluate(patches, truth, cfg)
            rows.append(
                {"classifier": clf.name, "background": background, **res, "s": time.perf_counter() - t0}
            )
    return pd.DataFrame(rows)


def _print_realistic(table: pd.DataFrame) -> None:
    print("\nclassifier-like heatmaps (real gaps, overlap grid; settings: REALISTIC_CONFIGS):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    bound = float(table.loc[table["classifier"] == "perfect labels", "mean_f2"].max())
    for name in ("miscalibrated", "correlated FP blobs", "miscalibrated + blobs"):
        for setting in ("slide", "slide+prior"):
            got = float(
                table.loc[(table["classifier"] == name) & (table["background"] == setting), "mean_f2"].iloc[0]
            )
            verdict = "PASS" if bound - got <= REALISTIC_GOAL_GAP else "FAIL"
            print(
                f"goal {name} ({setting}): F2 {got:.3f} within {REALISTIC_GOAL_GAP} of perfect labels "
                f"{bound:.3f} → {verdict}"
            )


def _figures(out: Path, patches: pd.DataFrame, truth: pd.DataFrame, cfg: BoxesConfig, tag: str) -> None:
    """A few example slides as the report pictures show them."""
    names = sorted(truth["filename"].unique())
    by_count = truth.groupby("filename").size()
    threes = [str(n) for n in by_count[by_count == 3].index[:1]]
    picks = list(dict.fromkeys([names[0], str(by_count.idxmax()), *threes]))
    sub = patches[patches["slide"].isin(picks)]
    hms = build_heatmaps(sub)
    counts = {n: int(by_count[n]) for n in picks}
    pred = slide_boxes(sub, counts, cfg, heatmaps=hms)
    scores = score_slides(pred, truth[truth["filename"].isin(picks)], counts).slides.set_index("slide")
    for name in picks:
        hm = hms[name]
        _, x2, _, y2 = hm.extent_px
        render_heatmap_png(
            None,
            (x2, y2),
            hm,
            truth[truth["filename"] == name],
            pred[pred["filename"] == name],
            out / f"{tag}_{name.removesuffix('.tif')}.png",
            f2=float(scores.loc[name, "f2"]),
        )
