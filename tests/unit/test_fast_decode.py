"""Extraction at the speed of the JPEG decoder: tiles decoded at 1/2-1/8 in the DCT domain when the
level is ≥ 2× finer than the target, and JPEG tiles stored as they are when a patch is one tile."""

import io
import logging
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_fixtures import write_pyramid

from digilut.extract import ExtractConfig, extract_slide
from digilut.level_reader import LevelReader, reduce_box
from digilut.manifest import read_manifest, read_patch
from digilut.patch_reader import check_sample
from digilut.reference_data import cmu_small_region_svs
from digilut.shards import iter_shard
from digilut.slide import decode_scale_for, read_slide_info
from digilut.synth_plan import SynthConfig, plan_slide
from digilut.synth_render import write_slide

# Mean absolute difference (0-255) between a patch read by DCT-domain scaled decoding (1/2, then a
# 1.03× BOX resize) and the same patch decoded in full and BOX-resized 2.06×, after our q90 JPEG
# encoding: measured 2.0-3.5 per patch, 2.6 on average, on this synthetic H&E (its texture is
# sharper than a real scan's). Of that, the q90 encoding alone makes 1.1-1.7 and the two-stage
# resampling the rest: the scaled decode itself is a box mean within 0.1 (test below).
SCALED_MAX_MEAN_DIFF = (3.0, 4.0)  # mean over patches, worst patch


