import numpy as np
import openslide
import pytest
import tifffile

from digilut.errors import SlideMetadataError, SlideNotFoundError, SlideReadError
from digilut.slide import LevelReader, choose_level, read_slide_info
from digilut.synth import SynthConfig, plan_slide, write_slide


@pytest.fixture(scope="module")
def plan():
    return plan_slide("p_a.tif", SynthConfig(), seed=3, positive=True)


def test_info_levels_and_mpp(tiny_data):
    path = sorted((tiny_data / "images").iterdir())[0]
    info = read_slide_info(path)
    assert info.mpp == pytest.approx(0.25)
    assert [lv.downsample for lv in info.levels] == [1.0, 2.0, 4.0]
    assert choose_level(info, 0.5).level == 1 and choose_level(info, 0.5).scale == 1.0


def test_level_reader_matches_openslide_everywhere(tiny_data):
    path = sorted((tiny_data / "images").iterdir())[1]
    info = read_slide_info(path)
    osl = openslide.OpenSlide(path)
    rng = np.random.default_rng(0)
    with LevelReader(info, 1) as reader:
        for _ in range(6):
            x, y = int(rng.integers(0, 2048 - 300)), int(rng.integers(0, 1536 - 300))
            ours = reader.read(x, y, 300, 200)
            theirs = np.asarray(osl.read_region((x * 2, y * 2), 1, (300, 200)))[..., :3]
            assert np.array_equal(ours, theirs)


def test_slide_without_a_matching_level_is_read_from_a_finer_one(tmp_path, plan):
    path = write_slide(plan, tmp_path / "p_a.tif", mpp=0.3)
    choice = choose_level(read_slide_info(path), 0.5)
    assert choice.level == 0 and choice.scale == pytest.approx(0.5 / 0.3)


def test_missing_mpp_says_how_to_pass_it(tmp_path, plan):
    path = write_slide(plan, tmp_path / "p_a.tif", mpp=None)
    with pytest.raises(SlideMetadataError, match="--slide-mpp"):
        read_slide_info(path)
    assert read_slide_info(path, mpp=0.25).mpp == 0.25


def test_implausible_mpp_is_refused(tmp_path, plan):
    path = write_slide(plan, tmp_path / "p_a.tif", mpp=19.0)  # 4096 px × 19 µm = 78 mm: fine
    assert read_slide_info(path).mpp == 19.0
    with pytest.raises(SlideMetadataError, match="mm wide, more than a 80 mm glass slide"):
        read_slide_info(path, mpp=20.0)
    with pytest.raises(SlideMetadataError, match="outside the plausible range"):
        read_slide_info(path, mpp=50.0)


def test_not_a_tiff_empty_and_missing(tmp_path):
    (tmp_path / "z.tif").write_bytes(b"")
    with pytest.raises(SlideReadError, match="0 bytes"):
        read_slide_info(tmp_path / "z.tif")
    (tmp_path / "png.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(SlideReadError, match="not a readable TIFF"):
        read_slide_info(tmp_path / "png.tif")
    with pytest.raises(SlideNotFoundError):
        read_slide_info(tmp_path / "nope.tif")


def test_truncated_slide_raises_naming_the_tile(tmp_path, plan):
    path = write_slide(plan, tmp_path / "p_a.tif")
    with tifffile.TiffFile(path) as tif:
        # Cut the file inside level 1's data (pages and their IFDs are written level by level).
        cut = int(tif.pages[1].dataoffsets[-1])
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    try:
        info = read_slide_info(path)
    except SlideReadError:
        return  # tifffile may already refuse the file: also a clear, specific error
    with LevelReader(info, 1) as reader, pytest.raises(SlideReadError, match=r"level 1 tile .*truncated"):
        reader.read(0, 0, info.levels[1].width, info.levels[1].height)
