"""CLI: ``digilut boxes`` (per-patch probabilities → N boxes per slide) and ``digilut score``.

Box columns everywhere: ``x1,x2`` = xmin,xmax and ``y1,y2`` = ymin,ymax, level-0 pixels, as in the
challenge CSV header. The ``boxes`` options are generated from
:class:`~digilut.boxes.BoxesConfig`'s fields (:mod:`digilut.commands.options`): same names, same
defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import typer

from digilut.boxes import BoxesConfig
from digilut.commands.options import config_options
from digilut.errors import DigilutError

_BOXES_HELP = {
    "method": "hysteresis | dbscan | fuse (the last two: the original write-up's methods).",
    "high": "hysteresis: seed threshold on heatmap cells; dbscan/fuse: positive-patch threshold.",
    "low": "hysteresis: grow threshold on heatmap cells (≤ high).",
    "min_area_px2": "Drop candidate boxes smaller than this (level-0 px²).",
    "margin_px": "Added to every side of a box (level-0 px; negative shrinks).",
    "profile_fraction": "hysteresis: box edges where a row/column's mass reaches this × the strongest.",
    "fit": "model: edges fitted to the patch probabilities with the labeller's rule | grid: as found.",
    "label_min_overlap": "The labeller's rule the model fit assumes: positive from this box cover.",
    "fit_miss_weight": "Model fit: cost of a positive patch outside every box vs a negative inside.",
    "split_min_area_px2": "hysteresis: only components larger than this (level-0 px²) may be split.",
    "split_saddle_ratio": "hysteresis: two peaks are separate below this dip (0 = never split).",
    "split_min_gain": "hysteresis + model fit: a split must explain this many more patches.",
    "fill_side_px": "Side of the boxes that fill a slide up to N (level-0 px).",
    "dbscan_eps_cells": "dbscan: neighbourhood radius in grid steps.",
    "dbscan_min_samples": "dbscan: patches within eps for a core point (itself included).",
    "fuse_min_neighbours": "fuse: positives with fewer positive neighbours (of 8) are dropped.",
}


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


def _counts_and_truth(path: Path) -> tuple[dict[str, int], pd.DataFrame | None, pd.DataFrame | None]:
    """N per slide from a test list (``trustii_id`` column) or a truth box CSV; the truth boxes or the
    test list rows alongside."""
    from digilut.annotations import expected_counts, read_test_list
    from digilut.score import read_truth_csv

    header = pd.read_csv(path, nrows=0).columns.str.strip()
    if "trustii_id" in header:
        table = read_test_list(path)
        table.log_problems()
        return expected_counts(table.rows), None, table.rows
    truth = read_truth_csv(path)
    return {str(k): int(v) for k, v in truth.groupby("filename").size().items()}, truth, None


@config_options(BoxesConfig, help=_BOXES_HELP)
def boxes(
    probs: Path = typer.Argument(
        ..., help="Patches with probabilities (Parquet): slide, x0, y0, w0, h0 (level-0 px), prob."
    ),
    out: Path = typer.Argument(..., help="Boxes CSV: filename,x1,x2,y1,y2,score,rank,source."),
    counts_from: Path | None = typer.Option(
        None,
        help="N per slide: a test list (filename,max_x,max_y,trustii_id) or a truth box CSV. "
        "Without it every component of every slide is written.",
    ),
    submission: Path | None = typer.Option(
        None, help="Also write the challenge submission (trustii_id,filename,y1,y2,x1,x2); needs a test list."
    ),
    pictures: Path | None = typer.Option(
        None, help="Folder for one heatmap PNG per slide (truth boxes too when --counts-from is a truth CSV)."
    ),
    stride_px: int | None = typer.Option(
        None, help="Level-0 patch grid step; default: inferred per slide from the patch corners."
    ),
    geojson: Path | None = typer.Option(
        None,
        help="Folder for one GeoJSON per slide (level-0 px): predicted boxes, truth boxes when "
        "--counts-from is a truth CSV, heatmap contours. QuPath: File → Import objects.",
    ),
    asap: bool = typer.Option(False, help="With --geojson: also <slide>.xml, the same polygons for ASAP."),
    **config: Any,
) -> None:
    """Per-patch probabilities → exactly N boxes per slide.

    Boxes in level-0 px: x1,x2 = xmin,xmax and y1,y2 = ymin,ymax.
    """
    from digilut.geojson import to_asap_xml
    from digilut.steps.submission import write_boxes

    try:
        cfg = BoxesConfig(**config)
        patches = pd.read_parquet(probs)
        counts, truth, test_list = _counts_and_truth(counts_from) if counts_from else (None, None, None)
        if submission is not None and test_list is None:
            raise typer.BadParameter("--submission needs --counts-from TEST_LIST (a CSV with trustii_id)")
        found = write_boxes(patches, counts, cfg, out, geojson, truth=truth, stride_px=stride_px)
        result, hms = found.boxes, found.heatmaps
        typer.echo(f"{len(result)} box(es) for {result['filename'].nunique()} slide(s) → {out}")
        if submission is not None and test_list is not None:
            from digilut.submission import write_submission

            write_submission(result, test_list, submission)
            typer.echo(f"submission → {submission}")
        if pictures is not None:
            _pictures(pictures, hms, result, truth, counts)
        if geojson is not None:
            if asap:
                for path in found.geojson.values():
                    path.with_suffix(".xml").write_text(to_asap_xml(json.loads(path.read_text())))
            extra = ", ASAP XML too" if asap else ""
            typer.echo(f"geojson → {geojson} ({len(found.geojson)} slide(s){extra})")
    except (DigilutError, OSError, ValueError) as err:
        if isinstance(err, typer.BadParameter):
            raise
        raise _fail(err) from err


def _pictures(
    folder: Path,
    hms: dict[str, Any],
    result: pd.DataFrame,
    truth: pd.DataFrame | None,
    counts: dict[str, int] | None,
) -> None:
    from digilut.render import render_heatmap_png
    from digilut.score import score_slides

    f2: dict[str, float] = {}
    if truth is not None:
        table = score_slides(result, truth, counts).slides
        f2 = dict(zip(table["slide"], table["f2"], strict=True))
    for slide, hm in hms.items():
        if counts is not None and slide not in counts:
            continue
        t = truth[truth["filename"] == slide] if truth is not None else None
        _, x2, _, y2 = hm.extent_px
        render_heatmap_png(
            None, (x2, y2), hm, t, result[result["filename"] == slide],
            folder / f"{Path(slide).stem}.png", f2=f2.get(slide), n=(counts or {}).get(slide),
        )  # fmt: skip
    typer.echo(f"pictures → {folder}")


def score(
    pred: Path = typer.Argument(
        ..., help="Predicted boxes CSV: filename,x1,x2,y1,y2 in any column order (a submission CSV works)."
    ),
    truth: Path = typer.Argument(..., help="Truth boxes CSV: filename,x1,x2,y1,y2[,max_x,max_y]."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    lenient: bool = typer.Option(
        False, help="The original write-up's scorer: any prediction hitting any truth box counts."
    ),
    test_list: Path | None = typer.Option(
        None, help="Test list giving N per slide (rows per filename) for the exactly-N check."
    ),
) -> None:
    """DigiLut score: mean over slides of F2; a prediction hits a truth box of its slide at GIoU > 0.5.

    Columns: x1,x2 = xmin,xmax and y1,y2 = ymin,ymax in level-0 pixels (the challenge CSV header).

    Matching is one-to-one (two predictions on one lesion count once) unless --lenient.

    A slide with truth boxes and no prediction scores 0; (0,0,0,0) padding boxes are misses.

    Slides without truth boxes are left out of the mean (and listed).
    """
    from digilut.annotations import expected_counts, read_test_list
    from digilut.score import read_predictions_csv, read_truth_csv, score_slides

    try:
        counts = None
        if test_list is not None:
            table = read_test_list(test_list)
            table.log_problems()
            counts = expected_counts(table.rows)
        result = score_slides(read_predictions_csv(pred), read_truth_csv(truth), counts, lenient=lenient)
    except (DigilutError, OSError) as err:
        raise _fail(err) from err
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(result.format_table())


def register(app: typer.Typer) -> None:
    app.command("boxes")(boxes)
    app.command("score")(score)
