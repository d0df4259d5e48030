"""Patch extraction: tissue patches of every slide into one shard per slide plus a manifest.

``extract_slide`` does one slide: pyFAST tissue mask → patch grid at the target resolution (level
chosen from the slide's mpp; resized from the closest finer level when none matches) → pixels read
tile by tile → JPEG → one shard + a manifest part + a thumbnail. ``extract_slides`` runs it over
many slides in worker processes, a failing slide reported, never fatal; the ``extract`` step
(:mod:`digilut.steps.extract`) publishes the shards to the shard store.

Output layout of ``extract_slide`` (all paths in a part are relative to ``OUT``)::

    OUT/shards/<stem>.shard        JPEG patches of one slide (see digilut.shards)
    OUT/parts/<stem>.parquet       that slide's manifest rows
    OUT/thumbnails/<stem>.png      whole-slide thumbnail (long side ≤ 1024 px)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
from PIL import Image

from digilut.annotations import (
    check_slide_name,
    patient_of,
)
from digilut.errors import ConfigError, DigilutError, SlideReadError, TissueNotFoundError
from digilut.files import atomic_write, file_sha256
from digilut.manifest import EXTRACT_COLUMNS, write_manifest
from digilut.shards import decode_jpeg, write_shard
from digilut.slide import (
    CACHE_BYTES,
    LevelReader,
    SlideInfo,
    choose_level,
    decode_jpeg_scaled,
    decode_scale_for,
    read_slide_info,
)
from digilut.tissue import shrink, tissue_mask

log = logging.getLogger(__name__)
THUMB_PX = 1024
# A level with more pixels than this is never decoded whole: the thumbnail and pyFAST's tissue mask
# then come from a streamed, shrunk copy (non-pyramidal slides). 64 Mpx ≈ 192 MiB of RGB.
MAX_WHOLE_LEVEL_PX = 64 * 2**20
MASK_PX = 4096  # long side (at most) of the overview pyFAST segments tissue on
# A tissue patch whose mean colour differs from the same region of a coarser level by more than
# this (0-255, any channel), after the slide's own level-to-level colour map (see
# calibrate_levels), holds garbled pixels: the pyramid is redundant, so a tile that decodes without
# error but to wrong pixels (zeroed or corrupted JPEG data: libjpeg fills it with grey) shows here.
GARBLED_MEAN_DIFF = 24.0
# The level-to-level colour map is fitted only on slides with this many patches; it must keep
# slopes within 1/MAX_SLOPE..MAX_SLOPE and move mid-grey by at most MAX_SHIFT, and most patches
# must follow it; otherwise patches are judged against the coarser level as it is.
MIN_CALIBRATION_PATCHES = 8
MAX_SLOPE = 1.4
MAX_SHIFT = 48.0
REFERENCE_PX = 16 * 2**20  # the largest level held whole as that reference


TRAIN_STRIDE_PX = 256  # the training grid: patches side by side (``digilut prepare``)
INFERENCE_STRIDE_PX = 128  # the inference grid: 50% overlap, finer heatmaps (both pipelines, all slides)


@dataclass(frozen=True)
class ExtractConfig:
    """How patches are cut. Sizes are in pixels *at the target resolution* (``target_mpp``)."""

    patch_px: int = 256
    target_mpp: float = 0.5  # 20x
    stride_px: int = TRAIN_STRIDE_PX  # INFERENCE_STRIDE_PX for slides whose boxes are predicted
    min_tissue_fraction: float = 0.5
    tissue_threshold: int = 85  # FAST colour threshold: distance from white
    slide_mpp: float | None = None  # override for slides without mpp metadata
    jpeg_quality: int = 90
    max_constant_fraction: float = 0.02  # more unreadable (flat/garbled) tissue patches = unreadable slide

    def __post_init__(self) -> None:
        if not 16 <= self.patch_px <= 4096:
            raise ConfigError(f"patch_px={self.patch_px} must be in 16..4096")
        if not 1 <= self.stride_px <= self.patch_px * 4:
            raise ConfigError(f"stride_px={self.stride_px} must be in 1..{self.patch_px * 4}")
        if not 0.05 <= self.target_mpp <= 20:
            raise ConfigError(f"target_mpp={self.target_mpp} µm/px must be in 0.05..20 (20x = 0.5)")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(f"min_tissue_fraction={self.min_tissue_fraction} must be in [0, 1]")
        if not 1 <= self.tissue_threshold <= 441:
            raise ConfigError(f"tissue_threshold={self.tissue_threshold} must be in 1..441")
        if self.slide_mpp is not None and not 0.05 <= self.slide_mpp <= 20:
            raise ConfigError(f"slide_mpp={self.slide_mpp} µm/px must be in 0.05..20 (DigiLut: 0.25)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality={self.jpeg_quality} must be in 1..100")

    def digest(self) -> str:
        """Short hash of the settings: a slide extracted with other settings is redone."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class SlidePatches:
    """Result of extracting one slide."""

    slide: str
    status: str  # ok | empty | failed
    patches: int = 0
    seconds: float = 0.0
    error: str = ""
    level: int = -1
    scale: float = 1.0
    mpp: float = 0.0
    width: int = 0
    height: int = 0
    config: str = ""
    shard_sha256: str = ""
    warning: str = ""  # e.g. unreadable patches dropped from an otherwise good slide

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _stem(slide: str) -> str:
    return Path(slide).stem


