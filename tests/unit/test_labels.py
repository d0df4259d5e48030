import numpy as np
import pandas as pd
import pytest

from digilut.errors import ConfigError
from digilut.labels import LabelConfig, label_patches, overlap_scores


def loop_scores(patches, boxes, mode):
    out = []
    for x0, y0, w, h in patches:
        best = 0.0
        for x1, x2, y1, y2 in boxes:
            inter = max(0, min(x0 + w, x2) - max(x0, x1)) * max(0, min(y0 + h, y2) - max(y0, y1))
            union = w * h + (x2 - x1) * (y2 - y1) - inter
            best = max(best, inter / (w * h) if mode == "patch_fraction" else inter / union)
        out.append(best)
    return np.array(out)


@pytest.mark.parametrize("mode", ["patch_fraction", "iou"])
def test_vectorised_scores_equal_a_plain_loop(mode):
    rng = np.random.default_rng(0)
    patches = np.c_[rng.integers(0, 5000, (300, 2)), np.full((300, 2), 512)]
    x1, y1 = rng.integers(0, 4000, 7), rng.integers(0, 4000, 7)
    boxes = np.c_[x1, x1 + rng.integers(200, 2000, 7), y1, y1 + rng.integers(200, 2000, 7)]
    assert np.allclose(overlap_scores(patches, boxes, mode), loop_scores(patches, boxes, mode), atol=1e-6)


def test_threshold_and_hand_computed_cases():
    m = pd.DataFrame(
        {"slide": "s_a.tif", "x0": [0, 512, 1024, 0], "y0": [0, 0, 0, 2000], "w0": 512, "h0": 512}
    )
    boxes = pd.DataFrame({"filename": ["s_a.tif"], "x1": [460], "x2": [1000], "y1": [0], "y2": [512]})
    out = label_patches(m, boxes, LabelConfig())
    assert np.allclose(out.overlap, [52 / 512, 488 / 512, 0.0, 0.0])
    assert out.label.tolist() == [1, 1, 0, 0]  # 52/512 = 0.1016 ≥ 0.1
    assert label_patches(m, boxes, LabelConfig(min_overlap=0.2)).label.tolist() == [0, 1, 0, 0]


def test_shifting_the_boxes_shifts_the_positive_patches():
    grid = [(x, y) for y in range(0, 8192, 256) for x in range(0, 8192, 256)]
    m = pd.DataFrame(
        {"slide": "s_a.tif", "x0": [g[0] for g in grid], "y0": [g[1] for g in grid], "w0": 512, "h0": 512}
    )
    boxes = pd.DataFrame(
        {
            "filename": ["s_a.tif"] * 2,
            "x1": [1000, 4000],
            "x2": [1900, 4800],
            "y1": [700, 3000],
            "y2": [1500, 4100],
        }
    )
    base = label_patches(m, boxes, LabelConfig())
    moved = boxes.assign(x1=boxes.x1 + 768, x2=boxes.x2 + 768, y1=boxes.y1 + 512, y2=boxes.y2 + 512)
    shifted = label_patches(m, moved, LabelConfig())
    pos = {(r.x0 + 768, r.y0 + 512) for r in base[base.label == 1].itertuples()}
    assert pos == {(r.x0, r.y0) for r in shifted[shifted.label == 1].itertuples()}


def test_slides_without_boxes_are_all_negative_and_config_checked():
    m = pd.DataFrame({"slide": ["a_a.tif"], "x0": [0], "y0": [0], "w0": [512], "h0": [512]})
    out = label_patches(m, pd.DataFrame(columns=["filename", "x1", "x2", "y1", "y2"]), LabelConfig())
    assert out.label.tolist() == [0]
    with pytest.raises(ConfigError, match="mode='area'"):
        LabelConfig(mode="area")  # type: ignore[arg-type]
