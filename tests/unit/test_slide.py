import shutil

import numpy as np
import openslide
import pytest
import tifffile
from slide_fixtures import write_pyramid

from digilut.errors import SlideMetadataError, SlideNotFoundError, SlideReadError
from digilut.extract import ExtractConfig, extract_slide
from digilut.level_reader import LevelReader
from digilut.reference_data import cmu_small_region_svs
from digilut.slide import choose_level, read_slide_info
from digilut.synth_plan import SynthConfig, plan_slide
from digilut.synth_render import write_slide


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


def _tile_count_offset(path, page_index: int, tile: int) -> tuple[int, int]:
    """File offset and byte width of one tile's entry in a page's TileByteCounts array."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page_index].tags["TileByteCounts"]
        width = 8 if tif.is_bigtiff else 4
        assert tag.count > 1 and tag.dtype in (4, 16)  # LONG / LONG8 array stored at valueoffset
        return tag.valueoffset + tile * width, width


def test_truncated_slide_raises_naming_the_tile(tmp_path, plan):
    """Truncations that only a tile read sees: the metadata is intact (``read_slide_info`` accepts
    the slide) and one tile's data is missing — a writer interrupted before it wrote that tile (its
    byte count is 0) — or the file was cut after the slide was opened."""
    path = write_slide(plan, tmp_path / "p_a.tif")
    with tifffile.TiffFile(path) as tif:
        n_tiles = len(tif.pages[1].dataoffsets)  # level 1: 2048 × 1536 px = 4 × 3 tiles of 512
    last = n_tiles - 1
    at, width = _tile_count_offset(path, 1, last)
    data = bytearray(path.read_bytes())
    data[at : at + width] = bytes(width)  # the last tile of level 1: never written
    path.write_bytes(bytes(data))
    info = read_slide_info(path)  # nothing to see at page level
    with LevelReader(info, 1) as reader:
        reader.read(0, 0, 512, 512)  # the other tiles read fine
        with pytest.raises(
            SlideReadError,
            match=r"p_a\.tif level 1 tile \(3, 2\): tile data missing or beyond the end of the file "
            r"\(truncated slide\?\)",
        ):
            reader.read(info.levels[1].width - 512, info.levels[1].height - 512, 512, 512)

    # cut inside level 1's last tile after the slide was opened (a file replaced while read)
    whole = write_slide(plan, tmp_path / "q_a.tif")
    info = read_slide_info(whole)
    with tifffile.TiffFile(whole) as tif:
        cut = int(tif.pages[1].dataoffsets[last]) + 10
    whole.write_bytes(whole.read_bytes()[:cut])
    with (
        LevelReader(info, 1) as reader,
        pytest.raises(
            SlideReadError, match=r"q_a\.tif level 1 tile \(3, 2\): tile data missing or beyond the end"
        ),
    ):
        reader.read(0, 0, info.levels[1].width, info.levels[1].height)


def test_real_aperio_svs_one_level_with_label_and_macro_beside_it(tmp_path):
    """CMU-1-Small-Region (CC0): 2220×2967 px at 0.499 µm/px; thumbnail, label and macro pages are
    in the same file and must not become levels."""
    path = cmu_small_region_svs(fetch=False)
    info = read_slide_info(path)
    assert (info.width, info.height, info.mpp) == (2220, 2967, pytest.approx(0.499))
    assert [(lv.width, lv.height, lv.downsample, lv.tiled) for lv in info.levels] == [(2220, 2967, 1.0, True)]
    with tifffile.TiffFile(path) as tif:
        assert [s.name for s in tif.series] == ["Baseline", "Thumbnail", "Label", "Macro"]
        truth = tif.series[0].asarray()
    with LevelReader(info, 0) as reader:
        assert np.array_equal(reader.read(1000, 1500, 300, 200), truth[1500:1700, 1000:1300])
    choice = choose_level(info, 0.5)
    assert (choice.level, choice.scale) == (0, 1.0)
    shutil.copy(path, tmp_path / "cmu_a.tif")  # DigiLut slide names end in .tif
    r = extract_slide(tmp_path / "cmu_a.tif", tmp_path / "out", ExtractConfig())  # real H&E tissue
    assert r.status == "ok" and 20 < r.patches < 90, r


def test_subifd_pyramid_is_read_like_the_same_pyramid_in_pages(tmp_path, tiny_data):
    level0 = tifffile.imread(sorted((tiny_data / "images").iterdir())[0])[:1536, :2048]
    sub = write_pyramid(tmp_path / "sub_a.tif", level0, subifds=True)
    flat = write_pyramid(tmp_path / "pages_a.tif", level0)
    with tifffile.TiffFile(sub) as tif:
        assert len(tif.pages) == 1 and len(tif.pages[0].pages) == 2  # the reduced levels are SubIFDs
    a, b = read_slide_info(sub), read_slide_info(flat)
    assert [lv.downsample for lv in a.levels] == [lv.downsample for lv in b.levels] == [1.0, 2.0, 4.0]
    for lv in a.levels:
        with LevelReader(a, lv.index) as ra, LevelReader(b, lv.index) as rb:
            assert np.array_equal(ra.read(0, 0, lv.width, lv.height), rb.read(0, 0, lv.width, lv.height))
    assert choose_level(a, 1.0).level == 2


def test_implausible_mpp_in_the_file_says_how_to_pass_the_right_one(tmp_path, plan):
    path = write_slide(plan, tmp_path / "p_a.tif", mpp=0.01)
    with pytest.raises(
        SlideMetadataError, match=r"mpp=0\.01 µm/px is outside .* \(read from the file\).*--slide-mpp"
    ):
        read_slide_info(path)
    assert read_slide_info(path, mpp=0.25).mpp == 0.25
