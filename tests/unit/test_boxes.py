import logging

import numpy as np
import pandas as pd
import pytest
from box_fixtures import oracle_patches, truth_frame
from scipy import ndimage

from digilut.box_candidates import fit_box, hysteresis_labels, relative_heatmap
from digilut.box_spares import best_cut
from digilut.box_tuning import tune_boxes
from digilut.boxes import (
    BOX_COLUMNS,
    BoxesConfig,
    heatmap_to_boxes,
    slide_boxes,
)
from digilut.errors import ConfigError
from digilut.heatmap import build_heatmap
from digilut.score import giou_matrix, match_slide

LESION = (2000, 3000, 3000, 3700)  # 1000 × 700 px


def coords(df: pd.DataFrame) -> np.ndarray:
    return df[["x1", "x2", "y1", "y2"]].to_numpy()


def test_a_perfect_classifier_gives_a_hit_within_half_a_cell():
    hm = build_heatmap(oracle_patches([LESION]))
    fitted = heatmap_to_boxes(hm, 1, BoxesConfig())
    assert list(fitted.columns) == list(BOX_COLUMNS)
    assert fitted[["filename", "rank", "source"]].values.tolist() == [["s_a.tif", 1, "component"]]
    assert giou_matrix(coords(fitted), np.array([LESION]))[0, 0] > 0.5
    # The edge fit alone: the likeliest-hit step trades edge accuracy for the chance of a hit.
    edges = heatmap_to_boxes(hm, 1, BoxesConfig(hit_max_side_px=0))
    assert np.abs(coords(edges)[0] - LESION).max() <= 128  # half a cell on every edge


def test_model_fit_beats_the_grid_on_random_lesions():
    rng = np.random.default_rng(0)
    gious = {"model": [], "grid": []}
    for _ in range(15):
        x, y = rng.integers(2000, 2600, 2)
        w, h = rng.integers(500, 2000, 2)
        lesion = (int(x), int(x + w), int(y), int(y + h))
        hm = build_heatmap(oracle_patches([lesion]))
        for fit in gious:
            box = coords(heatmap_to_boxes(hm, 1, BoxesConfig(fit=fit)))
            gious[fit].append(giou_matrix(box, np.array([lesion]))[0, 0])
    assert min(gious["model"]) > 0.5
    assert np.mean(gious["model"]) > np.mean(gious["grid"]) + 0.03


def test_small_lesions_are_hit_more_often_with_the_likeliest_hit():
    """A 300–600 px lesion's patches fit many boxes (width trades for height under the 10 % rule);
    the edge-by-edge middle of refine_box misses some that the likeliest hit of that set finds."""
    rng = np.random.default_rng(1)
    hits = {"edges": 0, "likeliest": 0}
    for _ in range(30):
        x, y = (int(v) for v in rng.integers(2000, 2600, 2))
        w, h = (int(v) for v in rng.integers(300, 600, 2))
        lesion = np.array([(x, x + w, y, y + h)])
        hm = build_heatmap(oracle_patches([tuple(lesion[0])]))
        for name, cfg in (("edges", BoxesConfig(hit_max_side_px=0)), ("likeliest", BoxesConfig())):
            hits[name] += int(giou_matrix(coords(heatmap_to_boxes(hm, 1, cfg)), lesion)[0, 0] > 0.5)
    assert hits["likeliest"] > hits["edges"]
    assert hits["likeliest"] >= 27


def test_exactly_n_boxes_filled_at_peaks_never_with_zeros():
    hm = build_heatmap(oracle_patches([LESION]))
    out = heatmap_to_boxes(hm, 4, BoxesConfig())
    assert out["rank"].tolist() == [1, 2, 3, 4]
    assert out["source"].tolist() == ["component", "fill", "fill", "fill"]
    assert match_slide(coords(out), np.array([LESION]))[0] == 1  # the lesion is still found
    b = coords(out)
    assert (b[:, 1] > b[:, 0]).all() and (b[:, 3] > b[:, 2]).all() and not (b == 0).all(axis=1).any()
    assert len({tuple(r) for r in b}) == 4  # four different boxes
    assert (np.abs((b[1:, 1] - b[1:, 0]) - BoxesConfig().fill_side_px) <= 1).all()


