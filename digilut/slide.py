"""Pyramidal TIFF slides: metadata (size, levels, mpp), checked, and the level to read a resolution at.

The pyramid is tifffile's ``series[0].levels`` (generic TIFF with reduced pages, SubIFD pyramids,
SVS, NDPI, Philips, OME): label, macro and thumbnail images are series of their own, never levels.
:func:`read_slide_info` refuses slides that are not TIFF, truncated, or without a plausible mpp;
:func:`choose_level` and :func:`decode_scale_for` say where and at which JPEG scale to read.
Pixels are read by :class:`digilut.level_reader.LevelReader`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import tifffile

from digilut.errors import SlideMetadataError, SlideNotFoundError, SlideReadError

log = logging.getLogger(__name__)

# A glass slide is 75 × 25 mm; a scan wider than this is implausible (the mpp must be wrong).
MAX_SLIDE_SIDE_MM = 80.0
MPP_RANGE = (0.05, 20.0)  # µm/px: from oil immersion to a thumbnail
# The largest level-0 side accepted: 80 mm at 0.2 µm/px. DigiLut slides reach ~197,000 px.
MAX_SLIDE_SIDE_PX = 400_000
_MPP_IN_TEXT = re.compile(r"\bmpp\s*=\s*([0-9.]+)", re.IGNORECASE)
_RESUNIT_UM = {2: 25400.0, 3: 10000.0}  # INCH, CENTIMETER in µm
JPEG_COMPRESSION = (7, 6)  # TIFF Compression tag: JPEG, old-style JPEG
DECODE_SCALES = (8, 4, 2)  # libjpeg-turbo's scaled IDCT: 1/8, 1/4, 1/2


@dataclass(frozen=True)
class Level:
    """One pyramid level: its TIFF page, size and real downsample from level 0."""

    index: int
    width: int
    height: int
    downsample: float  # level-0 px per level px, from the real sizes (W0 / W)
    series_level: int  # index in tifffile's ``series[0].levels``
    tiled: bool = True  # False: stored in strips (read strip by strip; OpenSlide cannot open it)


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of a slide: size, pyramid levels and microns per level-0 pixel."""

    path: Path
    width: int
    height: int
    mpp: float
    levels: tuple[Level, ...]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample


def _page_mpp(page: tifffile.TiffPage) -> float | None:
    desc = page.description or ""
    m = _MPP_IN_TEXT.search(desc)
    if m:
        return float(m.group(1))
    xres = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if xres is None or unit is None or int(unit.value) not in _RESUNIT_UM:
        return None
    num, den = xres.value
    if not num or not den:
        return None
    px_per_unit = num / den
    if px_per_unit <= 1.0:  # the TIFF default 1 px/inch (or 72 dpi screens) means "unknown"
        return None
    mpp = _RESUNIT_UM[int(unit.value)] / px_per_unit
    return None if mpp > 1000 else mpp


def _check_data_in_file(path: Path, page: tifffile.TiffPage, level: int) -> None:
    """Raise :class:`SlideReadError` when a page's tiles/strips end beyond the end of the file."""
    size = path.stat().st_size
    ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
    end = max(ends, default=0)
    if end > size:
        raise SlideReadError(
            f"{path}: truncated: page {page.index} (level {level}) has image data up to byte {end:,} "
            f"but the file has {size:,} bytes"
        )