def patch_grid(width: int, height: int, region_px: int, stride_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (x, y) of every full region of a level, in raster order."""
    xs = np.arange(0, width - region_px + 1, stride_px, dtype=np.int64)
    ys = np.arange(0, height - region_px + 1, stride_px, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return gx.ravel(), gy.ravel()


def mean_rgb(pixels: np.ndarray) -> np.ndarray:
    """Mean colour of an ``H×W×3`` uint8 region, exactly: per-column sums first (contiguous rows add
    up 20-30× faster than numpy's ``reshape(-1, 3).mean(axis=0)``, which cost more than decoding)."""
    h, w = pixels.shape[:2]
    cols = pixels.sum(axis=0, dtype=np.uint32)  # W×3: ≤ H·255 each
    return cols.sum(axis=0, dtype=np.uint64) / max(1, h * w)


@dataclass(frozen=True)
class _Reference:
    """A coarser level in memory and its scale: what every patch's mean colour must agree with."""

    pixels: np.ndarray
    scale_x: float  # level-0 px per reference px
    scale_y: float

    def mean(self, x0: int, y0: int, side0: int) -> np.ndarray:
        h, w = self.pixels.shape[:2]
        c0, c1 = int(x0 / self.scale_x), max(int(x0 / self.scale_x) + 1, round((x0 + side0) / self.scale_x))
        r0, r1 = int(y0 / self.scale_y), max(int(y0 / self.scale_y) + 1, round((y0 + side0) / self.scale_y))
        return mean_rgb(self.pixels[r0 : min(r1, h), c0 : min(c1, w)])


def _reference(info: SlideInfo, level: int, side0: int, coarsest: np.ndarray | None) -> _Reference | None:
    """The finest level coarser than ``level`` that fits in memory (≤ REFERENCE_PX), whole; None
    when there is none or a patch would cover under 4 of its pixels (too coarse to compare)."""
    for lv in info.levels[level + 1 :]:
        if lv.width * lv.height > REFERENCE_PX or side0 / lv.downsample < 4:
            continue
        if lv.index == info.levels[-1].index and coarsest is not None:
            pixels = coarsest
        else:
            with LevelReader(info, lv.index) as reader:
                pixels = reader.read(0, 0, lv.width, lv.height)
        return _Reference(pixels, info.width / lv.width, info.height / lv.height)
    log.info("%s: no pyramid level to check patches against: garbled-tile check off", info.path.name)
    return None


@dataclass(frozen=True)
class LevelCalibration:
    """A per-channel linear map from a coarser level's mean colours to the read level's.

    Pyramid levels that were encoded or colour-processed differently (another JPEG quality, a
    gamma or white-balance step) disagree by a consistent map; a garbled tile does not follow it.
    """

    slope: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def colour_off(self, patch_means: np.ndarray, ref_means: np.ndarray) -> np.ndarray:
        """How far (0-255, worst channel) each patch's mean colour is from the mapped reference."""
        expected = ref_means * np.asarray(self.slope) + np.asarray(self.offset)
        return np.abs(np.asarray(patch_means, np.float64) - expected).max(axis=1)


def calibrate_levels(
    patch_means: np.ndarray, ref_means: np.ndarray, *, threshold: float = GARBLED_MEAN_DIFF
) -> LevelCalibration:
    """The colour map from a coarser level to the patches that most of a slide's patches follow.

    ``patch_means`` and ``ref_means`` are ``(n, 3)`` mean colours of the same regions read at the
    patch level and at the coarser level. The map is fitted (least squares, slopes shrunk towards
    1) on the patches within ``threshold`` of it, starting from the median difference, three
    times. The identity map is returned when there are too few patches, when under half of them
    follow the map, or when the map is implausible (slope beyond 1/MAX_SLOPE..MAX_SLOPE, mid-grey
    moved by more than MAX_SHIFT): a slide mostly garbled must not be calibrated into looking
    intact.
    """
    p = np.asarray(patch_means, np.float64).reshape(-1, 3)
    r = np.asarray(ref_means, np.float64).reshape(-1, 3)
    identity = LevelCalibration()
    if len(p) < MIN_CALIBRATION_PATCHES:
        return identity
    slope, offset = np.ones(3), np.median(p - r, axis=0)
    ridge = 25.0  # colour variance (5²) that pulls a slope towards 1 on a slide of one colour
    for _ in range(3):
        follows = np.abs(p - (r * slope + offset)).max(axis=1) <= threshold
        if follows.sum() < max(MIN_CALIBRATION_PATCHES, len(p) / 2):
            return identity
        pi, ri = p[follows], r[follows]
        rc, pc = ri - ri.mean(axis=0), pi - pi.mean(axis=0)
        slope = ((rc * pc).mean(axis=0) + ridge) / ((rc * rc).mean(axis=0) + ridge)
        offset = pi.mean(axis=0) - slope * ri.mean(axis=0)
    if (
        np.any(slope < 1 / MAX_SLOPE)
        or np.any(slope > MAX_SLOPE)
        or np.any(np.abs(slope * 128 + offset - 128) > MAX_SHIFT)
    ):
        return identity
    if (np.abs(p - (r * slope + offset)).max(axis=1) <= threshold).sum() < len(p) / 2:
        return identity
    return LevelCalibration(
        (float(slope[0]), float(slope[1]), float(slope[2])),
        (float(offset[0]), float(offset[1]), float(offset[2])),
    )


@dataclass(frozen=True)
class _ReadPlan:
    """How a slide's patches are read: the level, its JPEG decoding scale (the level is read at
    ``1/decode_scale``), the region side in those pixels, and whether each patch is one JPEG tile
    stored as it is (``tile_copy``)."""

    level: int
    decode_scale: int
    region: int
    downsample: float  # level-0 px per read px
    tile_copy: bool = False


def _tile_copy_ok(
    info: SlideInfo, plan: _ReadPlan, stride: int, cfg: ExtractConfig, cell: tuple[int, int]
) -> bool:
    """Whether every patch is exactly one JPEG tile of the level (tile side = patch side, grid on
    the tile grid) whose standalone stream (JPEGTables merged) decodes to the tile's pixels: checked
    here on the tile of ``cell``, so a colour space libjpeg would guess otherwise is caught."""
    lv = info.levels[plan.level]
    if plan.decode_scale != 1 or plan.region != cfg.patch_px or not lv.tiled:
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


def _read_cells(
    info: SlideInfo,
    plan: _ReadPlan,
    cells: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    cfg: ExtractConfig,
    ref: _Reference | None,
    side0: int,
    cache_bytes: int,
) -> tuple[list[bytes], list[int], list[str], np.ndarray, np.ndarray]:
    """Read, resize and JPEG-encode the grid cells ``cells`` (or, ``plan.tile_copy``, take each
    cell's JPEG tile as it is); skip flat patches (one colour: a black/blank tile) and say why. Also
    returns each kept patch's mean colour and that of the same region of ``ref`` (for the
    garbled-tile check, decided per slide by :func:`calibrate_levels`; empty without ``ref``)."""
    jpegs: list[bytes] = []
    kept: list[int] = []
    bad: list[str] = []
    means: list[np.ndarray] = []
    ref_means: list[np.ndarray] = []
    ds, region, level = plan.downsample, plan.region, plan.level
    with LevelReader(info, level, cache_bytes=cache_bytes, decode_scale=plan.decode_scale) as reader:
        for i in cells:
            x, y = int(gx[i]), int(gy[i])
            stream = b""
            if plan.tile_copy:
                stream = reader.tile_stream(x // region, y // region)
                try:  # the checks need the tile's block means only: its DC coefficients (1/8 scale)
                    px = decode_jpeg_scaled(stream, 8)
                except (OSError, ValueError) as err:
                    where = f"{info.path.name} level {level} tile ({x // region}, {y // region})"
                    raise SlideReadError(f"{where}: cannot decode ({err})") from err
            else:
                px = reader.read(x, y, region, region)
            if px.min() == px.max():
                tiles = ", ".join(f"({tx}, {ty})" for tx, ty in reader.tiles_of(x, y, region, region))
                bad.append(f"flat: level {level} tile {tiles}")
                continue
            if ref is not None:
                means.append(mean_rgb(px))
                ref_means.append(ref.mean(round(x * ds), round(y * ds), side0))
            if not plan.tile_copy:
                if region != cfg.patch_px:
                    px = np.asarray(
                        Image.fromarray(px).resize((cfg.patch_px, cfg.patch_px), Image.Resampling.BOX)
                    )
                stream = imagecodecs.jpeg8_encode(px, level=cfg.jpeg_quality)
            jpegs.append(stream)
            kept.append(int(i))
    return jpegs, kept, bad, np.reshape(means, (-1, 3)), np.reshape(ref_means, (-1, 3))


def extract_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    cfg: ExtractConfig,
    *,
    threads: int = 1,
    max_level_px: int = MAX_WHOLE_LEVEL_PX,
) -> SlidePatches:
    """Extract one slide's tissue patches into ``out_dir`` (shard, manifest part, thumbnail).

    Raises a :class:`~digilut.errors.DigilutError` subclass naming the slide when it cannot be
    read; :func:`extract_slides` turns that into a report entry and goes on. ``threads`` read
    and encode patches in parallel (the output does not depend on it). A slide whose coarsest level
    has more than ``max_level_px`` pixels (a non-pyramidal slide) is never decoded whole.

    Unreadable tissue patches — flat (a black or blank tile) or garbled (a tile that decodes to
    pixels whose colour disagrees with a coarser level, beyond the slide's own level-to-level
    colour map: :func:`calibrate_levels`) — are dropped and named in ``warning``; more than
    ``cfg.max_constant_fraction`` of them fail the slide.
    """
    t0 = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    name = check_slide_name(slide_path.name)
    info = read_slide_info(slide_path, mpp=cfg.slide_mpp)
    choice = choose_level(info, cfg.target_mpp)
    level = info.levels[choice.level]
    # Read ≥ 2× finer than the target: decode JPEG tiles at 1/2, 1/4 or 1/8 in the DCT domain and
    # resize only the rest (2.06× → 1.03×); the grid is laid on the level at that scale.
    dscale = decode_scale_for(info, choice.level, choice.scale) if choice.scale >= 2 else 1
    resize = choice.scale / dscale
    region = round(cfg.patch_px * resize)
    stride = max(1, round(cfg.stride_px * resize))
    gx, gy = patch_grid(level.width // dscale, level.height // dscale, region, stride)
    ds = level.downsample * dscale
    x0 = np.round(gx * ds).astype(np.int64)
    y0 = np.round(gy * ds).astype(np.int64)
    side0 = round(region * ds)
    coarsest = info.levels[-1]
    small = coarsest.width * coarsest.height <= max_level_px
    cache_bytes = min(CACHE_BYTES, max_level_px * 3 // 2)  # decoded tiles a reader may hold
    overview_px = min(MASK_PX, math.isqrt(max_level_px))
    # A streamed overview decodes every tile/strip of the level: at 1/2-1/8 in the DCT domain.
    oscale = (
        1
        if small
        else decode_scale_for(info, coarsest.index, max(coarsest.width, coarsest.height) / overview_px)
    )
    with LevelReader(info, coarsest.index, cache_bytes=cache_bytes, decode_scale=oscale) as coarse_reader:
        # The coarsest level whole when small, else a streamed shrunk copy (bounded memory).
        overview = (
            coarse_reader.read(0, 0, coarsest.width, coarsest.height)
            if small
            else coarse_reader.read_shrunk(overview_px)
        )
    if not small:
        log.info(
            "%s: coarsest level %d×%d px is too large to read whole; overview streamed at %d×%d",
            name,
            coarsest.width,
            coarsest.height,
            overview.shape[1],
            overview.shape[0],
        )
    mask = tissue_mask(shrink(overview, MASK_PX), info.width, info.height, threshold=cfg.tissue_threshold)
    tissue = mask.fractions(x0, y0, np.full_like(x0, side0), np.full_like(y0, side0))
    keep = np.flatnonzero(tissue >= cfg.min_tissue_fraction)
    thumb_im = Image.fromarray(overview)
    thumb_im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BOX)
    thumb = np.asarray(thumb_im)
    ref = _reference(info, choice.level, side0, overview if small else None)
    plan = _ReadPlan(choice.level, dscale, region, ds)
    if len(keep) and _tile_copy_ok(info, plan, stride, cfg, (int(gx[keep[0]]), int(gy[keep[0]]))):
        plan = dataclasses.replace(plan, tile_copy=True)
    # Threads share the work in raster-order chunks (libjpeg-turbo releases the GIL), each with its
    # own reader and tile cache.
    chunks = [c for c in np.array_split(keep, max(1, threads)) if len(c)]
    with ThreadPoolExecutor(max_workers=max(1, len(chunks))) as pool:
        parts = list(
            pool.map(lambda c: _read_cells(info, plan, c, gx, gy, cfg, ref, side0, cache_bytes), chunks)
        )
    jpegs = [j for p in parts for j in p[0]]
    kept = [i for p in parts for i in p[1]]
    bad = [b for p in parts for b in p[2]]
    if ref is not None and kept:
        # Garbled tiles: patches whose colour does not follow this slide's level-to-level map.
        means, ref_means = np.concatenate([p[3] for p in parts]), np.concatenate([p[4] for p in parts])
        calibration = calibrate_levels(means, ref_means)
        off = calibration.colour_off(means, ref_means)
        garbled = np.flatnonzero(off > GARBLED_MEAN_DIFF)
        if len(garbled):
            with LevelReader(info, choice.level, decode_scale=plan.decode_scale) as reader:
                for j in garbled:
                    x, y = int(gx[kept[j]]), int(gy[kept[j]])
                    tiles = ", ".join(f"({tx}, {ty})" for tx, ty in reader.tiles_of(x, y, region, region))
                    bad.append(f"garbled (colour off by {off[j]:.0f}): level {choice.level} tile {tiles}")
            drop = set(garbled.tolist())
            jpegs = [jp for j, jp in enumerate(jpegs) if j not in drop]
            kept = [i for j, i in enumerate(kept) if j not in drop]
        slope, offset = np.asarray(calibration.slope), np.asarray(calibration.offset)
        if np.abs(slope - 1).max() > 0.02 or np.abs(offset).max() > 2:  # levels that differ in colour
            log.info(
                "%s: level %d = its reference level's colour × %s + %s (per channel)",
                name,
                choice.level,
                "/".join(f"{a:.2f}" for a in calibration.slope),
                "/".join(f"{b:.0f}" for b in calibration.offset),
            )
    if bad:
        shown = "; ".join(bad[:5]) + (f"; … {len(bad) - 5} more" if len(bad) > 5 else "")
        if len(bad) > cfg.max_constant_fraction * len(keep):
            raise SlideReadError(
                f"{name}: {len(bad)} of {len(keep)} tissue patches are unreadable ({shown}); "
                "the slide is skipped"
            )
        log.warning("%s: %d unreadable tissue patches dropped (%s)", name, len(bad), shown)
    stem = _stem(name)
    result = SlidePatches(
        name,
        "ok",
        len(kept),
        0.0,
        "",
        choice.level,
        choice.scale,
        info.mpp,
        info.width,
        info.height,
        cfg.digest(),
    )
    if bad:
        result.warning = f"{len(bad)} unreadable tissue patches dropped ({shown})"
    if not kept:
        result.status = "empty"
        result.error = str(
            TissueNotFoundError(
                f"{name}: no patch has ≥ {cfg.min_tissue_fraction:.0%} tissue (FAST threshold "
                f"{cfg.tissue_threshold}); nothing extracted, excluded from training"
            )
        )
    shard_rel = f"shards/{stem}.shard"
    index = write_shard(out_dir / shard_rel, jpegs)
    sel = np.asarray(kept, dtype=np.int64)
    part = pd.DataFrame(
        {
            "slide": name,
            "patient": patient_of(name),
            "x0": x0[sel],
            "y0": y0[sel],
            "w0": np.full(len(sel), side0),
            "h0": np.full(len(sel), side0),
            "level": choice.level,
            "tissue": tissue[sel],
            "shard": shard_rel,
            "offset": index.offset,
            "nbytes": index.nbytes,
        },
        columns=list(EXTRACT_COLUMNS),
    )
    write_manifest(part, out_dir / "parts" / f"{stem}.parquet")
    png = io.BytesIO()
    Image.fromarray(thumb).save(png, format="PNG")
    atomic_write(out_dir / "thumbnails" / f"{stem}.png", [png.getvalue()])  # a full disk names the file
    result.shard_sha256 = file_sha256(out_dir / shard_rel)
    result.seconds = time.perf_counter() - t0
    log.info(
        "%s: %d patches (%d tissue cells, level %d, %s) in %.1fs = %.0f patches/s",
        name,
        len(kept),
        len(keep),
        choice.level,
        "JPEG tiles copied"
        if plan.tile_copy
        else f"decoded at 1/{dscale}, {resize:.3g}× resize"
        if dscale > 1
        else f"{resize:.3g}× resize",
        result.seconds,
        len(kept) / max(result.seconds, 1e-9),
    )
    return result


def _extract_safely(slide_path: str, out_dir: str, cfg: ExtractConfig, threads: int = 1) -> SlidePatches:
    """extract_slide that returns a failed result instead of raising (runs in a worker)."""
    t0 = time.perf_counter()
    try:
        return extract_slide(slide_path, out_dir, cfg, threads=threads)
    except (DigilutError, OSError, ValueError, RuntimeError, MemoryError) as err:
        return SlidePatches(
            Path(slide_path).name,
            "failed",
            seconds=time.perf_counter() - t0,
            error=f"{type(err).__name__}: {err}",
            config=cfg.digest(),
        )


@dataclass
class PrepareReport:
    """Per-slide results of the steps ``extract`` and ``merge`` plus totals; saved as ``report.json``."""

    slides: dict[str, SlidePatches]
    seconds: float = 0.0
    config: dict[str, object] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)  # dropped/corrected CSV rows

    @property
    def failed(self) -> list[str]:
        return [s for s, r in self.slides.items() if r.status == "failed"]

    @property
    def patches(self) -> int:
        return sum(r.patches for r in self.slides.values())

    def to_json(self) -> str:
        return json.dumps(
            {
                "seconds": round(self.seconds, 3),
                "patches": self.patches,
                "config": self.config,
                "problems": self.problems,
                "slides": {k: v.to_dict() for k, v in sorted(self.slides.items())},
            },
            indent=2,
        )

    @classmethod
    def load(cls, path: Path) -> PrepareReport:
        data = json.loads(path.read_text())
        slides = {k: SlidePatches(**v) for k, v in data.get("slides", {}).items()}
        return cls(slides, data.get("seconds", 0.0), data.get("config", {}), data.get("problems", []))


def _reusable(prev: SlidePatches | None, out_dir: Path, cfg: ExtractConfig) -> bool:
    """A slide done before with the same settings, whose shard still has the same content."""
    if prev is None or prev.status not in ("ok", "empty") or prev.config != cfg.digest():
        return False
    stem = _stem(prev.slide)
    shard, part = out_dir / "shards" / f"{stem}.shard", out_dir / "parts" / f"{stem}.parquet"
    return shard.is_file() and part.is_file() and file_sha256(shard) == prev.shard_sha256


def extract_slides(
    slide_paths: list[Path],
    out_dir: Path,
    cfg: ExtractConfig,
    *,
    workers: int = 1,
    threads: int = 1,
    previous: dict[str, SlidePatches] | None = None,
) -> dict[str, SlidePatches]:
    """Extract many slides, reusing finished ones; a failing slide is reported, never fatal.

    ``workers`` ≥ 1 runs slides in that many spawned worker processes, so a slide whose reader
    crashes natively or runs out of memory kills only its worker: it is reported as
    ``worker killed`` and the others go on. ``workers=0`` runs in this process (tests, debugging).
    """
    previous = previous or {}
    results: dict[str, SlidePatches] = {}
    todo: list[Path] = []
    for p in slide_paths:
        if _reusable(previous.get(p.name), out_dir, cfg):
            results[p.name] = previous[p.name]
            log.info("%s: already extracted with the same settings (shard checksum matches), reused", p.name)
        else:
            todo.append(p)
    t0 = time.perf_counter()
    done_patches = 0

    def record(r: SlidePatches) -> None:
        nonlocal done_patches
        results[r.slide] = r
        done_patches += r.patches
        rate = done_patches / max(time.perf_counter() - t0, 1e-9)
        msg = (
            f"[{len(results)}/{len(slide_paths)}] {r.slide}: {r.status}, {r.patches} patches; "
            f"{rate:.0f} patches/s overall"
        )
        if r.status == "failed":
            log.error("%s — %s", msg, r.error)
        else:
            log.info("%s", msg)

    if workers <= 0:
        for p in todo:
            record(_extract_safely(str(p), str(out_dir), cfg, threads))
        return results

    def run_pool(paths: list[Path], n: int) -> list[Path]:
        """Run ``paths`` in a pool of ``n`` spawned workers; return those lost to a dead worker."""
        lost: list[Path] = []
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_extract_safely, str(p), str(out_dir), cfg, threads): p for p in paths}
            for fut, p in futures.items():
                try:
                    record(fut.result())
                except BrokenProcessPool:
                    lost.append(p)
        return lost

    if todo:
        # A dead worker breaks the whole pool: redo its unfinished slides one per pool to find it.
        for p in run_pool(todo, min(workers, len(todo))):
            if run_pool([p], 1):
                record(
                    SlidePatches(
                        p.name,
                        "failed",
                        config=cfg.digest(),
                        error="worker killed (the slide crashed or exhausted its worker process)",
                    )
                )
    return results