def test_fill_works_on_a_heatmap_without_any_probability():
    hm = build_heatmap(oracle_patches([], width=2048, height=2048))
    out = heatmap_to_boxes(hm, 3, BoxesConfig())
    assert len(out) == 3 and set(out["source"]) == {"fill"}
    assert len({tuple(r) for r in coords(out)}) == 3
    assert (coords(out)[:, [0, 2]] >= 0).all()


def test_n_none_gives_every_component_and_n_zero_none():
    hm = build_heatmap(oracle_patches([LESION, (6000, 7000, 6000, 7000)]))
    assert len(heatmap_to_boxes(hm, None)) == 2
    assert heatmap_to_boxes(hm, 0).empty
    with pytest.raises(ConfigError, match="n=-1"):
        heatmap_to_boxes(hm, -1)


def test_boxes_are_ranked_by_probability_mass():
    small, big = (6000, 6600, 6000, 6600), (1000, 3000, 1000, 3000)
    out = heatmap_to_boxes(build_heatmap(oracle_patches([small, big])), 1)
    assert match_slide(coords(out), np.array([big]))[0] == 1
    assert out["score"].iloc[0] > 30  # ~ cells of the big lesion


def random_field(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """Smooth random blobs scaled to 0..1."""
    f = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return (f - f.min()) / (f.max() - f.min())


@pytest.mark.parametrize("seed", range(5))
def test_a_higher_seed_threshold_never_yields_more_components(seed):
    prob = random_field(seed, (60, 60))
    counts = [hysteresis_labels(prob, high, 0.5)[1] for high in np.linspace(0.5, 1.0, 11)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > 1  # the field has structure to lose


@pytest.mark.parametrize("seed", range(3))
def test_a_higher_seed_threshold_never_yields_more_boxes(seed):
    p = oracle_patches([], width=6144, height=6144)
    p["prob"] = random_field(seed, (23, 23)).ravel()
    hm = build_heatmap(p)
    n = [
        len(heatmap_to_boxes(hm, None, BoxesConfig(high=h, low=0.5, split_saddle_ratio=0)))
        for h in (0.5, 0.6, 0.7, 0.8, 0.9)
    ]
    assert n == sorted(n, reverse=True) and n[0] > 1


@pytest.mark.parametrize("fit", ["model", "grid"])
@pytest.mark.parametrize("method", ["hysteresis", "dbscan", "fuse"])
def test_shifting_the_patches_shifts_the_boxes(method, fit):
    lesions = [LESION, (5000, 6500, 1000, 1800)]
    dx, dy = 1037, 523
    cfg = BoxesConfig(method=method, fit=fit, high=0.5 if method != "hysteresis" else 0.75)
    patches = oracle_patches(lesions)
    moved = patches.assign(x0=patches.x0 + dx, y0=patches.y0 + dy)
    before = heatmap_to_boxes(build_heatmap(patches), 3, cfg)
    after = heatmap_to_boxes(build_heatmap(moved), 3, cfg)
    shifted = coords(before) + np.array([dx, dx, dy, dy])
    assert np.abs(coords(after) - shifted).max() <= 1  # rounding of half pixels
    assert after["source"].tolist() == before["source"].tolist()


def test_two_merged_lesions_are_split_at_their_peaks():
    lesions = [(2000, 3000, 2000, 3000), (3300, 4100, 2600, 3400)]  # 300 px apart, offset: one blob
    hm = build_heatmap(oracle_patches(lesions))
    assert hysteresis_labels(hm.prob, 0.75, 0.5)[1] == 1
    split = heatmap_to_boxes(hm, 2, BoxesConfig())
    assert split["source"].tolist() == ["split", "split"]
    assert match_slide(coords(split), np.array(lesions))[0] == 2
    merged = heatmap_to_boxes(hm, 2, BoxesConfig(split_saddle_ratio=0, alt_min_gain=np.inf))
    assert merged["source"].tolist() == ["component", "fill"]
    assert match_slide(coords(merged), np.array(lesions))[0] < 2


TOUCHING = [(2000, 3000, 2000, 3000), (3050, 3800, 2300, 3300)]  # 50 px apart: one blob, no dip


def test_spare_boxes_cut_a_box_of_two_touching_lesions_in_two():
    hm = build_heatmap(oracle_patches(TOUCHING))
    assert hysteresis_labels(hm.prob, 0.75, 0.5)[1] == 1
    no_spares = heatmap_to_boxes(hm, 3, BoxesConfig(alt_min_gain=np.inf))
    assert no_spares["source"].tolist() == ["component", "fill", "fill"]
    assert match_slide(coords(no_spares), np.array(TOUCHING))[0] == 0  # one box over both misses both
    out = heatmap_to_boxes(hm, 3, BoxesConfig())
    assert out["source"].tolist() == ["component", "alternative", "alternative"]
    assert coords(out)[0].tolist() == coords(no_spares)[0].tolist()  # the whole box stays first
    assert match_slide(coords(out), np.array(TOUCHING))[0] == 2


def test_spare_boxes_leave_one_lesion_alone():
    """A single box explains a single lesion's patches exactly: no cut gains, spares are fills."""
    out = heatmap_to_boxes(build_heatmap(oracle_patches([LESION])), 3, BoxesConfig())
    assert out["source"].tolist() == ["component", "fill", "fill"]


def test_best_cut_finds_the_gap_between_touching_lesions():
    hm = build_heatmap(oracle_patches(TOUCHING))
    labels, _ = hysteresis_labels(hm.prob, 0.75, 0.5)
    box = coords(heatmap_to_boxes(hm, 1, BoxesConfig()))[0]
    gain, pair = best_cut(hm, labels, 1, tuple(box), BoxesConfig())
    assert gain > 5
    assert (giou_matrix(np.array(pair), np.array(TOUCHING)) > 0.5).sum() == 2


def test_one_long_lesion_is_not_split():
    long = (1000, 4500, 2000, 2700)  # aspect 5
    out = heatmap_to_boxes(build_heatmap(oracle_patches([long])), 2, BoxesConfig())
    assert out["source"].tolist()[0] == "component"  # the spare box may try a cut: it costs nothing
    assert match_slide(coords(out.iloc[:1]), np.array([long]))[0] == 1


def test_dbscan_and_fuse_boxes_are_unions_of_positive_patches():
    p = oracle_patches([LESION])
    pos = p[p.prob == 1]
    union = [pos.x0.min(), (pos.x0 + pos.w0).max(), pos.y0.min(), (pos.y0 + pos.h0).max()]
    hm = build_heatmap(p)
    for method in ("dbscan", "fuse"):
        out = heatmap_to_boxes(hm, None, BoxesConfig(method=method, high=0.5, fit="grid"))
        assert coords(out).tolist() == [union]


def test_fuse_and_dbscan_drop_isolated_positive_patches():
    p = oracle_patches([], width=4096, height=4096)
    p.loc[(p.x0 == 1024) & (p.y0 == 1024), "prob"] = 1.0
    hm = build_heatmap(p)
    assert heatmap_to_boxes(hm, None, BoxesConfig(method="fuse", high=0.5)).empty
    assert heatmap_to_boxes(hm, None, BoxesConfig(method="dbscan", high=0.5)).empty
    assert len(heatmap_to_boxes(hm, None, BoxesConfig(method="fuse", high=0.5, fuse_min_neighbours=0))) == 1


def test_profile_fit_ignores_a_stray_rim_cell():
    hm = build_heatmap(oracle_patches([(2048, 3072, 2048, 3072)]))
    prob = hm.prob.copy()
    prob[8:12, 12] = 0.0
    prob[9, 12] = 0.75  # one stray cell beside the lesion, joined to it
    hm = type(hm)(hm.slide, hm.x_px, hm.y_px, hm.stride_px, hm.patch_cells, prob, hm.count, hm.patch_prob)
    labels, _ = hysteresis_labels(hm.prob, 0.75, 0.5)
    part = labels == labels[9, 9]
    by_cells = fit_box(hm, part.astype(np.int32), 1, 0.0)
    by_profile = fit_box(hm, part.astype(np.int32), 1, 0.6)
    assert by_cells[1] == 13 * 256  # the stray cell widens the cell box by a cell
    assert by_profile[1] == 12 * 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "kmeans"}, "method='kmeans': choose one of hysteresis, dbscan, fuse"),
        ({"low": 0.8, "high": 0.6}, "low=0.8 must not exceed high=0.6"),
        ({"high": 1.2}, r"high=1\.2 must be a probability"),
        ({"fit": "tight"}, "fit='tight'"),
        ({"profile_fraction": 2.0}, "profile_fraction=2.0"),
        ({"split_saddle_ratio": 1.0}, "split_saddle_ratio=1.0"),
        ({"min_area_px2": -1.0}, "min_area_px2=-1.0"),
        ({"fill_side_px": 0}, "fill_side_px=0"),
        ({"fit_miss_weight": 0.0}, "fit_miss_weight=0.0"),
        ({"alt_min_gain": -1.0}, "alt_min_gain=-1.0"),
        ({"hit_max_side_px": -1.0}, "hit_max_side_px=-1.0"),
        ({"dbscan_min_samples": 0}, "dbscan_min_samples=0"),
        ({"fuse_min_neighbours": 9}, "fuse_min_neighbours=9"),
        ({"label_min_overlap": 0.0}, "label_min_overlap=0.0"),
        ({"size_prior_weight": -1.0}, "size_prior_weight=-1.0"),
        ({"margin_fraction": 2.0}, "margin_fraction=2.0"),
    ],
)
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BoxesConfig(**kwargs)


