import hashlib

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

from digilut.annotations import list_slides, read_boxes_csv
from digilut.errors import ConfigError
from digilut.synth import synth_dataset
from digilut.synth_plan import SynthConfig, plan_slide


def test_dataset_layout_csv_and_pyramid(tiny_data):
    slides = sorted(p.name for p in (tiny_data / "images").iterdir())
    assert len(slides) == 6 and all(s.endswith(("_a.tif", "_b.tif")) for s in slides)
    table = read_boxes_csv(tiny_data / "train.csv", slides=list_slides(tiny_data / "images"))
    assert not table.problems and len(table.rows) >= 1
    path = tiny_data / "images" / slides[0]
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert pages[0].is_tiled and pages[0].compression == 7  # JPEG
        assert [p.subfiletype for p in pages] == [0] + [1] * (len(pages) - 1)
        assert max(pages[-1].shape[:2]) <= 1024
    osl = openslide.OpenSlide(path)
    assert osl.level_count == len(pages)
    assert osl.level_downsamples[:3] == (1.0, 2.0, 4.0)
    assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_each_reduced_level_is_the_area_average_of_the_finer_one(tiny_data):
    """As scanners write pyramids: the garbled-tile check compares levels, so they must agree."""
    from digilut.level_reader import LevelReader
    from digilut.slide import read_slide_info

    info = read_slide_info(sorted((tiny_data / "images").iterdir())[0])
    finer = None
    for lv in info.levels:
        with LevelReader(info, lv.index) as reader:
            px = reader.read(0, 0, lv.width, lv.height).astype(np.float32)
        if finer is not None:
            h, w = px.shape[:2]
            average = finer[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
            diff = np.abs(average - px)
            assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12  # JPEG noise only
            # not trivially so: the level has tissue texture, not glass only
            assert px.std() > 10
        finer = px


def test_fast_reads_the_pyramid_and_its_spacing(tiny_data):
    import fast

    path = sorted((tiny_data / "images").iterdir())[0]
    wsi = fast.WholeSlideImageImporter.create(str(path)).runAndGetOutputData()
    assert wsi.getNrOfLevels() == 3
    assert wsi.getSpacing()[0] == pytest.approx(0.00025)  # mm per level-0 pixel


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    def digest(out):
        synth_dataset(out, SynthConfig(patients=1, seed=5))
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").iterdir()}

    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    synth_dataset(tmp_path / "c", SynthConfig(patients=1, seed=6))
    assert sorted(p.name for p in (tmp_path / "c" / "images").iterdir()) != sorted(digest(tmp_path / "a"))


def test_lesions_are_darker_and_denser_than_tissue_around_them(tiny_data):
    """Inside every lesion box: darker than the tissue in a ring around it, and more nuclei (dark
    purple pixels) per area — what the classifier must learn to see."""
    boxes = pd.read_csv(tiny_data / "train.csv")
    assert len(boxes) >= 2
    compared = 0
    for row in boxes.itertuples():
        osl = openslide.OpenSlide(tiny_data / "images" / row.filename)
        x1, x2, y1, y2 = row.x1, row.x2, row.y1, row.y2
        m = 256  # the ring around the box
        rx, ry = max(0, x1 - m), max(0, y1 - m)
        w, h = min(row.max_x, x2 + m) - rx, min(row.max_y, y2 + m) - ry
        img = np.asarray(osl.read_region((int(rx), int(ry)), 0, (int(w), int(h))))[..., :3].astype(float)
        inner = np.zeros(img.shape[:2], bool)
        cx, cy, qx, qy = x1 - rx, y1 - ry, (x2 - x1) // 4, (y2 - y1) // 4
        inner[cy + qy : cy + 3 * qy, cx + qx : cx + 3 * qx] = True  # the lesion's core
        ring = np.ones_like(inner)
        ring[max(0, cy - 32) : cy + (y2 - y1) + 32, max(0, cx - 32) : cx + (x2 - x1) + 32] = False
        tissue = img.mean(axis=2) < 225  # not glass
        ring &= tissue
        if ring.sum() < 2000:
            continue  # a box at a tissue edge: too little tissue around it to compare
        nuclei = img.mean(axis=2) < 110
        assert img[inner].mean() < img[ring].mean() - 15, row.filename
        assert nuclei[inner].mean() > 2 * nuclei[ring].mean(), row.filename
        compared += 1
    assert compared >= 2


def test_box_sizes_follow_the_real_distribution():
    sides = []
    cfg = SynthConfig(size="demo", max_boxes_per_slide=5)
    for seed in range(12):
        for x1, x2, y1, y2 in plan_slide("p_a.tif", cfg, seed, positive=True).boxes:
            sides.append(np.sqrt((x2 - x1) * (y2 - y1)))
    assert 600 < np.median(sides) < 1400  # real median 943 px


def test_lesions_lie_as_close_together_as_on_real_slides():
    """Real DigiLut boxes: 2.2 % overlap another box of the slide, 12.5 % lie within 512 px of one,
    25.7 % within 2048 px (nearest-neighbour Chebyshev gap). Lesions packed closer merge on the
    heatmap far more often than on real slides (the old layout had 40 % within 512 px)."""
    cfg = SynthConfig(size="demo")
    gaps, n = [], 0
    for seed in range(150):
        boxes = plan_slide("p_a.tif", cfg, seed, positive=True).boxes
        n += len(boxes)
        for i, a in enumerate(boxes):
            others = [
                max(max(a[0], b[0]) - min(a[1], b[1]), max(a[2], b[2]) - min(a[3], b[3]))
                for j, b in enumerate(boxes)
                if j != i
            ]
            gaps += [min(others)] if others else []
    share = {t: sum(g < t for g in gaps) / n for t in (0, 512, 2048)}
    assert 0.0 < share[0] < 0.06
    assert 0.07 < share[512] < 0.18
    assert 0.18 < share[2048] < 0.33


def test_config_is_validated():
    with pytest.raises(ConfigError, match="size='huge'"):
        SynthConfig(size="huge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="patients=0"):
        SynthConfig(patients=0)
