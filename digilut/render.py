"""Heatmap pictures: a slide thumbnail with the heatmap overlaid, truth boxes green, predictions red.

One PNG per slide, readable at a glance: the title names the slide, N and (when known) F2; a colour
bar gives the probability scale; a legend counts the boxes. When the tissue and boxes occupy a
small part of the slide, a second panel zooms on them. Drawn with matplotlib's Agg canvas on a
private :class:`~matplotlib.figure.Figure` (no pyplot state, safe in threads and pods).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from digilut.errors import ConfigError
from digilut.files import atomic_write
from digilut.heatmap import Heatmap

log = logging.getLogger(__name__)

TRUTH_COLOUR = "#00c853"
PRED_COLOUR = "#ff1744"
CMAP = "inferno"
ZOOM_MAX_AREA_FRACTION = 0.25  # zoom panel when the region of interest is smaller than this


def _heatmap_rgba(hm: Heatmap) -> np.ndarray:
    """Colour from the probability; glass and probabilities under 5 % transparent, low ones faint."""
    prob = np.clip(hm.prob, 0.0, 1.0)
    rgba = colormaps[CMAP](prob)
    rgba[..., 3] = np.where((hm.count > 0) & (prob >= 0.05), 0.2 + 0.6 * prob, 0.0)
    return rgba


def _boxes(df: pd.DataFrame | None) -> np.ndarray:
    if df is None or len(df) == 0:
        return np.zeros((0, 4))
    return df[["x1", "x2", "y1", "y2"]].to_numpy(dtype=np.float64)


def _region(
    hm: Heatmap | None, boxes: np.ndarray, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Level-0 ``(x1, x2, y1, y2)`` around the tissue cells and all boxes, with a margin."""
    parts = [boxes]
    if hm is not None and (hm.count > 0).any():
        rows, cols = np.nonzero(hm.count > 0)
        parts.append(np.array([hm.cells_to_box(rows.min(), rows.max(), cols.min(), cols.max())], dtype=float))
    allb = np.concatenate([p for p in parts if len(p)]) if any(len(p) for p in parts) else None
    if allb is None:
        return (0.0, float(size[0]), 0.0, float(size[1]))
    x1, x2, y1, y2 = allb[:, 0].min(), allb[:, 1].max(), allb[:, 2].min(), allb[:, 3].max()
    pad = 0.05 * max(x2 - x1, y2 - y1, 1.0)
    return (max(x1 - pad, 0.0), min(x2 + pad, size[0]), max(y1 - pad, 0.0), min(y2 + pad, size[1]))


def _draw(
    ax: Axes,
    thumbnail: np.ndarray | None,
    size: tuple[int, int],
    hm: Heatmap | None,
    truth: np.ndarray,
    pred: np.ndarray,
    view: tuple[float, float, float, float],
    show_ranks: bool,
) -> None:
    w, h = size
    ax.set_facecolor("#f2f2f2")
    if thumbnail is not None:
        # a grey (H×W) thumbnail in grey levels, not matplotlib's default colour map
        grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if np.asarray(thumbnail).ndim == 2 else {}
        ax.imshow(thumbnail, extent=(0, w, h, 0), interpolation="bilinear", **grey)
    if hm is not None:
        x1, x2, y1, y2 = hm.extent_px
        ax.imshow(_heatmap_rgba(hm), extent=(x1, x2, y2, y1), interpolation="nearest")
    lw = 1.6
    for b in truth:
        ax.add_patch(Rectangle((b[0], b[2]), b[1] - b[0], b[3] - b[2], fill=False, ec=TRUTH_COLOUR, lw=lw))
    for i, b in enumerate(pred, start=1):
        ax.add_patch(
            Rectangle((b[0], b[2]), b[1] - b[0], b[3] - b[2], fill=False, ec=PRED_COLOUR, lw=lw, ls="--")
        )
        if show_ranks:
            ax.text(b[0], b[2], str(i), color=PRED_COLOUR, fontsize=7, va="bottom", ha="left")
    ax.set_xlim(view[0], view[1])
    ax.set_ylim(view[3], view[2])
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)


def render_heatmap_png(
    thumbnail: np.ndarray | None,
    level0_size: tuple[int, int],
    heatmap: Heatmap | None,
    truth: pd.DataFrame | None,
    pred: pd.DataFrame | None,
    path: str | Path,
    title: str | None = None,
    *,
    f2: float | None = None,
    n: int | None = None,
    dpi: int = 110,
) -> Path:
    """Write the picture of one slide to ``path`` (PNG) and return the path.

    ``thumbnail``: RGB (or grey) array of the whole slide, any size (``None``: plain background);
    ``level0_size``: the slide's level-0 ``(width, height)``; ``truth``/``pred``: boxes
    ``x1,x2,y1,y2`` in level-0 px (pred in rank order). ``title`` defaults to the slide name with N
    (``n``, else the number of truth boxes) and F2 when given.
    """
    width, height = int(level0_size[0]), int(level0_size[1])
    if width <= 0 or height <= 0:
        raise ConfigError(f"level0_size={level0_size} must be a positive (width, height) in level-0 px")
    if thumbnail is not None and np.asarray(thumbnail).ndim not in (2, 3):
        raise ConfigError(f"thumbnail has shape {np.asarray(thumbnail).shape}; need H×W or H×W×3")
    tb, pb = _boxes(truth), _boxes(pred)
    slide = heatmap.slide if heatmap is not None else None
    if slide is None:
        for df in (pred, truth):
            if df is not None and len(df) and "filename" in df.columns:
                slide = str(df["filename"].iloc[0])
                break
    n_show = n if n is not None else (len(tb) if truth is not None else len(pb))
    if title is None:
        title = f"{slide or 'slide'} — N={n_show}" + (f" — F2={f2:.3f}" if f2 is not None else "")
    full = (0.0, float(width), 0.0, float(height))
    zoom = _region(heatmap, np.concatenate([tb, pb]) if len(tb) + len(pb) else tb, (width, height))
    zoomed = (zoom[1] - zoom[0]) * (zoom[3] - zoom[2]) < ZOOM_MAX_AREA_FRACTION * width * height
    views = [full, zoom] if zoomed else [full]
    panel_h = 7.0
    widths = [float(np.clip(panel_h * (v[1] - v[0]) / max(v[3] - v[2], 1.0), 2.5, 11.0)) for v in views]
    fig = Figure(figsize=(sum(widths) + 1.4, panel_h + 1.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(views), width_ratios=widths, squeeze=False)[0]
    for ax, view, name in zip(axes, views, ("whole slide", "zoom on tissue and boxes"), strict=False):
        _draw(
            ax, thumbnail, (width, height), heatmap, tb, pb, view, show_ranks=view is not full or not zoomed
        )
        ax.set_title(name if zoomed else "level-0 px", fontsize=8)
    fig.suptitle(title, fontsize=11)
    handles = []
    if truth is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOUR, lw=2, label=f"truth ({len(tb)})"))
    if pred is not None:
        handles.append(Line2D([], [], color=PRED_COLOUR, lw=2, ls="--", label=f"predicted ({len(pb)})"))
    if handles:
        axes[-1].legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.85)
    if heatmap is not None:
        mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=CMAP)
        fig.colorbar(mappable, ax=list(axes), shrink=0.6, label="lesion probability")
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    atomic_write(path, [buf.getvalue()])
    log.debug("wrote %s (%s)", path, title)
    return path
