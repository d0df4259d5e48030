"""The DigiLut score: mean over slides of the per-slide F2 of the predicted boxes.

A predicted box is a true positive when its generalised IoU (GIoU) with a ground-truth box of the
same slide is **> 0.5**. Matching is one-to-one (a maximum matching on the GIoU > 0.5 pairs, by
:func:`scipy.optimize.linear_sum_assignment`): two predictions on the same lesion count once, the
second is a false positive. Per slide ``F2 = 5·TP / (5·TP + 4·FN + FP)``, 0 when there is no TP.

* A slide with truth boxes and no prediction scores 0 (all its boxes are false negatives).
* Padding boxes ``(0,0,0,0)`` are ordinary misses (false positives).
* A slide without truth boxes (only in the predictions or the test list) is left out of the mean;
  :class:`ScoreResult` lists it in ``left_out``.

``lenient=True`` is the original write-up's scorer: precision is the share of predictions that hit
*any* truth box and recall the share of truth boxes hit by *any* prediction, so duplicates on one
lesion all count as hits; ``F2 = 5·P·R / (4·P + R)``.

Box columns everywhere: ``x1,x2`` = xmin,xmax and ``y1,y2`` = ymin,ymax, level-0 pixels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from digilut.annotations import BOX_COLUMNS, read_boxes_csv
from digilut.errors import AnnotationError

log = logging.getLogger(__name__)

GIOU_THRESHOLD = 0.5
COORDS = ("x1", "x2", "y1", "y2")
SLIDE_TABLE_COLUMNS = ("slide", "n_truth", "n_pred", "n_expected", "tp", "fp", "fn", "f2")


def giou_matrix(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Generalised IoU of every pair: ``pred`` (P, 4) × ``truth`` (T, 4) → (P, T).

    Boxes are rows ``(x1, x2, y1, y2)``. Degenerate boxes (zero width or height, such as the
    ``(0,0,0,0)`` padding) have IoU 0 and a GIoU ≤ 0 with any real box.
    """
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 4)[:, None, :]
    t = np.asarray(truth, dtype=np.float64).reshape(-1, 4)[None, :, :]
    area_p = np.clip(p[..., 1] - p[..., 0], 0, None) * np.clip(p[..., 3] - p[..., 2], 0, None)
    area_t = np.clip(t[..., 1] - t[..., 0], 0, None) * np.clip(t[..., 3] - t[..., 2], 0, None)
    iw = np.clip(np.minimum(p[..., 1], t[..., 1]) - np.maximum(p[..., 0], t[..., 0]), 0, None)
    ih = np.clip(np.minimum(p[..., 3], t[..., 3]) - np.maximum(p[..., 2], t[..., 2]), 0, None)
    inter = iw * ih
    union = area_p + area_t - inter
    hull = (np.maximum(p[..., 1], t[..., 1]) - np.minimum(p[..., 0], t[..., 0])) * (
        np.maximum(p[..., 3], t[..., 3]) - np.minimum(p[..., 2], t[..., 2])
    )
    tiny = np.finfo(np.float64).tiny
    iou = np.where(union > 0, inter / np.maximum(union, tiny), 0.0)
    return iou - np.where(hull > 0, (hull - union) / np.maximum(hull, tiny), 0.0)


def f2_score(tp: int, fp: int, fn: int) -> float:
    """``5·TP / (5·TP + 4·FN + FP)``; 0 when TP is 0."""
    return 0.0 if tp == 0 else 5.0 * tp / (5.0 * tp + 4.0 * fn + fp)


def match_slide(pred: np.ndarray, truth: np.ndarray, *, lenient: bool = False) -> tuple[int, int, int, float]:
    """``(tp, fp, fn, f2)`` of one slide's predicted boxes against its truth boxes (rows x1,x2,y1,y2)."""
    n_pred, n_truth = len(pred), len(truth)
    if n_pred == 0 or n_truth == 0:
        return 0, n_pred, n_truth, 0.0
    hit = giou_matrix(pred, truth) > GIOU_THRESHOLD
    if lenient:
        tp, hit_truth = int(hit.any(axis=1).sum()), int(hit.any(axis=0).sum())
        precision, recall = tp / n_pred, hit_truth / n_truth
        f2 = 0.0 if tp == 0 else 5 * precision * recall / (4 * precision + recall)
        return tp, n_pred - tp, n_truth - hit_truth, f2
    rows, cols = linear_sum_assignment(hit.astype(np.float64), maximize=True)
    tp = int(hit[rows, cols].sum())
    return tp, n_pred - tp, n_truth - tp, f2_score(tp, n_pred - tp, n_truth - tp)


