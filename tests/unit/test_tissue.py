"""pyFAST tissue masks on every kind of slide, and the pyFAST ``PatchGenerator`` failures that are
why patch pixels come from digilut's own tiled reader (README, "Extraction")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from slide_fixtures import resolution, write_pyramid

from digilut.extract import ExtractConfig, extract_slide
from digilut.level_reader import LevelReader
from digilut.slide import read_slide_info
from digilut.tissue import tissue_mask

MPP = 0.25
BORDER_PX = 400  # a black scan border along the top and left edges, level-0 px


@pytest.fixture(scope="module")
def bordered(tiny_data: Path) -> np.ndarray:
    """A synthetic slide's level 0 (4096×3072 px) with a 400-px black scan border on two sides."""
    level0 = tifffile.imread(sorted((tiny_data / "images").iterdir())[0])
    level0[:BORDER_PX] = 0
    level0[:, :BORDER_PX] = 0
    return level0


def test_black_scan_border_is_not_tissue_on_tiled_and_striped_slides(bordered: np.ndarray, tmp_path: Path):
    tiled = write_pyramid(tmp_path / "tiled_a.tif", bordered)
    striped = tmp_path / "striped_a.tif"
    tifffile.imwrite(
        striped, bordered, rowsperstrip=64, compression="jpeg", photometric="rgb", **resolution(MPP)
    )
    assert not read_slide_info(striped).levels[0].tiled
    rows = {}
    for path in (tiled, striped):
        r = extract_slide(path, tmp_path / "out", ExtractConfig())
        assert r.status == "ok" and r.patches >= 8, r
        rows[path.name] = pd.read_parquet(tmp_path / "out" / "parts" / f"{path.stem}.parquet")
    for name, m in rows.items():
        on_border = m[(m.x0 < BORDER_PX) | (m.y0 < BORDER_PX)]
        assert on_border.empty, f"{name}: {len(on_border)} patches on the black border kept as tissue"
    # Both paths see the same tissue: same grid cells kept, give or take the mask's scale.
    a, b = (set(zip(m.x0, m.y0, strict=True)) for m in rows.values())
    assert len(a ^ b) <= max(2, len(a) // 10), (len(a), len(b), len(a ^ b))


def test_mask_of_an_overview_equals_pyfasts_own_whole_slide_mask(bordered: np.ndarray, tmp_path: Path):
    """The in-memory overview path gives pyFAST's result on a pyramid it opens itself."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import fast

    path = write_pyramid(tmp_path / "p_a.tif", bordered)
    info = read_slide_info(path)
    coarsest = info.levels[-1]
    with LevelReader(info, coarsest.index) as reader:
        overview = reader.read(0, 0, coarsest.width, coarsest.height)
    ours = tissue_mask(overview, info.width, info.height)
    importer = fast.WholeSlideImageImporter.create(str(path))
    seg = fast.TissueSegmentation.create(useColorThresholdingMethod=True, threshold=85).connect(importer)
    theirs = np.asarray(seg.runAndGetOutputData())
    assert np.array_equal(ours.mask, theirs.reshape(theirs.shape[:2]) > 0)
    assert ours.scale_x == ours.scale_y == 4.0
    assert not ours.mask[: BORDER_PX // 4 - 10].any() and ours.mask.mean() > 0.1  # 9 px dilation


def test_black_and_near_white_are_background_tissue_colours_are_not():
    rgb = np.full((120, 160, 3), 255, np.uint8)
    rgb[:30] = 0  # scan border
    rgb[60:100, 40:120] = (190, 90, 170)  # H&E pink
    rgb[30:40, 100:160] = (235, 235, 235)  # glass, distance 35 from white: below the threshold 85
    m = tissue_mask(rgb, 1600, 1200)
    assert (m.scale_x, m.scale_y) == (10.0, 10.0)
    assert not m.mask[:30].any() and not m.mask[30:40, 130:].any()
    assert m.mask[60:100, 40:120].all()
    assert m.fractions(np.array([400, 0]), np.array([600, 0]), np.array([800, 1600]), np.array([400, 300]))[
        0
    ] == pytest.approx(1.0)


# --- why patch pixels do not come from pyFAST's PatchGenerator (pinned pyfast 4.18.0) ----------------


def _patch_generator(path: Path, level: int, **kwargs: object):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import fast

    fast.Reporter.setGlobalReportMethod(fast.Reporter.NONE)
    importer = fast.WholeSlideImageImporter.create(str(path))
    gen = fast.PatchGenerator.create(256, 256, level=level, **kwargs).connect(0, importer)
    return fast, importer, gen


def test_pyfast_patch_generator_returns_black_patches_for_garbled_tiles_without_error(
    bordered: np.ndarray, tmp_path: Path
):
    path = write_pyramid(tmp_path / "g_a.tif", bordered)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:  # zero the last two thirds of every level-1 JPEG tile
        for off, n in zip(tif.pages[1].dataoffsets, tif.pages[1].databytecounts, strict=True):
            data[off + n // 3 : off + n - 2] = bytes(n - 2 - n // 3)
    path.write_bytes(bytes(data))
    fast, _, gen = _patch_generator(path, 1)
    patches = [np.asarray(p) for p in fast.DataStream(gen)]
    assert len(patches) == 48 and all(p.max() == 0 for p in patches)  # all black, no error raised


def test_pyfast_patch_generator_overlap_with_a_tissue_mask_fails_at_the_slide_edge(
    bordered: np.ndarray, tmp_path: Path
):
    path = write_pyramid(tmp_path / "o_a.tif", bordered)
    fast, importer, gen = _patch_generator(path, 1, overlapPercent=0.5, maskThreshold=0.5)
    gen.connect(1, fast.TissueSegmentation.create(useColorThresholdingMethod=True).connect(importer))
    with pytest.raises(RuntimeError, match="Width must be larger than 0"):
        for _ in fast.DataStream(gen):
            pass


def _mask_with_fresh_kernel_cache(cache_dir: str) -> tuple[int, int]:
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import fast

    fast.Config.setKernelBinaryPath(cache_dir)  # a new installation's empty kernel cache
    rgb = np.full((96, 128, 3), 240, np.uint8)
    rgb[20:70, 30:100] = (150, 60, 140)
    mask = tissue_mask(rgb, 1280, 960)
    return int(mask.mask.sum()), mask.mask.size


def test_parallel_first_use_of_a_fresh_kernel_cache_does_not_fail(tmp_path: Path) -> None:
    """Extraction workers of a new installation build pyFAST's OpenCL kernels at once into one
    cache; unguarded, a reader of a half-written binary failed a slide ("Error parsing OpenCL binary
    cache file", seen in a CI run: the demo then lost a lesion patient). Three processes race here."""
    import multiprocessing as mp

    cache = tmp_path / "kernel_binaries"
    cache.mkdir()
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_mask_with_fresh_kernel_cache, [f"{cache}/"] * 3)
    assert len(set(results)) == 1 and 0 < results[0][0] < results[0][1]
    assert any(cache.iterdir()), "pyFAST wrote its kernel binaries to the fresh cache"
