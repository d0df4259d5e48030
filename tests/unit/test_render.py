import numpy as np
import pytest
from box_fixtures import oracle_patches, truth_frame
from PIL import Image

from digilut.boxes import heatmap_to_boxes
from digilut.errors import ConfigError
from digilut.heatmap import build_heatmap
from digilut.render import PRED_COLOUR, TRUTH_COLOUR, render_heatmap_png

LESION = (2000, 3000, 3000, 3700)


def has_colour(img: np.ndarray, hex_colour: str, tol: int = 40) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(img[..., :3].astype(int) - rgb).max(axis=-1) <= tol).any())


@pytest.fixture(scope="module")
def case():
    hm = build_heatmap(oracle_patches([LESION]))
    return hm, truth_frame("s_a.tif", [LESION]), heatmap_to_boxes(hm, 2)


def test_picture_without_thumbnail_shows_truth_and_predictions(tmp_path, case):
    hm, truth, pred = case
    path = render_heatmap_png(None, (8192, 8192), hm, truth, pred, tmp_path / "a" / "s_a.png", f2=0.667)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 400 and img.shape[1] > 400
    assert has_colour(img, TRUTH_COLOUR) and has_colour(img, PRED_COLOUR)
    plain = render_heatmap_png(None, (8192, 8192), hm, None, None, tmp_path / "plain.png")
    plain_img = np.asarray(Image.open(plain).convert("RGB"))
    assert not has_colour(plain_img, TRUTH_COLOUR, tol=10) and not has_colour(plain_img, PRED_COLOUR, tol=10)


def _longest_run(mask: np.ndarray) -> int:
    """The longest horizontal run of True pixels in any row of ``mask``."""
    best = 0
    for row in mask:
        edges = np.diff(np.r_[0, row.astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        best = max(best, int((ends - starts).max(initial=0)))
    return best


def _colour_mask(img: np.ndarray, hex_colour: str, tol: int = 40) -> np.ndarray:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return np.abs(img[..., :3].astype(int) - rgb).max(axis=-1) <= tol


def test_small_tissue_on_a_big_slide_gets_a_zoom_panel(tmp_path, case):
    """The 1000 × 700 px lesion on an 83k × 197k px slide is ~4 px wide in a whole-slide panel; the
    zoom panel draws it large enough to see (its truth outline is a long line of the truth colour)."""
    hm, truth, pred = case
    thumb = np.full((400, 170, 3), 235, np.uint8)  # a 83k × 197k px slide, 1/490 scale
    two = render_heatmap_png(thumb, (83_000, 197_000), hm, truth, pred, tmp_path / "two.png")
    img = np.asarray(Image.open(two).convert("RGB"))
    run = _longest_run(_colour_mask(img, TRUTH_COLOUR))
    assert run >= 40, f"the lesion's outline is at most {run} px wide: no zoom on it"
    panel_h = img.shape[0]
    assert img.shape[1] > panel_h * 170 / 400 * 1.5  # the thin slide panel plus the zoom beside it


def test_grey_thumbnail_and_no_heatmap_work(tmp_path):
    path = render_heatmap_png(
        np.full((50, 80), 200, np.uint8), (8000, 5000), None, None, None, tmp_path / "g.png", "just a slide"
    )
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    grey = (np.abs(img - 200) <= 2).all(axis=-1)  # the single-channel thumbnail, drawn as grey
    assert grey.sum() > 0.2 * grey.size
    assert (
        not _colour_mask(img, TRUTH_COLOUR, tol=10).any() and not _colour_mask(img, PRED_COLOUR, tol=10).any()
    )


@pytest.mark.parametrize(
    ("size", "thumb", "message"),
    [
        ((0, 100), None, "level0_size=\\(0, 100\\)"),
        ((100, 100), np.zeros((2, 2, 2, 2)), "thumbnail has shape"),
    ],
)
def test_bad_inputs_raise(tmp_path, size, thumb, message):
    with pytest.raises(ConfigError, match=message):
        render_heatmap_png(thumb, size, None, None, None, tmp_path / "x.png")
