"""Reading a slide's patches: the grid on a level, the overview, and the pixels of each grid cell.

:func:`lay_grid` lays the patch grid on the level that :func:`~digilut.slide.choose_level` picked,
read ≥ 2× finer than the target by decoding JPEG tiles at 1/2, 1/4 or 1/8 in the DCT domain
(:class:`ReadPlan`). :func:`read_overview` gives the coarsest level whole, or a streamed shrunk copy
when it is too large (non-pyramidal slides). :func:`read_patches` reads, resizes and JPEG-encodes
the tissue cells in threads (or copies each cell's JPEG tile as it is, when a patch is exactly one
tile) and drops the unreadable ones: flat (one colour) or garbled (:mod:`digilut.garbled`). A
copied tile is judged by its bytes (:func:`~digilut.garbled.suspect_stream`: dropped when corrupt)
and decoded for the flat and garbled checks only when it may be of one colour or is sampled
(:func:`check_sample`: every 16th, at least 16 a slide).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagecodecs
import numpy as np
from PIL import Image

from digilut.errors import SlideReadError
from digilut.garbled import (
    CHECK_EVERY_MAX,
    MAYBE_FLAT,
    Reference,
    find_garbled,
    mean_rgb,
    reference_level,
    suspect_stream,
)
from digilut.level_reader import CACHE_BYTES, LevelReader, decode_jpeg_scaled
from digilut.shards import decode_jpeg
from digilut.slide import LevelChoice, SlideInfo, decode_scale_for

log = logging.getLogger(__name__)
MASK_PX = 4096  # long side (at most) of the overview pyFAST segments tissue on


def patch_grid(width: int, height: int, region_px: int, stride_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (x, y) of every full region of a level, in raster order."""
    xs = np.arange(0, width - region_px + 1, stride_px, dtype=np.int64)
    ys = np.arange(0, height - region_px + 1, stride_px, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return gx.ravel(), gy.ravel()


@dataclass(frozen=True)
class ReadPlan:
    """How a slide's patches are read: the level, its JPEG decoding scale (the level is read at
    ``1/decode_scale``), the region side in those pixels, the stored patch (``patch_px`` side,
    ``jpeg_quality``), and whether each patch is one JPEG tile stored as it is (``tile_copy``)."""

    level: int
    decode_scale: int
    region: int
    downsample: float  # level-0 px per read px
    resize: float  # read px per stored px (the region is resized to ``patch_px``)
    patch_px: int
    jpeg_quality: int
    tile_copy: bool = False


@dataclass(frozen=True)
class Grid:
    """The patch grid: corners in read pixels (``gx``, ``gy``) and in level-0 pixels (``x0``, ``y0``)."""

    gx: np.ndarray
    gy: np.ndarray
    stride: int  # read px
    side0: int  # a patch's side in level-0 px
    downsample: float  # level-0 px per read px

    @property
    def x0(self) -> np.ndarray:
        return np.round(self.gx * self.downsample).astype(np.int64)

    @property
    def y0(self) -> np.ndarray:
        return np.round(self.gy * self.downsample).astype(np.int64)


def lay_grid(
    info: SlideInfo, choice: LevelChoice, patch_px: int, stride_px: int, jpeg_quality: int
) -> tuple[ReadPlan, Grid]:
    """The read plan and patch grid of a slide read at ``choice`` (sizes at the target resolution).

    Read ≥ 2× finer than the target: decode JPEG tiles at 1/2, 1/4 or 1/8 in the DCT domain and
    resize only the rest (2.06× → 1.03×); the grid is laid on the level at that scale."""
    level = info.levels[choice.level]
    dscale = decode_scale_for(info, choice.level, choice.scale) if choice.scale >= 2 else 1
    resize = choice.scale / dscale
    region = round(patch_px * resize)
    stride = max(1, round(stride_px * resize))
    gx, gy = patch_grid(level.width // dscale, level.height // dscale, region, stride)
    ds = level.downsample * dscale
    plan = ReadPlan(choice.level, dscale, region, ds, resize, patch_px, jpeg_quality)
    return plan, Grid(gx, gy, stride, round(region * ds), ds)


def read_overview(info: SlideInfo, max_level_px: int) -> tuple[np.ndarray, bool]:
    """The coarsest level (long side ≤ MASK_PX when streamed) and whether it was read whole: it is
    when it has at most ``max_level_px`` pixels, else a streamed shrunk copy (bounded memory)."""
    coarsest = info.levels[-1]
    small = coarsest.width * coarsest.height <= max_level_px
    cache_bytes = min(CACHE_BYTES, max_level_px * 3 // 2)
    overview_px = min(MASK_PX, math.isqrt(max_level_px))
    # A streamed overview decodes every tile/strip of the level: at 1/2-1/8 in the DCT domain.
    oscale = (
        1
        if small
        else decode_scale_for(info, coarsest.index, max(coarsest.width, coarsest.height) / overview_px)
    )
    with LevelReader(info, coarsest.index, cache_bytes=cache_bytes, decode_scale=oscale) as reader:
        if small:
            return reader.read(0, 0, coarsest.width, coarsest.height), True
        overview = reader.read_shrunk(overview_px)
    log.info(
        "%s: coarsest level %d×%d px is too large to read whole; overview streamed at %d×%d",
        info.path.name,
        coarsest.width,
        coarsest.height,
        overview.shape[1],
        overview.shape[0],
    )
    return overview, False


def tile_copy_ok(info: SlideInfo, plan: ReadPlan, stride: int, cell: tuple[int, int]) -> bool:
    """Whether every patch is exactly one JPEG tile of the level (tile side = patch side, grid on
    the tile grid) whose standalone stream (JPEGTables merged) decodes to the tile's pixels: checked
    here on the tile of ``cell``, so a colour space libjpeg would guess otherwise is caught."""
    lv = info.levels[plan.level]
    if plan.decode_scale != 1 or plan.region != plan.patch_px or not lv.tiled:
        return False
    with LevelReader(info, plan.level, cache_tiles=1) as reader:
        if not reader.is_jpeg or (reader.tile_w, reader.tile_h) != (plan.region, plan.region):
            return False
        if stride % plan.region:
            return False
        x, y = cell
        try:
            same = np.array_equal(
                decode_jpeg(reader.tile_stream(x // plan.region, y // plan.region)),
                reader.read(x, y, plan.region, plan.region),
            )
        except (SlideReadError, OSError, ValueError):
            return False  # the normal path reports the tile
    if not same:
        log.warning("%s: a JPEG tile does not decode alone to its pixels: tiles re-encoded", info.path.name)
    return same


def check_sample(n: int) -> np.ndarray:
    """Which of ``n`` copied tiles are decoded for the checks even when their bytes look intact:
    every ``CHECK_EVERY_MAX``-th, or more often so that at least 16 are (bool per tile)."""
    sample = np.zeros(n, bool)
    sample[:: max(1, min(CHECK_EVERY_MAX, n // 16))] = True
    return sample


@dataclass
class CellReads:
    """What reading grid cells gave: the kept patches' JPEG streams and grid indices, why each
    dropped one is unreadable, and (for the garbled-tile check) the kept patches' mean colours and
    those of the same regions of the reference level (empty without one)."""

    jpegs: list[bytes]
    kept: list[int]
    bad: list[str]
    means: np.ndarray
    ref_means: np.ndarray


def _copy_cells(
    reader: LevelReader, plan: ReadPlan, grid: Grid, cells: np.ndarray, checked: np.ndarray, bad: list[str]
) -> list[tuple[int, bytes, np.ndarray | None]]:
    """The tile-copy path of :func:`read_cells`: every cell's JPEG tile read in bulk
    (:meth:`~digilut.level_reader.LevelReader.tile_streams`) and judged by its bytes. Corrupt ones
    are named in ``bad``; the others are returned in order as ``(k, stream, pixels)``: ``pixels`` is
    cell ``k``'s tile decoded at 1/8 (its block means: DC coefficients only) for the flat and garbled
    checks when it may be of one colour or ``checked[k]``, else None (stored unchecked)."""
    region, level = plan.region, plan.level
    tx, ty = grid.gx[cells] // region, grid.gy[cells] // region
    streams = reader.tile_streams(tx, ty)
    todo: list[tuple[int, bytes, np.ndarray | None]] = []
    for k, (stream, why) in enumerate(zip(streams, map(suspect_stream, streams), strict=True)):
        if why and why != MAYBE_FLAT:
            bad.append(f"corrupt JPEG data ({why}): level {level} tile ({int(tx[k])}, {int(ty[k])})")
        elif not why and not checked[k]:  # intact-looking bytes: stored as they are
            todo.append((k, stream, None))
        else:
            try:
                todo.append((k, stream, decode_jpeg_scaled(stream, 8)))
            except (OSError, ValueError) as err:
                where = f"{reader.info.path.name} level {level} tile ({int(tx[k])}, {int(ty[k])})"
                raise SlideReadError(f"{where}: cannot decode ({err})") from err
    return todo


def read_cells(
    info: SlideInfo,
    plan: ReadPlan,
    grid: Grid,
    cells: np.ndarray,
    ref: Reference | None,
    cache_bytes: int,
    sample: np.ndarray,
) -> CellReads:
    """Read, resize and JPEG-encode the grid cells ``cells`` (or, ``plan.tile_copy``, take each
    cell's JPEG tile as it is: :func:`_copy_cells`); skip flat patches (one colour: a black/blank
    tile) and say why.

    A copied tile whose bytes are corrupt (:func:`~digilut.garbled.suspect_stream`) is dropped; it
    is decoded (at 1/8) for the flat and garbled checks only when it may be of one colour or
    ``sample`` (bool, per cell) picks it; the others get NaN mean colours (not judged by
    :func:`~digilut.garbled.find_garbled`)."""
    out = CellReads([], [], [], np.empty((0, 3)), np.empty((0, 3)))
    means: list[np.ndarray] = []
    ref_means: list[np.ndarray] = []
    region, level = plan.region, plan.level
    unchecked = np.full(3, np.nan)
    with LevelReader(info, level, cache_bytes=cache_bytes, decode_scale=plan.decode_scale) as reader:
        if plan.tile_copy:
            todo = _copy_cells(reader, plan, grid, cells, sample, out.bad)
        else:
            todo = [(k, b"", None) for k in range(len(cells))]
        for k, stream, px in todo:
            i = int(cells[k])
            if plan.tile_copy and px is None:  # stored unchecked
                if ref is not None:
                    means.append(unchecked)
                    ref_means.append(unchecked)
                out.jpegs.append(stream)
                out.kept.append(i)
                continue
            x, y = int(grid.gx[i]), int(grid.gy[i])
            if px is None:
                px = reader.read(x, y, region, region)
            if px.min() == px.max():
                tiles = ", ".join(f"({tx}, {ty})" for tx, ty in reader.tiles_of(x, y, region, region))
                out.bad.append(f"flat: level {level} tile {tiles}")
                continue
            if ref is not None:
                means.append(mean_rgb(px))
                ref_means.append(ref.mean(round(x * plan.downsample), round(y * plan.downsample), grid.side0))
            if not plan.tile_copy:
                if region != plan.patch_px:
                    size = (plan.patch_px, plan.patch_px)
                    px = np.asarray(Image.fromarray(px).resize(size, Image.Resampling.BOX))
                stream = imagecodecs.jpeg8_encode(px, level=plan.jpeg_quality)
            out.jpegs.append(stream)
            out.kept.append(i)
    out.means, out.ref_means = np.reshape(means, (-1, 3)), np.reshape(ref_means, (-1, 3))
    return out


def _drop_garbled(info: SlideInfo, plan: ReadPlan, grid: Grid, reads: CellReads) -> None:
    """Drop (from ``reads``, naming their tiles in ``reads.bad``) the patches whose colour does not
    follow this slide's level-to-level map."""
    checked = np.flatnonzero(np.isfinite(reads.means).all(axis=1))  # copied tiles: suspect or sampled
    found, off_checked, calibration = find_garbled(reads.means[checked], reads.ref_means[checked])
    garbled, off = checked[found], np.full(len(reads.means), np.nan)
    off[checked] = off_checked
    if len(garbled):
        region = plan.region
        with LevelReader(info, plan.level, decode_scale=plan.decode_scale) as reader:
            for j in garbled:
                x, y = int(grid.gx[reads.kept[j]]), int(grid.gy[reads.kept[j]])
                tiles = ", ".join(f"({tx}, {ty})" for tx, ty in reader.tiles_of(x, y, region, region))
                reads.bad.append(f"garbled (colour off by {off[j]:.0f}): level {plan.level} tile {tiles}")
        drop = set(garbled.tolist())
        reads.jpegs = [jp for j, jp in enumerate(reads.jpegs) if j not in drop]
        reads.kept = [i for j, i in enumerate(reads.kept) if j not in drop]
    if not calibration.is_identity:  # levels that differ in colour
        log.info(
            "%s: level %d = its reference level's colour × %s + %s (per channel)",
            info.path.name,
            plan.level,
            "/".join(f"{a:.2f}" for a in calibration.slope),
            "/".join(f"{b:.0f}" for b in calibration.offset),
        )


def read_patches(
    info: SlideInfo,
    plan: ReadPlan,
    grid: Grid,
    keep: np.ndarray,
    *,
    overview: np.ndarray | None,
    threads: int,
    cache_bytes: int,
) -> tuple[ReadPlan, CellReads]:
    """Read the grid cells ``keep`` in ``threads`` (the output does not depend on it); drop the flat
    and garbled ones. Returns the plan as used (``tile_copy`` when every patch is one JPEG tile
    stored as it is) and the reads. ``overview``: the coarsest level, when read whole."""
    ref = reference_level(info, plan.level, grid.side0, overview)
    sample = np.ones(len(keep), bool)
    if len(keep) and tile_copy_ok(info, plan, grid.stride, (int(grid.gx[keep[0]]), int(grid.gy[keep[0]]))):
        plan = dataclasses.replace(plan, tile_copy=True)
        sample = check_sample(len(keep))
    # Threads share the work in raster-order chunks (libjpeg-turbo releases the GIL), each with its
    # own reader and tile cache.
    n = max(1, threads)
    chunks = [
        (c, s) for c, s in zip(np.array_split(keep, n), np.array_split(sample, n), strict=True) if len(c)
    ]
    with ThreadPoolExecutor(max_workers=max(1, len(chunks))) as pool:
        parts = list(
            pool.map(lambda cs: read_cells(info, plan, grid, cs[0], ref, cache_bytes, cs[1]), chunks)
        )
    reads = CellReads(
        [j for p in parts for j in p.jpegs],
        [i for p in parts for i in p.kept],
        [b for p in parts for b in p.bad],
        np.concatenate([p.means for p in parts]) if parts else np.empty((0, 3)),
        np.concatenate([p.ref_means for p in parts]) if parts else np.empty((0, 3)),
    )
    if ref is not None and reads.kept:
        _drop_garbled(info, plan, grid, reads)
    return plan, reads
