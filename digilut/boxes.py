"""Heatmap → exactly N boxes per slide: the settings (:class:`BoxesConfig`) and the choice of N boxes.

Methods (:class:`BoxesConfig` ``method``):

``hysteresis`` (default)
    Cells ≥ ``high`` seed components that grow through cells ≥ ``low`` (8-connected,
    :func:`scipy.ndimage.label`). A box is fitted to the cells a component covers — not to the full
    extents of its patches, which overshoot a lesion by up to a patch — through row and column
    profiles (:func:`~digilut.box_candidates.fit_box`: a stray rim cell does not move an edge by a
    whole cell). A component
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
(:func:`~digilut.box_spares.best_cut`: two touching lesions that made one component, with no dip
to split at; the whole box stays, so a single lesion is still hit). The rest are filled with ``fill_side_px``
squares centred on the next-best heatmap peaks outside the chosen boxes (then on the best
remaining tissue cells) — never with ``(0,0,0,0)``.

Finding candidates is :mod:`digilut.box_candidates`, spare boxes :mod:`digilut.box_spares`, tuning
the settings on out-of-fold predictions :mod:`digilut.box_tuning`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import pandas as pd

from digilut.box_candidates import (
    dbscan_candidates,
    fuse_candidates,
    hysteresis_candidates,
    refined_box,
    relative_heatmap,
    touching_patches,
)
from digilut.box_spares import alternatives, fill_candidates
from digilut.errors import ConfigError
from digilut.heatmap import Heatmap, build_heatmaps

log = logging.getLogger(__name__)

Method = Literal["hysteresis", "dbscan", "fuse"]
Background = Literal["none", "slide", "local"]
BACKGROUNDS: tuple[str, ...] = ("none", "slide", "local")
Fit = Literal["model", "grid"]
METHODS: tuple[str, ...] = ("hysteresis", "dbscan", "fuse")
BOX_COLUMNS = ("filename", "x1", "x2", "y1", "y2", "score", "rank", "source")
# Median real DigiLut box side (√area, level-0 px, 927 training boxes): the size of a fill box.
MEDIAN_LESION_SIDE_PX = 943


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
    margin_fraction: float = 0.0  # added to every side: this share of the box's side (loose hand-drawn boxes)
    profile_fraction: float = 0.6  # hysteresis: box edges where row/column mass reaches this × max
    fit: Fit = "model"  # model: edges refined against the patch labels (boxfit); grid: as found
    label_min_overlap: float = 0.1  # the labeller's rule: positive from this share of box cover
    fit_miss_weight: float = 2.0  # model fit: cost of a positive patch left outside vs a negative inside
    split_min_area_px2: float = 1.0e6  # hysteresis: only components larger than this are split
    split_saddle_ratio: float = 0.85  # hysteresis: peaks are separate below this dip; 0 never splits
    split_min_gain: float = 8.0  # hysteresis + model fit: a split must explain this many more patches
    alt_min_gain: float = 1.0  # hysteresis + model fit: spare boxes split a chosen box when that gains this
    hit_max_side_px: float = 1500.0  # model fit: boxes up to this √area move to their likeliest hit; 0: off
    fit_fills: bool = False  # model fit: fill boxes are fitted to the patches around their peak too
    size_prior_weight: float = 0.0  # model fit: cost (patches) of a box per squared log-sd off the real sizes
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
        if not -0.25 <= self.margin_fraction <= 1.0:
            raise ConfigError(
                f"margin_fraction={self.margin_fraction} must be in [-0.25, 1] (share of the side)"
            )
        if self.size_prior_weight < 0:
            raise ConfigError(
                f"size_prior_weight={self.size_prior_weight} must be ≥ 0 patches (0 = no prior)"
            )
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
        parts, cands = hysteresis_candidates(hm, cfg)
    else:
        cands = (dbscan_candidates if cfg.method == "dbscan" else fuse_candidates)(hm, cfg)
    cands = [c for c in cands if (c.box[1] - c.box[0]) * (c.box[3] - c.box[2]) >= cfg.min_area_px2]
    cands.sort(key=lambda c: -c.mass)
    if n is not None:
        cands = cands[:n]
    if cfg.fit == "model":
        cands = [
            replace(
                c,
                box=refined_box(
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
        cands += alternatives(hm, parts, cands, n - len(cands), cfg)
    cands = [replace(c, box=_with_margin(c.box, cfg)) for c in cands]
    if n is not None and len(cands) < n:
        fills = fill_candidates(hm, [c.box for c in cands], n - len(cands), cfg.fill_side_px)
        if cfg.fit == "model" and cfg.fit_fills:
            fills = [
                replace(c, box=refined_box(hm, c.box, None, cfg, hit=True)) if c.mass > 0 else c
                for c in fills
            ]
        cands += fills
    rows = []
    for rank, c in enumerate(cands, start=1):
        x1, x2, y1, y2 = (round(v) for v in c.box)
        x1, y1 = max(x1, 0), max(y1, 0)
        rows.append((hm.slide, x1, max(x2, x1 + 1), y1, max(y2, y1 + 1), c.mass, rank, c.source))
    log.debug("%s: %d box(es) (%s)", hm.slide, len(rows), cfg.method)
    return boxes_frame(rows)


def _with_margin(
    box: tuple[float, float, float, float], cfg: BoxesConfig
) -> tuple[float, float, float, float]:
    """``box`` grown on every side by ``margin_px`` plus ``margin_fraction`` of its width (height)."""
    mx = cfg.margin_px + cfg.margin_fraction * (box[1] - box[0])
    my = cfg.margin_px + cfg.margin_fraction * (box[3] - box[2])
    return (box[0] - mx, box[1] + mx, box[2] - my, box[3] + my)


def boxes_frame(rows: Iterable[tuple[object, ...]]) -> pd.DataFrame:
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
    return pd.concat(parts, ignore_index=True) if parts else boxes_frame([])