@dataclass(frozen=True)
class ScoreResult:
    """Mean F2 over the scored slides, the per-slide table and what was left out or looked wrong."""

    mean_f2: float
    slides: pd.DataFrame  # SLIDE_TABLE_COLUMNS (slide, n_truth, n_pred, n_expected, tp, fp, fn, f2)
    lenient: bool = False
    left_out: list[str] = field(default_factory=list)  # slides without truth boxes
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "mean_f2": self.mean_f2,
            "mode": "lenient" if self.lenient else "one-to-one",
            "n_slides": len(self.slides),
            "slides": json.loads(self.slides.to_json(orient="records")),
            "left_out": self.left_out,
            "warnings": self.warnings,
        }

    def format_table(self) -> str:
        """The per-slide table and the mean as plain text."""
        mode = "lenient (any prediction hitting any box)" if self.lenient else "one-to-one"
        lines = [self.slides.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
        lines.append(f"mean F2 = {self.mean_f2:.4f} over {len(self.slides)} slide(s), matching {mode}")
        if self.left_out:
            lines.append(
                f"left out of the mean (no truth boxes): {len(self.left_out)} slide(s): "
                + ", ".join(self.left_out)
            )
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _coords(df: pd.DataFrame) -> np.ndarray:
    return df[list(COORDS)].to_numpy(dtype=np.float64)


def score_slides(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    counts: dict[str, int] | None = None,
    *,
    lenient: bool = False,
) -> ScoreResult:
    """Score predictions (``filename,x1,x2,y1,y2``) against truth boxes (same columns).

    ``counts``: the expected number of boxes N per slide (from a test list); default: each slide's
    number of truth boxes. A slide whose prediction count differs from N gets a warning.
    """
    for name, df in (("predictions", pred), ("truth", truth)):
        missing = [c for c in ("filename", *COORDS) if c not in df.columns]
        if missing:
            raise AnnotationError(f"{name} lack column(s) {', '.join(missing)}; need filename,x1,x2,y1,y2")
    pred_by = {str(k): g for k, g in pred.groupby("filename", sort=False)}
    truth_by = {str(k): g for k, g in truth.groupby("filename", sort=True)}
    rows, warnings = [], []
    for slide, t in truth_by.items():
        p = pred_by.get(slide, pred.iloc[:0])
        n_expected = int(counts.get(slide, len(t))) if counts is not None else len(t)
        tp, fp, fn, f2 = match_slide(_coords(p), _coords(t), lenient=lenient)
        rows.append((slide, len(t), len(p), n_expected, tp, fp, fn, f2))
        if len(p) != n_expected:
            warnings.append(f"{slide}: {len(p)} predicted box(es), expected exactly {n_expected}")
    left_out = sorted((set(pred_by) | set(counts or {})) - set(truth_by))
    table = pd.DataFrame(rows, columns=list(SLIDE_TABLE_COLUMNS))
    mean_f2 = float(table["f2"].mean()) if len(table) else 0.0
    if not len(table):
        warnings.append("no slide has truth boxes: nothing to score")
    for w in warnings:
        log.warning("%s", w)
    return ScoreResult(mean_f2, table, lenient, left_out, warnings)


def read_predictions_csv(path: str | Path) -> pd.DataFrame:
    """Read predicted boxes: columns ``filename,x1,x2,y1,y2`` (+ ``score``, ``trustii_id``…, kept).

    Column order is free, so a submission CSV (``trustii_id,filename,y1,y2,x1,x2``) reads as is.
    Padding rows ``(0,0,0,0)`` are kept: they are predictions that miss.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except FileNotFoundError as err:
        raise AnnotationError(f"{path}: prediction CSV not found") from err
    except pd.errors.EmptyDataError as err:
        raise AnnotationError(f"{path}: CSV is empty; expected header filename,x1,x2,y1,y2") from err
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("filename", *COORDS) if c not in df.columns]
    if missing:
        raise AnnotationError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}; "
            "expected filename,x1,x2,y1,y2 (x1,x2 = xmin,xmax; y1,y2 = ymin,ymax)"
        )
    for c in COORDS:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise AnnotationError(f"{path} line {i + 2}: {c}={df[c].iloc[i]!r} is not a number")
        df[c] = values.astype(np.float64)
    df["filename"] = df["filename"].astype(str).str.strip()
    return df


def read_truth_csv(path: str | Path) -> pd.DataFrame:
    """Read truth boxes: a challenge box CSV (validated by :func:`~digilut.annotations.read_boxes_csv`,
    bad rows dropped with a warning) or, without ``max_x,max_y``, a plain ``filename,x1,x2,y1,y2``."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: truth CSV not found")
    try:
        header = pd.read_csv(path, nrows=0).columns.str.strip()
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not a readable CSV ({err})") from err
    if all(c in header for c in BOX_COLUMNS):
        table = read_boxes_csv(path)
        table.log_problems()
        return table.rows
    return read_predictions_csv(path)
