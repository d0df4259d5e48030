import numpy as np
import pytest
from box_fixtures import oracle_patches

from digilut.boxfit import patch_window, refine_box
from digilut.heatmap import build_heatmap


def test_the_truth_box_explains_its_own_labels_exactly():
    lesion = (2100, 3050, 2900, 3600)
    hm = build_heatmap(oracle_patches([lesion]))
    win = patch_window(hm, lesion, 0.1)
    assert win.loss([lesion]) == 0.0
    assert win.labels([lesion]).sum() == int(np.nansum(hm.patch_prob))
    assert win.loss([(2100, 3050, 2900, 4600)]) > 0  # 1000 px too tall


@pytest.mark.parametrize("seed", range(6))
def test_refine_moves_a_grid_box_to_one_that_explains_the_labels(seed):
    rng = np.random.default_rng(seed)
    x, y = (int(v) for v in rng.integers(2000, 2600, 2))
    w, h = (int(v) for v in rng.integers(500, 2000, 2))
    lesion = (x, x + w, y, y + h)
    hm = build_heatmap(oracle_patches([lesion]))
    start = (
        x // 256 * 256 - 256.0,
        (x + w) // 256 * 256 + 512.0,
        y // 256 * 256 - 256.0,
        (y + h) // 256 * 256 + 512.0,
    )
    win = patch_window(hm, start, 0.1, miss_weight=2.0)
    fitted = refine_box(win, start)
    assert win.loss([fitted]) == 0.0 < win.loss([start])
    assert np.abs(np.subtract(fitted, lesion)).max() <= 160  # the labels pin each edge to ~a cell


def test_patches_another_lesion_explains_do_not_pull_the_box():
    a, b = (2000, 3000, 2000, 3000), (3300, 4300, 2000, 3000)  # 300 px apart: patches straddle both
    hm = build_heatmap(oracle_patches([a, b]))
    explained = np.zeros(hm.shape, dtype=bool)
    explained[:, (3300 - 512) // 256 + 1 :] = True  # every patch reaching lesion b
    start = (1900.0, 3200.0, 1900.0, 3100.0)
    fitted = refine_box(patch_window(hm, a, 0.1, miss_weight=2.0, explained=explained), start)
    assert np.abs(np.subtract(fitted, a)).max() <= 160
    free = refine_box(patch_window(hm, a, 0.1, miss_weight=2.0), start)
    assert free[1] > fitted[1] + 500  # b's positives drag the right edge over it


def test_an_empty_window_leaves_the_box_alone():
    hm = build_heatmap(oracle_patches([], width=2048, height=2048))
    far = (50_000.0, 51_000.0, 50_000.0, 51_000.0)
    assert refine_box(patch_window(hm, far, 0.1), far) == far


def test_size_prior_keeps_a_box_from_growing_over_a_faint_rim():
    """A lesion's positive patches at 1.0 with a ring of 0.35 around them (a classifier's soft edge):
    with miss_weight 2 the ring pays for a box one cell larger each side; the size prior (real
    DigiLut sizes, median 943 px) makes that growth cost more than it explains."""
    from scipy import ndimage

    lesion = (2560, 3560, 2560, 3560)  # 1000 px, near the real median
    hm = build_heatmap(oracle_patches([lesion]))
    positive = np.nan_to_num(hm.patch_prob) > 0.5
    rim = ndimage.binary_dilation(positive, np.ones((3, 3), bool)) & ~positive & ~np.isnan(hm.patch_prob)
    hm.patch_prob[rim] = 0.35
    free = refine_box(patch_window(hm, lesion, 0.1, miss_weight=2.0), lesion)
    held = refine_box(patch_window(hm, lesion, 0.1, miss_weight=2.0, prior_weight=20.0), lesion)
    side = lambda b: np.sqrt((b[1] - b[0]) * (b[3] - b[2]))  # noqa: E731 - a one-line helper
    assert side(free) > 1300  # grown over the rim
    assert side(held) < side(free) - 200
    assert abs(side(held) - 1000) < abs(side(free) - 1000)
    win = patch_window(hm, lesion, 0.1, prior_weight=1.0)
    assert win.size_cost(943.0, 943.0) == pytest.approx(0.0, abs=1e-9)
    assert win.size_cost(3000.0, 3000.0) > win.size_cost(1500.0, 1500.0) > 0
