"""The challenge submission: ``trustii_id,filename,y1,y2,x1,x2``, one row per row of the test list.

The test list (:func:`~digilut.annotations.read_test_list`) has one row per expected box, so a
slide's rows say how many boxes N it must get. Its boxes are assigned best first (by ``rank``, else
by ``score``) to its ``trustii_id``\\ s in increasing order. Coordinates are level-0 pixels
(``x1,x2`` = xmin,xmax; ``y1,y2`` = ymin,ymax), clipped to the slide.

A slide with fewer than N boxes (no patches, say) is padded with squares of
:data:`~digilut.boxes.MEDIAN_LESION_SIDE_PX` at its centre and a warning: never ``(0,0,0,0)``,
and the file always has a row for every ``trustii_id``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from digilut.annotations import TEST_COLUMNS
from digilut.boxes import MEDIAN_LESION_SIDE_PX
from digilut.errors import AnnotationError
from digilut.files import atomic_write

log = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("trustii_id", "filename", "y1", "y2", "x1", "x2")


def _ordered(boxes: pd.DataFrame) -> pd.DataFrame:
    if "rank" in boxes.columns:
        return boxes.sort_values("rank", kind="stable")
    if "score" in boxes.columns:
        return boxes.sort_values("score", ascending=False, kind="stable")
    return boxes


def make_submission(
    boxes: pd.DataFrame, test_list: pd.DataFrame, *, pad_side_px: int = MEDIAN_LESION_SIDE_PX
) -> pd.DataFrame:
    """The submission table for ``boxes`` (``filename,x1,x2,y1,y2`` [+ ``rank``/``score``]) and the
    test list rows (``filename,max_x,max_y,trustii_id``), sorted by ``trustii_id``."""
    missing = [c for c in TEST_COLUMNS if c not in test_list.columns]
    if missing:
        raise AnnotationError(
            f"test list lacks column(s) {', '.join(missing)}; need {','.join(TEST_COLUMNS)}"
        )
    missing = [c for c in ("filename", "x1", "x2", "y1", "y2") if c not in boxes.columns]
    if missing:
        raise AnnotationError(f"boxes lack column(s) {', '.join(missing)}; need filename,x1,x2,y1,y2")
    by_slide = {str(k): _ordered(g) for k, g in boxes.groupby("filename", sort=False)}
    rows = []
    for slide, tl in test_list.sort_values("trustii_id").groupby("filename", sort=True):
        slide = str(slide)
        ids = tl["trustii_id"].astype(int).tolist()
        max_x, max_y = int(tl["max_x"].iloc[0]), int(tl["max_y"].iloc[0])
        b = by_slide.get(slide, boxes.iloc[:0])
        if len(b) > len(ids):
            log.warning(
                "%s: %d boxes for %d test rows; keeping the best %d", slide, len(b), len(ids), len(ids)
            )
        coords = [
            tuple(round(float(v)) for v in r) for r in b[["x1", "x2", "y1", "y2"]].to_numpy()[: len(ids)]
        ]
        if len(coords) < len(ids):
            log.warning(
                "%s: %d box(es) for %d test rows; padding with %d px squares at the slide centre",
                slide, len(coords), len(ids), pad_side_px,
            )  # fmt: skip
            cx, cy, h = max_x // 2, max_y // 2, pad_side_px // 2
            coords += [(cx - h, cx + h, cy - h, cy + h)] * (len(ids) - len(coords))
        for tid, (x1, x2, y1, y2) in zip(ids, coords, strict=True):
            x1, x2 = min(max(x1, 0), max_x), min(max(x2, 0), max_x)
            y1, y2 = min(max(y1, 0), max_y), min(max(y2, 0), max_y)
            rows.append((tid, slide, y1, y2, x1, x2))
    extra = sorted(set(by_slide) - set(test_list["filename"].astype(str)))
    if extra:
        log.warning(
            "%d slide(s) with boxes are not in the test list, left out: %s", len(extra), ", ".join(extra)
        )
    out = pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS))
    return out.sort_values("trustii_id", kind="stable").reset_index(drop=True)


def write_submission(
    boxes: pd.DataFrame,
    test_list: pd.DataFrame,
    path: str | Path,
    *,
    pad_side_px: int = MEDIAN_LESION_SIDE_PX,
) -> Path:
    """Write :func:`make_submission`'s table to ``path`` (CSV, atomically) and return the path."""
    path = Path(path)
    table = make_submission(boxes, test_list, pad_side_px=pad_side_px)
    atomic_write(path, [table.to_csv(index=False).encode()])
    log.info("submission: %d rows for %d slide(s) → %s", len(table), table["filename"].nunique(), path)
    return path