def read_slide_info(path: str | Path, *, mpp: float | None = None) -> SlideInfo:
    """Read a slide's pyramid and mpp.

    ``mpp`` overrides the file's metadata (for slides without resolution tags). Raises
    :class:`SlideNotFoundError`, :class:`SlideReadError` (not a TIFF, truncated) or
    :class:`SlideMetadataError` (no mpp, implausible mpp).
    """
    path = Path(path)
    if not path.is_file():
        raise SlideNotFoundError(f"{path}: slide not found")
    if path.stat().st_size == 0:
        raise SlideReadError(f"{path}: empty file (0 bytes)")
    try:
        with tifffile.TiffFile(path) as tif:
            # tifffile builds the pyramid (generic TIFF, SVS, NDPI, Philips, OME, SubIFDs) and keeps
            # label, macro and thumbnail images in series of their own.
            if not tif.series:
                raise SlideReadError(f"{path}: TIFF has no image pages")
            pyramid = tif.series[0].levels
            base = pyramid[0].keyframe
            h0, w0 = int(base.imagelength), int(base.imagewidth)
            levels = []
            for i, lv in enumerate(pyramid):
                page = lv.keyframe
                if page.samplesperpixel < 3 or page.imagewidth < 1 or page.imagelength < 1:
                    continue
                w, h = int(page.imagewidth), int(page.imagelength)
                levels.append(Level(len(levels), w, h, w0 / w, i, bool(page.is_tiled)))
                _check_data_in_file(path, page, len(levels) - 1)
            file_mpp = _page_mpp(base)
    except SlideReadError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as err:
        raise SlideReadError(f"{path}: not a readable TIFF ({err})") from err
    if max(w0, h0) > MAX_SLIDE_SIDE_PX:
        raise SlideMetadataError(
            f"{path}: {w0}×{h0} px is larger than any slide scan (at most {MAX_SLIDE_SIDE_PX:,} px a side); "
            "refusing it"
        )
    levels.sort(key=lambda lv: lv.downsample)
    levels = [dataclasses.replace(lv, index=i) for i, lv in enumerate(levels)]
    if not levels or levels[0].downsample != 1.0:
        raise SlideReadError(f"{path}: no full-resolution RGB level found")
    chosen = mpp if mpp is not None else file_mpp
    if chosen is None:
        raise SlideMetadataError(
            f"{path}: no microns-per-pixel in the TIFF (resolution tags or 'mpp=' in the description); "
            "pass it explicitly, e.g. `digilut prepare --slide-mpp 0.25` (DigiLut slides are 0.25 µm/px, 40x)"
        )
    if not MPP_RANGE[0] <= chosen <= MPP_RANGE[1]:
        raise SlideMetadataError(
            f"{path}: mpp={chosen:g} µm/px is outside the plausible range {MPP_RANGE[0]}–{MPP_RANGE[1]}"
            + ("" if mpp is not None else " (read from the file)")
            + "; pass the right one explicitly, e.g. `digilut prepare --slide-mpp 0.25` (DigiLut slides "
            "are 0.25 µm/px, 40x)"
        )
    side_mm = max(w0, h0) * chosen / 1000
    if side_mm > MAX_SLIDE_SIDE_MM:
        raise SlideMetadataError(
            f"{path}: {w0}×{h0} px at mpp={chosen:g} µm/px is {side_mm:.0f} mm wide, more than a "
            f"{MAX_SLIDE_SIDE_MM:.0f} mm glass slide: the mpp is wrong (pass the right one with --slide-mpp)"
        )
    return SlideInfo(path, w0, h0, float(chosen), tuple(levels))


@dataclass(frozen=True)
class LevelChoice:
    """Where to read patches for a target resolution: a level and the resize factor."""

    level: int
    scale: float  # level px per output px (1.0 = read as is; >1 = read larger and shrink)


def choose_level(info: SlideInfo, target_mpp: float, *, tolerance: float = 0.02) -> LevelChoice:
    """The level to read ``target_mpp`` from: a level within ``tolerance`` of it, else the closest
    finer level (read a larger region and shrink). A slide coarser than the target is refused."""
    best: LevelChoice | None = None
    for lv in info.levels:
        lmpp = info.level_mpp(lv.index)
        ratio = target_mpp / lmpp
        if abs(ratio - 1.0) <= tolerance:
            return LevelChoice(lv.index, 1.0)
        if ratio > 1.0 and (best is None or ratio < best.scale):
            best = LevelChoice(lv.index, ratio)
    if best is None:
        raise SlideMetadataError(
            f"{info.path}: finest level is {info.mpp:g} µm/px, coarser than the target {target_mpp:g} µm/px"
        )
    shown = ", ".join(f"{lv.downsample:g}×" for lv in info.levels)
    log.info(
        "%s has levels at %s and mpp %g; %g µm/px needs %.3g×: reading level %d and resizing",
        info.path.name,
        shown,
        info.mpp,
        target_mpp,
        target_mpp / info.mpp,
        best.level,
    )
    return best


def decode_scale_for(info: SlideInfo, level: int, resize: float) -> int:
    """The largest JPEG decoding scale (8, 4, 2) not above ``resize`` (level px per output px)
    that the level's tiles allow; 1 when none does (not JPEG, odd tile sides, resize < 2)."""
    with tifffile.TiffFile(info.path) as tif:
        page = tif.series[0].levels[info.levels[level].series_level].keyframe
        if int(page.compression) not in JPEG_COMPRESSION:
            return 1
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:  # strips span the width: only their height must be a multiple of the scale
            th, tw = min(int(page.rowsperstrip or page.shape[0]), int(page.shape[0])), 8
    return next((s for s in DECODE_SCALES if s <= resize and th % s == 0 and tw % s == 0), 1)
