"""Bad slides and bad names (issue 7's matrix): each fixture is built here, at run time, from a
synthetic slide; each test asserts the error names the slide (and tile, size or value) and that the
other slides still finish."""

from __future__ import annotations

import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from digilut.errors import SlideMetadataError, SlideReadError, UnsafePathError
from digilut.extract import (
    ExtractConfig,
    extract_slide,
    extract_slides,
)
from digilut.garbled import GARBLED_MEAN_DIFF, LevelCalibration, calibrate_levels
from digilut.level_reader import LevelReader
from digilut.locations import fetch_slides
from digilut.manifest import read_manifest, read_patch
from digilut.slide import read_slide_info
from digilut.steps.prepare import prepare_step
from digilut.synth_plan import SynthConfig, plan_slide
from digilut.synth_render import write_slide

MPP = 0.25
RES = {"resolution": (1e4 / MPP, 1e4 / MPP), "resolutionunit": "CENTIMETER"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``good_a.tif`` (a tiled pyramid with tissue and a lesion) and ``blank_a.tif`` (no tissue)."""
    d = tmp_path_factory.mktemp("slides")
    plan = plan_slide("good_a.tif", SynthConfig(), seed=3, positive=True)
    write_slide(plan, d / "good_a.tif")
    assert plan.boxes, "the good slide needs a lesion"
    (d / "good_boxes.csv").write_text(
        "".join(f"good_a.tif,{x1},{x2},{y1},{y2},4096,3072\n" for x1, x2, y1, y2 in plan.boxes)
    )
    plan.tissue[:] = 0
    plan.lesion[:] = 0
    write_slide(plan, d / "blank_a.tif")
    return d


@pytest.fixture(scope="module")
def level0(slides: Path) -> np.ndarray:
    info = read_slide_info(slides / "good_a.tif")
    with LevelReader(info, 0) as reader:
        return reader.read(0, 0, info.width, info.height)


def _folder(tmp_path: Path, slides: Path, *names: str) -> Path:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for n in names:
        shutil.copy(slides / n, images / n)
    return images


def _garble(path: Path, level: int, how: str) -> None:
    """Overwrite the last two thirds of every JPEG tile of ``level`` (keeping the EOI marker)."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
            start, end = off + n // 3, off + n - 2
            fill = (
                rng.integers(0, 256, end - start, dtype=np.uint8) if how == "random" else bytes(end - start)
            )
            data[start:end] = bytes(fill)
    path.write_bytes(bytes(data))


# --- 1. truncated -------------------------------------------------------------------------------------


def test_slides_truncated_at_60_and_99_percent_are_refused_naming_the_cut(
    slides: Path, tmp_path: Path
) -> None:
    images = _folder(tmp_path, slides, "good_a.tif")
    whole = (slides / "good_a.tif").read_bytes()
    for pct in (60, 99):
        (images / f"cut{pct}_a.tif").write_bytes(whole[: len(whole) * pct // 100])
    results = extract_slides(sorted(images.iterdir()), tmp_path / "out", ExtractConfig(), workers=0)
    for pct in (60, 99):
        r = results[f"cut{pct}_a.tif"]
        assert r.status == "failed" and f"cut{pct}_a.tif: truncated: page" in r.error
        assert f"but the file has {len(whole) * pct // 100:,} bytes" in r.error
        assert not (tmp_path / "out" / "shards" / f"cut{pct}_a.shard").exists()
    assert results["good_a.tif"].status == "ok" and results["good_a.tif"].patches > 0


# --- 2. garbled JPEG tiles ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("random", r"good_a\.tif level 1 tile \(\d+, \d+\): cannot decode"),  # the codec notices
        # zeroed entropy data decodes without any error, to grey: caught by the level-2 comparison
        (
            "zeros",
            r"good_a\.tif: \d+ of \d+ tissue patches are unreadable \(garbled .*level 1 tile \(\d+, \d+\)",
        ),
    ],
)
def test_garbled_tiles_fail_the_slide_naming_the_tile_not_black_patches(
    slides: Path, tmp_path: Path, how: str, expected: str
) -> None:
    path = tmp_path / "good_a.tif"
    shutil.copy(slides / "good_a.tif", path)
    _garble(path, 1, how)  # level 1 = 0.5 µm/px, where the patches are read
    with pytest.raises(SlideReadError, match=expected):
        extract_slide(path, tmp_path / "out", ExtractConfig())
    assert not (tmp_path / "out" / "shards").exists()  # nothing half-written


def test_intact_slide_has_no_patch_flagged_as_garbled(slides: Path, tmp_path: Path) -> None:
    r = extract_slide(slides / "good_a.tif", tmp_path, ExtractConfig(stride_px=64))
    assert r.status == "ok" and r.patches > 40 and r.warning == ""


def _rewrite_pyramid(src: Path, dst: Path, restyle: dict[int, tuple[int, object]]) -> Path:
    """Copy the pyramid ``src`` to ``dst`` level by level; ``restyle[level] = (jpeg quality, f)``
    writes that level as ``f(pixels)`` at that quality (the others at quality 85)."""
    info = read_slide_info(src)
    with tifffile.TiffWriter(dst) as tif:
        for lv in info.levels:
            with LevelReader(info, lv.index) as reader:
                px = reader.read(0, 0, lv.width, lv.height)
            quality, f = restyle.get(lv.index, (85, None))
            px = f(px) if callable(f) else px
            res = 1e4 / (MPP * lv.downsample)
            tif.write(
                px,
                tile=(512, 512),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                subfiletype=0 if lv.index == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return dst


def test_intact_slide_whose_coarse_level_has_other_jpeg_quality_and_colour_is_accepted_whole(
    slides: Path, tmp_path: Path
) -> None:
    """Levels encoded or colour-processed differently (a scanner's or converter's gamma and white
    balance on the reduced levels) differ by a consistent map: no intact patch may be lost."""

    def gamma_and_tint(px: np.ndarray) -> np.ndarray:
        out = 255 * (px / 255.0) ** (1 / 1.3) + np.array([-12, 10, -8])
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    path = _rewrite_pyramid(slides / "good_a.tif", tmp_path / "shifted_a.tif", {2: (60, gamma_and_tint)})
    # The patches (level 1) are checked against level 2: its colour is off by up to ~30 per channel.
    info = read_slide_info(path)
    with LevelReader(info, 1) as fine, LevelReader(info, 2) as coarse:
        l1, l2 = fine.read(0, 0, 2048, 1536).astype(float), coarse.read(0, 0, 1024, 768).astype(float)
    tissue = l2.mean(axis=2) < 215
    diff = np.abs(l1.reshape(768, 2, 1024, 2, 3).mean(axis=(1, 3)) - l2)[tissue]
    assert np.percentile(diff.max(axis=1), 50) > 24  # beyond the fixed threshold for most patches
    r = extract_slide(path, tmp_path / "out", ExtractConfig(stride_px=64))
    assert r.status == "ok" and r.warning == "" and r.patches > 40
    m = read_manifest(tmp_path / "out" / "parts" / "shifted_a.parquet")
    assert len(m) == r.patches  # every tissue cell kept: nothing dropped as garbled


def _zero_tile_tail(path: Path, level: int, tile: tuple[int, int]) -> None:
    """Zero the last two thirds of one JPEG tile's entropy data: it decodes without error, to grey."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        idx = tile[1] * -(-page.shape[1] // page.tilewidth) + tile[0]
        off, n = page.dataoffsets[idx], page.databytecounts[idx]
        data[off + n // 3 : off + n - 2] = bytes(n - 2 - n // 3)
    path.write_bytes(bytes(data))


def test_a_few_garbled_patches_are_dropped_and_listed_in_the_warning(slides: Path, tmp_path: Path) -> None:
    """Below ``max_constant_fraction`` bad patches the slide is kept without them: the dropped ones
    are exactly those over the garbled tile, named in the warning; above it the slide fails."""
    intact = extract_slide(slides / "good_a.tif", tmp_path / "intact", ExtractConfig(stride_px=64))
    before = read_manifest(tmp_path / "intact" / "parts" / "good_a.parquet")
    # one level-1 tile (512 px = 1024 level-0 px) holding tissue, found from the intact patches
    tx, ty = int(before.x0.median()) // 1024, int(before.y0.median()) // 1024
    path = tmp_path / "good_a.tif"
    shutil.copy(slides / "good_a.tif", path)
    _zero_tile_tail(path, 1, (tx, ty))
    r = extract_slide(path, tmp_path / "out", ExtractConfig(stride_px=64, max_constant_fraction=0.3))
    n = intact.patches - r.patches
    assert r.status == "ok" and 0 < n <= 0.3 * intact.patches
    assert r.warning.startswith(f"{n} unreadable tissue patches dropped (garbled (colour off by ")
    assert f"level 1 tile ({tx}, {ty})" in r.warning
    after = read_manifest(tmp_path / "out" / "parts" / "good_a.parquet")
    key = ["x0", "y0"]
    dropped = before.merge(after[key], on=key, how="left", indicator=True).query("_merge == 'left_only'")
    assert len(dropped) == n and set(map(tuple, after[key].values)) <= set(map(tuple, before[key].values))
    # each dropped patch overlaps the garbled part of the tile (zeroed data decodes as the last
    # block's colour, then grey, from about a quarter of the tile down)
    t0x, t0y = tx * 1024, ty * 1024
    assert ((dropped.x0 < t0x + 1024) & (dropped.x0 + dropped.w0 > t0x)).all()
    assert ((dropped.y0 < t0y + 1024) & (dropped.y0 + dropped.h0 > t0y + 1024 // 4)).all()
    with pytest.raises(SlideReadError, match=rf"good_a\.tif: {n} of \d+ tissue patches are unreadable"):
        extract_slide(path, tmp_path / "strict", ExtractConfig(stride_px=64))  # default: 2 %


def test_a_mostly_garbled_level_is_not_calibrated_into_looking_intact() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(150, 230, (100, 3))
    patch = ref + rng.normal(0, 2, (100, 3))
    patch[:60] = 128 + rng.normal(0, 3, (60, 3))  # 60 % of the patches decode to grey
    cal = calibrate_levels(patch, ref)
    assert cal == LevelCalibration()  # no map most patches follow: judged as they are
    assert (cal.colour_off(patch, ref) > GARBLED_MEAN_DIFF).sum() >= 60
    shifted = 255 * (ref / 255) ** (1 / 1.3) + np.array([-12, 10, -8])  # a consistent level difference
    shifted[:5] = 128  # and 5 % grey patches
    cal = calibrate_levels(shifted, ref)
    assert np.flatnonzero(cal.colour_off(shifted, ref) > GARBLED_MEAN_DIFF).tolist() == [0, 1, 2, 3, 4]


# --- 3./4. non-pyramidal and striped TIFFs; 9. huge ones ---------------------------------------------


def test_non_pyramidal_slide_is_read_with_bounded_memory(
    slides: Path, level0: np.ndarray, tmp_path: Path
) -> None:
    flat = tmp_path / "flat_a.tif"
    tifffile.imwrite(flat, level0, tile=(256, 256), compression="jpeg", photometric="rgb", **RES)
    assert len(read_slide_info(flat).levels) == 1
    pyramid = extract_slide(slides / "good_a.tif", tmp_path / "pyr", ExtractConfig())
    level_bytes = level0.nbytes
    del level0
    tracemalloc.start()
    try:
        # a bound 10× below the level's size: the level is never decoded whole (pyFAST masks a streamed copy)
        r = extract_slide(flat, tmp_path / "flat", ExtractConfig(), max_level_px=level_bytes // 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == "ok" and r.level == 0 and r.scale == 2.0
    assert peak < level_bytes / 2, f"peak {peak / 2**20:.1f} MiB vs level {level_bytes / 2**20:.1f} MiB"
    assert abs(r.patches - pyramid.patches) <= max(2, pyramid.patches // 5)
    m = pd.read_parquet(tmp_path / "flat" / "parts" / "flat_a.parquet")
    assert (m.w0 == 512).all()  # 256 px at 0.5 µm/px from a 0.25 µm/px level, resized


def test_striped_slide_is_read_strip_by_strip(slides: Path, level0: np.ndarray, tmp_path: Path) -> None:
    striped = tmp_path / "strip_a.tif"
    tifffile.imwrite(striped, level0, rowsperstrip=64, compression="jpeg", photometric="rgb", **RES)
    info = read_slide_info(striped)
    assert not info.levels[0].tiled
    r = extract_slide(striped, tmp_path / "out", ExtractConfig())  # pyFAST masks its streamed overview
    tiled = extract_slide(slides / "good_a.tif", tmp_path / "pyr", ExtractConfig())
    assert r.status == "ok" and abs(r.patches - tiled.patches) <= max(2, tiled.patches // 5)
    m = read_manifest(tmp_path / "out" / "parts" / "strip_a.parquet")
    row = m.iloc[0]
    x, y = int(row.x0), int(row.y0)
    truth = level0[y : y + 512 : 2, x : x + 512 : 2].astype(int)  # nearly (box vs nearest resize)
    assert np.abs(read_patch(tmp_path / "out", row).astype(int) - truth).mean() < 12


def _header_only_tiff(path: Path, width: int, height: int) -> Path:
    """A TIFF whose one JPEG strip claims ``width × height`` px (0.25 µm/px); the data is 16 bytes."""
    entries = [  # tag, type, count, value
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 7),  # JPEG
        (262, 3, 1, 2),  # RGB
        (273, 4, 1, 8),  # strip offset: right after the header
        (277, 3, 1, 3),
        (278, 4, 1, height),  # one strip
        (279, 4, 1, 16),
        (282, 5, 1, 0),  # XResolution: rational, patched below
        (296, 3, 1, 3),  # CENTIMETER
    ]
    ifd_at = 8 + 16
    rational_at = ifd_at + 2 + 12 * len(entries) + 4
    body = bytearray(struct.pack("<2sHI", b"II", 42, ifd_at) + bytes(16))
    body += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 282:
            value = rational_at
        fmt = "<HHIHH" if typ == 3 else "<HHII"
        body += (
            struct.pack(fmt, tag, typ, count, value, 0)
            if typ == 3
            else struct.pack(fmt, tag, typ, count, value)
        )
    body += struct.pack("<I", 0) + struct.pack("<II", 40000, 1)  # 40000 px/cm = 0.25 µm/px
    path.write_bytes(bytes(body))
    return path


def test_huge_slides_are_refused_naming_the_size(tmp_path: Path) -> None:
    huge = _header_only_tiff(tmp_path / "huge_a.tif", 1_000_000, 900_000)
    with pytest.raises(
        SlideMetadataError, match=r"huge_a\.tif: 1000000×900000 px is larger than any slide scan"
    ):
        read_slide_info(huge)
    # Within the size limit but stored as one strip: decoding it would need 252 GiB — refused.
    strip = _header_only_tiff(tmp_path / "strip_a.tif", 300_000, 300_000)
    assert read_slide_info(strip).width == 300_000
    results = extract_slides([huge, strip], tmp_path / "out", ExtractConfig(), workers=0)
    assert "larger than any slide scan" in results["huge_a.tif"].error
    assert "one strip is 300000×300000 px" in results["strip_a.tif"].error
    assert "MiB decoded), more than the 256 MiB" in results["strip_a.tif"].error


# --- 6. tissue-free slide -----------------------------------------------------------------------------


def test_tissue_free_slide_is_reported_empty_and_left_out_of_the_manifest(
    slides: Path, tmp_path: Path
) -> None:
    images = _folder(tmp_path, slides, "good_a.tif", "blank_a.tif")
    (images.parent / "train.csv").write_text(
        "filename,x1,x2,y1,y2,max_x,max_y\ngood_a.tif,1000,1400,1000,1400,4096,3072\n"
    )
    report = prepare_step(images.parent, tmp_path / "out", ExtractConfig(), workers=0)
    blank = report.slides["blank_a.tif"]
    assert blank.status == "empty" and blank.patches == 0
    assert "blank_a.tif: no patch has ≥ 50% tissue" in blank.error and "excluded from training" in blank.error
    assert set(read_manifest(tmp_path / "out").slide) == {"good_a.tif"}  # split/train never see it
    assert report.slides["good_a.tif"].status == "ok" and not report.failed


# --- 15. unsafe names ---------------------------------------------------------------------------------


def test_unsafe_names_are_refused_before_any_path_join_and_nothing_is_written_outside(
    slides: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    images = _folder(work, slides, "good_a.tif")
    shutil.copy(slides / "good_a.tif", images / "evil\nname_a.tif")  # a newline in a file name on disk
    shutil.copy(slides / "good_a.tif", images / "good_a.tiff")  # same stem: would share the shard
    (images.parent / "train.csv").write_text(
        "filename,x1,x2,y1,y2,max_x,max_y\n"
        "good_a.tif,1000,1400,1000,1400,4096,3072\n"
        "../../escape_a.tif,1,20,1,20,4096,3072\n"
        "/tmp/abs_a.tif,1,20,1,20,4096,3072\n"
        '"new\nline_a.tif",1,20,1,20,4096,3072\n'
    )
    outside = {p for p in tmp_path.rglob("*")}
    out = work / "out"
    report = prepare_step(images.parent, out, ExtractConfig(), workers=0)
    assert set(report.slides) == {"good_a.tif"}
    text = "\n".join(report.problems)
    assert "'evil\\nname_a.tif' is not a plain file name" in text
    assert "'good_a.tiff': same name as 'good_a.tif'" in text
    for bad in ("../../escape_a.tif", "/tmp/abs_a.tif", "new\nline_a.tif"):
        assert f"({bad}): slide name {bad!r} is not a plain file name" in text
    created = {p for p in tmp_path.rglob("*")} - outside
    assert created and all(p.is_relative_to(out) for p in created)
    for bad in ("../good_a.tif", "/etc/passwd.tif", "a\nb.tif"):
        with pytest.raises(UnsafePathError):
            fetch_slides(str(images.parent), [bad], tmp_path / "dest")
    with pytest.raises(UnsafePathError):
        extract_slide(images / "evil\nname_a.tif", out, ExtractConfig())
    assert not (tmp_path / "dest").exists()


# --- 16. max_x that disagrees with the slide ----------------------------------------------------------


def test_boxes_whose_max_x_disagrees_with_the_slide_are_dropped_and_the_slide_left_out(
    slides: Path, tmp_path: Path
) -> None:
    images = _folder(tmp_path, slides, "good_a.tif")
    shutil.copy(slides / "good_a.tif", images / "other_a.tif")
    (images.parent / "train.csv").write_text(
        "filename,x1,x2,y1,y2,max_x,max_y\n"
        + (slides / "good_boxes.csv").read_text()
        + "other_a.tif,500,700,500,700,2048,1536\n"  # level-1 coordinates: the wrong frame
    )
    report = prepare_step(images.parent, tmp_path / "out", ExtractConfig(), workers=0)
    (msg,) = [p for p in report.problems if "real size" in p]
    assert msg == (
        "train.csv (other_a.tif): max_x=2048, max_y=1536 disagree with the slide's real size 4096×3072 px: "
        "its 1 box(es) dropped and the slide left out of training"
    )
    m = read_manifest(tmp_path / "out")
    assert set(m.slide) == {"good_a.tif"} and m.label.sum() > 0
