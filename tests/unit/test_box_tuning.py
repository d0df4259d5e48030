"""The default tuning grid: what it searches and what that buys on loose hand-drawn boxes."""

from __future__ import annotations

import pandas as pd
from box_fixtures import oracle_patches, truth_frame

from digilut.box_tuning import DEFAULT_GRID, tune_boxes
from digilut.boxes import BoxesConfig

# Infiltrates the classifier finds exactly; the annotator drew each box 30 % of its side larger on
# every side (IoU with the infiltrate 0.39 < 0.5: a box on the infiltrate alone misses).
LESIONS = {"a_a.tif": [(2000, 3000, 3000, 3700)], "b_a.tif": [(1200, 2000, 1400, 2400)]}


def _loose(box: tuple[int, int, int, int], share: float = 0.3) -> tuple[int, int, int, int]:
    mx, my = share * (box[1] - box[0]), share * (box[3] - box[2])
    return (round(box[0] - mx), round(box[1] + mx), round(box[2] - my), round(box[3] + my))


def test_default_grid_searches_the_box_step_options_the_benchmarks_showed_help() -> None:
    fields = set(BoxesConfig.__dataclass_fields__)
    assert set(DEFAULT_GRID) <= fields
    for name in ("high", "fit_miss_weight", "size_prior_weight", "margin_fraction"):
        assert len(DEFAULT_GRID[name]) >= 2, name  # each is a real choice
    assert 0.0 in DEFAULT_GRID["size_prior_weight"] and 0.0 in DEFAULT_GRID["margin_fraction"]  # off too


def test_default_grid_tunes_a_margin_for_loose_hand_drawn_boxes() -> None:
    oof = pd.concat(
        [
            oracle_patches(LESIONS["a_a.tif"], slide="a_a.tif", width=4608, height=4608),
            oracle_patches(LESIONS["b_a.tif"], slide="b_a.tif", width=3584, height=3584),
        ],
        ignore_index=True,
    )
    truth = pd.concat([truth_frame(s, [_loose(b) for b in boxes]) for s, boxes in LESIONS.items()])
    tight = tune_boxes(oof, truth, {k: v for k, v in DEFAULT_GRID.items() if k != "margin_fraction"})
    assert tight.best_f2 == 0.0  # every box on the infiltrate misses its loose truth box
    res = tune_boxes(oof, truth)
    assert res.best_f2 == 1.0 and res.best.margin_fraction > 0
    assert len(res.table) == len(tight.table) * len(DEFAULT_GRID["margin_fraction"])
