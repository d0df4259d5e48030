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


def test_small_tissue_on_a_big_slide_gets_a_zoom_panel(tmp_path, case):
    hm, truth, pred = case
    thumb = np.full((400, 170, 3), 235, np.uint8)  # a 83k × 197k px slide, 1/490 scale
    one = render_heatmap_png(thumb, (8192, 8192), hm, truth, pred, tmp_path / "one.png")
    two = render_heatmap_png(thumb, (83_000, 197_000), hm, truth, pred, tmp_path / "two.png")
    w_one, w_two = Image.open(one).size[0], Image.open(two).size[0]
    assert w_two > w_one  # the whole slide plus a zoom on the tissue


def test_grey_thumbnail_and_no_heatmap_work(tmp_path):
    path = render_heatmap_png(
        np.full((50, 80), 200, np.uint8), (8000, 5000), None, None, None, tmp_path / "g.png", "just a slide"
    )
    assert Image.open(path).format == "PNG"


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