@pytest.fixture(scope="module")
def slide_0243(tmp_path_factory):
    """A 4× pyramid (downsamples 1/4/16, 512-px tiles) at 0.243 µm/px, as Aperio-style scanners
    write them: no level near 20x, so 20x is read from level 0 and shrunk 2.06×."""
    tmp = tmp_path_factory.mktemp("s0243")
    synth = write_slide(plan_slide("p_a.tif", SynthConfig(), seed=3, positive=True), tmp / "synth.tif")
    return write_pyramid(tmp / "p_a.tif", tifffile.imread(synth), mpp=0.243, factor=4, tile_px=512)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_scaled_decoding_equals_the_full_decode_shrunk_by_a_box_mean(slide_0243, scale):
    info = read_slide_info(slide_0243)
    with LevelReader(info, 0) as full, LevelReader(info, 0, decode_scale=scale) as scaled:
        assert (scaled.width, scaled.height) == (4096 // scale, 3072 // scale)
        x, y, side = 1000, 700, 1536  # crosses tile borders
        ours = scaled.read(x // scale, y // scale, side // scale, side // scale).astype(int)
        truth = reduce_box(full.read(x - x % scale, y - y % scale, side, side), scale).astype(int)
        assert not scaled._fallback
    diff = np.abs(ours - truth)
    assert diff.mean() < 0.3 and diff.max() <= 8, (diff.mean(), diff.max())


def test_slide_without_a_20x_level_is_decoded_at_half_scale_and_matches_full_decode_and_resize(
    slide_0243, tmp_path, caplog
):
    info = read_slide_info(slide_0243)
    assert decode_scale_for(info, 0, 0.5 / 0.243) == 2
    with caplog.at_level(logging.INFO, logger="digilut.extract"):
        r = extract_slide(slide_0243, tmp_path, ExtractConfig())
    assert r.status == "ok" and r.level == 0 and r.patches > 5, r
    assert "decoded at 1/2, 1.03× resize" in caplog.text
    m = read_manifest(tmp_path / "parts" / "p_a.parquet")
    assert (m.w0 == 526).all()  # 2 × 263 level-0 px: 256 px at 0.5 µm/px from 0.243 µm/px
    diffs = []
    with LevelReader(info, 0) as full:
        for _, row in m.iterrows():
            region = full.read(int(row.x0), int(row.y0), int(row.w0), int(row.h0))
            truth = np.asarray(Image.fromarray(region).resize((256, 256), Image.Resampling.BOX)).astype(int)
            diffs.append(np.abs(read_patch(tmp_path, row).astype(int) - truth).mean())
    assert np.mean(diffs) < SCALED_MAX_MEAN_DIFF[0] and max(diffs) < SCALED_MAX_MEAN_DIFF[1], diffs


def test_scaled_decoding_reads_aperio_rgb_jpeg_and_falls_back_when_the_colour_space_is_wrong(caplog):
    """Aperio's JPEG tiles are RGB-coded without a JFIF marker and share JPEGTables: a stand-alone
    decoder would take them for YCbCr. With the colour space forced wrong, the reader notices on its
    first tile and decodes in full instead (the pixels stay right)."""
    info = read_slide_info(cmu_small_region_svs(fetch=False))
    with LevelReader(info, 0) as full:
        truth = reduce_box(full.read(200, 200, 1000, 1000), 2).astype(int)
    with LevelReader(info, 0, decode_scale=2) as scaled:
        ours = scaled.read(100, 100, 500, 500).astype(int)
        assert not scaled._fallback
    assert np.abs(ours - truth).mean() < 0.3
    with LevelReader(info, 0, decode_scale=2) as wrong, caplog.at_level(logging.WARNING):
        wrong._rgb = False  # as if the Adobe marker were not added: decoded as YCbCr
        assert np.array_equal(wrong.read(100, 100, 500, 500), truth)
        assert wrong._fallback
    assert "decoding in full and shrinking instead" in caplog.text


def _tile_streams(path, level: int) -> list[bytes]:
    info = read_slide_info(path)
    with LevelReader(info, level) as reader:
        return [reader.tile_stream(tx, ty) for ty in range(reader.tiles_y) for tx in range(reader.tiles_x)]


@pytest.mark.parametrize("max_read", [8 * 2**20, 20_000])
def test_tile_streams_reads_back_to_back_tiles_at_once_and_gives_each_tiles_stream(max_read, monkeypatch):
    import digilut.level_reader as lr

    path = cmu_small_region_svs(fetch=False)  # JPEGTables, RGB-coded: the merge has to add both
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
    raw = Path(path).read_bytes()
    reads: list[int] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    real_pread = lr.os.pread
    monkeypatch.setattr(lr, "MAX_READ_BYTES", max_read)
    monkeypatch.setattr(lr.os, "pread", pread)
    with LevelReader(read_slide_info(path), 0) as reader:
        ty, tx = np.divmod(np.arange(reader.tiles_x * reader.tiles_y), reader.tiles_x)
        order = np.r_[np.arange(len(tx)), np.arange(len(tx))[::-1]]  # forwards, then backwards
        streams = reader.tile_streams(tx[order], ty[order])
    want = [lr.jpeg_stream(raw[offsets[i] : offsets[i] + counts[i]], tables, rgb=True) for i in order]
    assert streams == want
    assert all(s.startswith(b"\xff\xd8\xff\xee\x00\x0eAdobe") for s in streams)  # RGB said so
    back_to_back = all(offsets[i + 1] == offsets[i] + counts[i] for i in range(len(offsets) - 1))
    assert back_to_back, "this slide's tiles lie back to back: one read covers them"
    if max_read > sum(counts):  # forwards one read; backwards no tile follows the one before
        assert len(reads) == 1 + len(offsets) and reads[0] == sum(counts)
    else:
        assert len(reads) > 1 + len(offsets)
        assert all(n <= max_read or n in counts for n in reads)  # a tile larger than a read: alone


@pytest.mark.parametrize("kind", ["aperio_svs_with_jpegtables", "tiled_pyramid_at_20x"])
def test_a_patch_that_is_one_jpeg_tile_is_stored_as_it_is_and_decodes_to_the_tiles_pixels(
    kind, tmp_path, tiny_data, caplog
):
    if kind == "aperio_svs_with_jpegtables":  # 240-px tiles at 0.499 µm/px, RGB-coded, JPEGTables
        path = Path(shutil.copy(cmu_small_region_svs(fetch=False), tmp_path / "cmu_a.tif"))
        cfg = ExtractConfig(patch_px=240, stride_px=240, target_mpp=0.499)
    else:  # 256-px tiles at 0.5 µm/px
        level0 = tifffile.imread(sorted((tiny_data / "images").iterdir())[0], level=1)
        path = write_pyramid(tmp_path / "t_a.tif", level0, mpp=0.5)
        cfg = ExtractConfig()
    with caplog.at_level(logging.INFO, logger="digilut.extract"):
        r = extract_slide(path, tmp_path / "out", cfg)
    assert r.status == "ok" and r.patches > 10 and "JPEG tiles copied" in caplog.text, r
    m = read_manifest(tmp_path / "out" / "parts" / f"{path.stem}.parquet")
    side = cfg.patch_px
    streams = _tile_streams(path, 0)
    tiles_x = -(-read_slide_info(path).width // side)
    stored = list(iter_shard(tmp_path / "out" / m.shard.iloc[0]))
    with tifffile.TiffFile(path) as tif:
        truth = tif.series[0].levels[0].asarray()
    for (_, row), data in zip(m.iterrows(), stored, strict=True):
        assert data == streams[(row.y0 // side) * tiles_x + row.x0 // side]  # the tile's bytes
        pixels = read_patch(tmp_path / "out", row)
        assert np.array_equal(pixels, truth[row.y0 : row.y0 + side, row.x0 : row.x0 + side])
        assert np.array_equal(imagecodecs.jpeg8_decode(data), pixels)  # the training loader's decoder


def test_grid_off_the_tile_grid_is_re_encoded(tmp_path, tiny_data, caplog):
    level0 = tifffile.imread(sorted((tiny_data / "images").iterdir())[0], level=1)
    path = write_pyramid(tmp_path / "t_a.tif", level0, mpp=0.5)
    with caplog.at_level(logging.INFO, logger="digilut.extract"):
        r = extract_slide(path, tmp_path / "out", ExtractConfig(stride_px=128))
    assert r.status == "ok" and "JPEG tiles copied" not in caplog.text and "1× resize" in caplog.text


def test_mean_rgb_is_numpys_mean_colour():
    from digilut.garbled import mean_rgb

    px = np.random.default_rng(0).integers(0, 256, (527, 301, 3), dtype=np.uint8)
    assert np.allclose(mean_rgb(px), px.reshape(-1, 3).mean(axis=0), rtol=0, atol=1e-9)
    assert np.allclose(
        mean_rgb(px[10:20, 5:9]), px[10:20, 5:9].reshape(-1, 3).mean(axis=0), rtol=0, atol=1e-9
    )


def _replace_tile(path: Path, level: int, tile: tuple[int, int], how: str) -> None:
    """Overwrite the last two thirds of one JPEG tile's data (keeping its EOI) with zeros or random
    bytes, or the whole tile with a black tile's JPEG (padded to its size)."""
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        idx = tile[1] * -(-page.shape[1] // page.tilewidth) + tile[0]
        off, n = page.dataoffsets[idx], page.databytecounts[idx]
        if how == "black":
            black = imagecodecs.jpeg8_encode(
                np.zeros((page.tilelength, page.tilewidth, 3), np.uint8), level=85
            )
            assert len(black) <= n
            data[off : off + n] = black + bytes(n - len(black))  # bytes after EOI are ignored
        else:
            fill = np.random.default_rng(1).integers(0, 256, n - 2 - n // 3, dtype=np.uint8).tobytes()
            data[off + n // 3 : off + n - 2] = bytes(n - 2 - n // 3) if how == "zeros" else fill
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeros", "random", "black"])
def test_a_zeroed_corrupted_or_black_tile_is_not_copied(how, tmp_path, tiny_data):
    """Copied tiles are not decoded unless they may be of one colour or are sampled: a zeroed or
    randomised tile is dropped for its bytes, a black one for its pixels, each named in the warning;
    the intact tiles are stored as they are. (Zeroed data decodes to the last block's colour: the
    mean-colour check alone misses it on most of these tiles.)"""
    level0 = tifffile.imread(sorted((tiny_data / "images").iterdir())[0], level=1)
    path = write_pyramid(tmp_path / "t_a.tif", level0, mpp=0.5)
    cfg = ExtractConfig(max_constant_fraction=0.5)
    intact = extract_slide(path, tmp_path / "intact", cfg)
    before = read_manifest(tmp_path / "intact" / "parts" / "t_a.parquet")
    k = len(before) // 2
    k += int(check_sample(len(before))[k])  # a tile decoded only if suspect (every cell is tissue here)
    row = before.iloc[k]
    tile = (int(row.x0) // 256, int(row.y0) // 256)
    _replace_tile(path, 0, tile, how)
    r = extract_slide(path, tmp_path / "out", cfg)
    why = {"zeros": "corrupt JPEG data (zero run)", "random": "corrupt JPEG data (marker in scan)"}
    assert r.patches == intact.patches - 1 and f"{why.get(how, 'flat')}: level 0 tile {tile}" in r.warning
    after = read_manifest(tmp_path / "out" / "parts" / "t_a.parquet")
    assert not ((after.x0 == row.x0) & (after.y0 == row.y0)).any()
    was = dict(
        zip(
            zip(before.x0, before.y0, strict=True),
            iter_shard(tmp_path / "intact" / before.shard.iloc[0]),
            strict=True,
        )
    )
    now = iter_shard(tmp_path / "out" / after.shard.iloc[0])
    for (_, kept), data in zip(after.iterrows(), now, strict=True):
        assert data == was[(kept.x0, kept.y0)]  # the other tiles: copied as they were


def test_suspect_streams_are_told_from_intact_tiles():
    from digilut.garbled import MAYBE_FLAT, suspect_stream

    intact = _tile_streams(cmu_small_region_svs(fetch=False), 0)  # a real scanner's tiles, JPEGTables merged
    assert [suspect_stream(s) for s in intact] == [""] * len(intact)
    s = max(intact, key=len)
    n = len(s)
    zeroed = s[: n // 2] + bytes(n - 2 - n // 2) + s[-2:]
    noise = np.random.default_rng(0).integers(0, 256, n - 2 - n // 2, dtype=np.uint8).tobytes()
    black = imagecodecs.jpeg8_encode(np.zeros((240, 240, 3), np.uint8), level=85)
    grey = imagecodecs.jpeg8_encode(np.full((256, 256, 3), 128, np.uint8), level=95)
    assert suspect_stream(zeroed) == "zero run"
    assert suspect_stream(s[: n // 2] + noise + s[-2:]) == "marker in scan"
    assert suspect_stream(s[:-100]) == "no EOI"
    buf = io.BytesIO()  # optimised Huffman tables code a flat block as zero bits: zero runs are intact there
    Image.fromarray(np.full((256, 256, 3), 30, np.uint8)).save(buf, "JPEG", quality=90, optimize=True)
    assert suspect_stream(black) == suspect_stream(grey) == suspect_stream(buf.getvalue()) == MAYBE_FLAT
    assert suspect_stream(b"\xff\xd8\xff\xd9") == "header"


def test_a_parsed_header_is_reused_only_for_streams_that_start_with_it():
    from digilut import garbled

    rng = np.random.default_rng(1)
    px = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    streams = _tile_streams(cmu_small_region_svs(fetch=False), 0)[:3]
    for q in (50, 90, 95):  # tables (and so headers) differ; the first bytes (SOI, JFIF APP0) do not
        streams += [imagecodecs.jpeg8_encode(px, level=q), imagecodecs.jpeg8_encode(px[:32], level=q)]
    garbled._HEADERS.clear()
    for s in [*streams, *streams[::-1]]:
        assert garbled._scan_header(s) == garbled._flat_scan_bits(s)
    heads = {s[: garbled._flat_scan_bits(s)[0]] for s in streams}
    assert 7 <= len(garbled._HEADERS) == len(heads)  # one per distinct header: the svs tiles share one