def test_slide_boxes_many_slides(caplog):
    patches = pd.concat(
        [
            oracle_patches([LESION], slide="a_a.tif", width=4096, height=4096),
            oracle_patches(
                [(500, 1500, 500, 1500)], slide="b_a.tif", width=4096, height=4096, stride=253, patch=506
            ),
            oracle_patches([], slide="c_a.tif", width=2048, height=2048),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="digilut.boxes"):
        out = slide_boxes(patches, {"a_a.tif": 1, "b_a.tif": 2, "nopatch_a.tif": 1})
    assert out.groupby("filename").size().to_dict() == {"a_a.tif": 1, "b_a.tif": 2}  # c: not asked for
    assert "nopatch_a.tif: no patches, so no boxes (expected 1)" in caplog.text
    assert match_slide(coords(out[out.filename == "b_a.tif"]), np.array([(500, 1500, 500, 1500)]))[0] == 1
    assert set(slide_boxes(patches, None)["filename"]) == {"a_a.tif", "b_a.tif"}  # c has no component


def test_tune_boxes_picks_the_best_valid_configuration():
    lesions = {"a_a.tif": [LESION], "b_a.tif": [(1000, 1600, 1000, 1500), (3000, 4200, 3000, 3900)]}
    oof = pd.concat([oracle_patches(b, slide=s, width=5120, height=5120) for s, b in lesions.items()])
    truth = pd.concat([truth_frame(s, b) for s, b in lesions.items()])
    grid = {"fit": ("grid", "model"), "margin_px": (-600.0, 0.0), "low": (0.5, 0.9)}
    res = tune_boxes(oof, truth, grid)
    assert len(res.table) == 4  # low=0.9 > high=0.75: skipped
    assert res.best_f2 == res.table["mean_f2"].max() == 1.0
    assert res.best.margin_px == 0.0 and res.table["mean_f2"].min() == 0.0  # shrinking by 600 px misses
    with pytest.raises(ConfigError, match="unknown field"):
        tune_boxes(oof, truth, {"threshold": (0.5,)})


def _miscalibrated(patches: pd.DataFrame, background: float, seed: int = 0) -> pd.DataFrame:
    """A classifier's view of perfect labels: normal tissue at ``background``, the lesion at 0.9,
    soft edges, a weaker correlated false-positive blob, per-patch noise."""
    rng = np.random.default_rng(seed)
    c, r = patches["x0"].to_numpy() // 256, patches["y0"].to_numpy() // 256
    grid = np.zeros((int(r.max()) + 1, int(c.max()) + 1))
    grid[r, c] = patches["prob"].to_numpy()
    signal = ndimage.gaussian_filter(grid, 1.0)
    yy, xx = np.mgrid[: grid.shape[0], : grid.shape[1]]
    blob = 0.5 * np.exp(-(((yy - 22) / 3) ** 2 + ((xx - 24) / 3) ** 2))  # away from the lesion
    prob = background + (0.9 - background) * np.maximum(signal / signal.max(), blob)
    prob += rng.normal(0, 0.04, grid.shape)
    return patches.assign(prob=np.clip(prob[r, c], 0, 1))


@pytest.mark.parametrize("background", [0.3, 0.55])
def test_a_miscalibrated_heatmap_gives_a_hit_relative_to_its_background(background):
    """Normal tissue at 0.3–0.6 (a real classifier's background on unseen slides): absolute
    thresholds grow the box over the slide; thresholds relative to the slide's background hit."""
    patches = _miscalibrated(oracle_patches([LESION]), background)
    hm = build_heatmap(patches)
    relative = coords(heatmap_to_boxes(hm, 1, BoxesConfig(background="slide")))
    assert giou_matrix(relative, np.array([LESION]))[0, 0] > 0.5
    local = coords(heatmap_to_boxes(hm, 1, BoxesConfig(background="local")))
    assert giou_matrix(local, np.array([LESION]))[0, 0] > 0.5
    absolute = coords(heatmap_to_boxes(hm, 1, BoxesConfig(background="none", high=0.5, low=0.3)))
    assert giou_matrix(absolute, np.array([LESION]))[0, 0] < 0.5


def test_relative_heatmap_leaves_perfect_labels_alone_and_rescales_a_shifted_one():
    hm = build_heatmap(oracle_patches([LESION]))
    same = relative_heatmap(hm, "slide")
    np.testing.assert_array_equal(same.prob, hm.prob)
    shifted = build_heatmap(oracle_patches([LESION]).assign(prob=lambda d: 0.4 + 0.5 * d["prob"]))
    np.testing.assert_allclose(relative_heatmap(shifted, "slide").prob, hm.prob, atol=1e-6)
    assert relative_heatmap(shifted, "none") is shifted


def test_margin_fraction_grows_each_side_by_that_share_of_the_box():
    hm = build_heatmap(oracle_patches([LESION]))
    tight = heatmap_to_boxes(hm, 1).iloc[0]
    loose = heatmap_to_boxes(hm, 1, BoxesConfig(margin_fraction=0.15)).iloc[0]
    w, h = tight.x2 - tight.x1, tight.y2 - tight.y1
    assert loose.x2 - loose.x1 == pytest.approx(1.3 * w, abs=2)
    assert loose.y2 - loose.y1 == pytest.approx(1.3 * h, abs=2)
    assert (loose.x1 + loose.x2) / 2 == pytest.approx((tight.x1 + tight.x2) / 2, abs=1)


def test_fitted_fill_box_hugs_a_weak_lesion_the_thresholds_missed():
    """A weak lesion (0.6, below the seed threshold) gets a fill box; fitted, it is the lesion's box
    (with the size prior), not a 943 px square around its peak."""
    strong, weak = (1500, 2500, 1500, 2500), (5200, 5700, 5300, 5800)
    patches = oracle_patches([strong, weak])
    on_weak = oracle_patches([weak])["prob"].to_numpy() > 0
    patches.loc[on_weak, "prob"] = 0.6
    hm = build_heatmap(patches)
    plain = heatmap_to_boxes(hm, 2)
    fitted = heatmap_to_boxes(hm, 2, BoxesConfig(fit_fills=True, size_prior_weight=1.0))
    assert list(plain["source"]) == list(fitted["source"]) == ["component", "fill"]
    g = [
        float(giou_matrix(b[["x1", "x2", "y1", "y2"]].to_numpy(float)[1:], np.array([weak], float))[0, 0])
        for b in (plain, fitted)
    ]
    assert g[1] > 0.5 > g[0]
