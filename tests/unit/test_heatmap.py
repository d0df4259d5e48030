import numpy as np
import pandas as pd
import pytest

from digilut.errors import ConfigError
from digilut.heatmap import build_heatmap, build_heatmaps, infer_stride_px


def grid(slide="s_a.tif", nx=3, ny=3, stride=256, patch=512, x0=1000, y0=2000, prob=0.0):
    xs, ys = np.meshgrid(x0 + np.arange(nx) * stride, y0 + np.arange(ny) * stride)
    n = xs.size
    return pd.DataFrame(
        {
            "slide": slide,
            "x0": xs.ravel(),
            "y0": ys.ravel(),
            "w0": patch,
            "h0": patch,
            "prob": np.full(n, prob),
        }
    )


def test_infer_stride_is_the_gcd_of_corner_offsets():
    assert infer_stride_px(np.array([0, 256, 1024]), np.array([0, 0, 512])) == 256  # holes in the grid
    assert infer_stride_px(np.array([100, 353]), np.array([7, 7])) == 253  # a 0.2528 µm/px slide
    assert infer_stride_px(np.array([5]), np.array([5])) is None


def test_overlapping_patches_average_per_cell():
    p = grid()
    p.loc[(p.x0 == 1256) & (p.y0 == 2256), "prob"] = 1.0  # the centre patch of 3×3
    hm = build_heatmap(p)
    assert (hm.stride_px, hm.patch_cells, hm.shape) == (256, (2, 2), (4, 4))
    assert (hm.x_px, hm.y_px) == (1000, 2000)
    assert hm.extent_px == (1000, 1000 + 4 * 256, 2000, 2000 + 4 * 256)
    assert hm.count.tolist() == [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] = 0.25  # each of the patch's 4 cells is seen by 4 patches, one positive
    assert np.allclose(hm.prob, expected)
    assert np.isnan(hm.patch_prob[3]).all() and hm.patch_prob[1, 1] == 1.0
    assert hm.cells_to_box(1, 2, 1, 2) == (1256, 1768, 2256, 2768)  # the patch's extent


def test_duplicate_patches_average_and_glass_is_zero():
    p = pd.concat([grid(nx=1, ny=1, prob=1.0), grid(nx=1, ny=1, prob=0.5), grid(nx=1, ny=1, x0=2024)])
    hm = build_heatmap(p)
    assert hm.stride_px == 1024 and hm.patch_cells == (1, 1)  # inferred from the two corners
    assert hm.patch_prob[0, 0] == pytest.approx(0.75)
    p = pd.concat([grid(nx=1, ny=1, prob=1.0), grid(nx=1, ny=1, x0=2024)])
    hm = build_heatmap(p, stride_px=256)
    assert hm.shape == (2, 6) and hm.count[:, 2:4].sum() == 0  # cells no patch covers
    assert hm.prob[:, 2:4].sum() == 0


def test_one_heatmap_per_slide_each_with_its_own_stride():
    hms = build_heatmaps(pd.concat([grid("a_a.tif", stride=256), grid("b_a.tif", stride=253, patch=506)]))
    assert sorted(hms) == ["a_a.tif", "b_a.tif"]
    assert (hms["a_a.tif"].stride_px, hms["b_a.tif"].stride_px) == (256, 253)
    assert hms["b_a.tif"].patch_cells == (2, 2)


@pytest.mark.parametrize(
    ("patches", "message"),
    [
        (grid().drop(columns="prob"), "lacks column"),
        (grid(prob=1.5), r"prob=1\.5 of patch s_a\.tif x0=1000 y0=2000 is not a probability"),
        (pd.concat([grid(), grid("b.tif")]), "exactly one slide, got 2"),
    ],
)
def test_bad_patch_tables_raise(patches, message):
    with pytest.raises(ConfigError, match=message):
        build_heatmap(patches)


def test_a_stride_that_misses_the_grid_raises():
    with pytest.raises(
        ConfigError, match="stride_px=300 does not divide the patch corner offsets; inferred step is 256"
    ):
        build_heatmap(grid(), stride_px=300)
