"""Reading pyramidal TIFF slides: metadata, level choice and fast region reads.

The pyramid is tifffile's ``series[0].levels`` (generic TIFF with reduced pages, SubIFD pyramids,
SVS, NDPI, Philips, OME): label, macro and thumbnail images are series of their own, never levels.

Pixels come straight from the TIFF's JPEG tiles (or strips) through tifffile + libjpeg-turbo
(imagecodecs), each tile decoded once and cached while a patch grid sweeps over it. This is ~3×
faster than reading patch by patch through OpenSlide or pyFAST's PatchGenerator, and it raises on
unreadable tiles instead of returning black pixels.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from digilut.errors import SlideMetadataError, SlideNotFoundError, SlideReadError

log = logging.getLogger(__name__)

# A glass slide is 75 × 25 mm; a scan wider than this is implausible (the mpp must be wrong).
MAX_SLIDE_SIDE_MM = 80.0
MPP_RANGE = (0.05, 20.0)  # µm/px: from oil immersion to a thumbnail
# The largest level-0 side accepted: 80 mm at 0.2 µm/px. DigiLut slides reach ~197,000 px.
MAX_SLIDE_SIDE_PX = 400_000
# A decoded tile/strip larger than this is refused (a single-strip slide would need it all at once).
MAX_TILE_BYTES = 256 * 2**20
# The LevelReader's cache of decoded tiles holds at most this many bytes (wide strips are big).
CACHE_BYTES = 256 * 2**20
_MPP_IN_TEXT = re.compile(r"\bmpp\s*=\s*([0-9.]+)", re.IGNORECASE)
_RESUNIT_UM = {2: 25400.0, 3: 10000.0}  # INCH, CENTIMETER in µm
JPEG_COMPRESSION = (7, 6)  # TIFF Compression tag: JPEG, old-style JPEG
DECODE_SCALES = (8, 4, 2)  # libjpeg-turbo's scaled IDCT: 1/8, 1/4, 1/2
# Scaled decoding is checked once per reader against the full decode shrunk by a box mean:
# the mean absolute difference (0-255) above which the reader falls back to that box mean
# (libjpeg guessed another colour space than the TIFF's Photometric says).
SCALED_DECODE_MAX_DIFF = 4.0


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


# APP14 "Adobe" segment with transform 0: the components are RGB, not YCbCr (read by libjpeg).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def jpeg_stream(tile: bytes, tables: bytes | None, *, rgb: bool = False) -> bytes:
    """A TIFF JPEG tile/strip as a standalone JPEG stream: the page's JPEGTables (quantisation and
    Huffman tables between their own SOI and EOI) merged in after the tile's SOI. ``rgb``: the
    components are RGB (Photometric RGB without a JFIF marker, as Aperio writes them), which a
    stand-alone decoder would take for YCbCr: an Adobe marker with transform 0 says so."""
    head = tile[:2] + (_ADOBE_RGB if rgb else b"")
    if not tables or len(tables) <= 4:
        return head + tile[2:]
    return head + tables[2:-2] + tile[2:]


def decode_jpeg_scaled(stream: bytes, scale: int) -> np.ndarray:
    """Decode a standalone JPEG stream at ``1/scale`` of its size (``scale`` in 1, 2, 4, 8) in the
    DCT domain (libjpeg-turbo's scaled IDCT through Pillow's ``draft``): a ``ceil(H/scale) ×
    ceil(W/scale) × 3`` uint8 RGB array. The colour space is libjpeg's guess from the stream."""
    with Image.open(io.BytesIO(stream)) as im:
        w, h = im.size
        if scale > 1:
            im.draft("RGB", (-(-w // scale), -(-h // scale)))
        arr = np.asarray(im.convert("RGB"))
    want = (-(-h // scale), -(-w // scale))
    if arr.shape[:2] != want:
        got = f"{arr.shape[1]}×{arr.shape[0]}"
        raise ValueError(f"decoded {got} px at 1/{scale}, expected {want[1]}×{want[0]}")
    return arr


def reduce_box(pixels: np.ndarray, scale: int) -> np.ndarray:
    """``pixels`` shrunk by the integer ``scale`` with a box mean (edges: the pixels that exist)."""
    if scale == 1:
        return pixels
    return np.asarray(Image.fromarray(pixels).reduce(scale))


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


class LevelReader:
    """Reads regions of one level, decoding each TIFF tile/strip once (LRU cache of decoded tiles).

    ``decode_scale`` > 1 (2, 4 or 8; JPEG tiles whose sides it divides) reads the level at
    ``1/decode_scale`` of its size, decoding every tile at that scale in the DCT domain: region
    coordinates are then in those scaled pixels (``width × height`` = ``ceil(level / scale)``).
    The first tile decoded is also decoded in full and shrunk by a box mean; when the two differ by
    more than ``SCALED_DECODE_MAX_DIFF`` (a colour space libjpeg guesses differently from the TIFF)
    every tile is decoded in full and box-shrunk instead, with a warning. :func:`decode_scale_for`
    picks the scale for a resize factor.

    Raises :class:`SlideReadError` naming the slide, level and tile when a tile cannot be decoded or
    its bytes lie beyond the end of the file (a truncated slide).
    """

    def __init__(
        self,
        info: SlideInfo,
        level: int,
        *,
        cache_tiles: int = 256,
        cache_bytes: int = CACHE_BYTES,
        decode_scale: int = 1,
    ) -> None:
        self.info = info
        self.level = info.levels[level]
        self._tif = tifffile.TiffFile(info.path)
        self._fh = self._tif.filehandle
        page = self._tif.series[0].levels[self.level.series_level].keyframe
        self._page = page
        self._file_size = info.path.stat().st_size
        if page.is_tiled:
            self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.tile_h, self.tile_w = int(page.rowsperstrip or page.shape[0]), int(page.shape[1])
            self.tile_h = min(self.tile_h, int(page.shape[0]))
        self.tiles_x = -(-self.level.width // self.tile_w)
        self.tiles_y = -(-self.level.height // self.tile_h)
        tile_bytes = self.tile_w * self.tile_h * max(3, int(page.samplesperpixel))
        if tile_bytes > MAX_TILE_BYTES:
            self._tif.close()
            kind = "tile" if page.is_tiled else "strip"
            raise SlideReadError(
                f"{info.path.name} level {self.level.index}: one {kind} is {self.tile_w}×{self.tile_h} px "
                f"({tile_bytes / 2**20:.0f} MiB decoded), more than the {MAX_TILE_BYTES / 2**20:.0f} MiB "
                "a reader may hold; re-save the slide tiled (e.g. vips tiffsave --tile --pyramid)"
            )
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self.is_jpeg = int(page.compression) in JPEG_COMPRESSION
        # tifffile's rule (jpeg_decode_colorspace): Photometric RGB without JFIF is RGB-coded JPEG.
        self._rgb = int(page.photometric) == 2 and not page.is_jfif
        s = decode_scale
        odd = self.tile_h % s or (page.is_tiled and self.tile_w % s)
        if s != 1 and (s not in DECODE_SCALES or not self.is_jpeg or odd):
            self._tif.close()
            raise ValueError(
                f"{info.path.name} level {self.level.index}: cannot decode at 1/{s} "
                f"({'JPEG' if self.is_jpeg else 'not JPEG'}, {self.tile_w}×{self.tile_h} px tiles); "
                "use decode_scale_for()"
            )
        self.decode_scale = s
        self.full_tile_w, self.full_tile_h = self.tile_w, self.tile_h
        self.tile_w, self.tile_h = -(-self.tile_w // s), self.tile_h // s
        self.width, self.height = -(-self.level.width // s), -(-self.level.height // s)
        self._scaled_checked = s == 1
        self._fallback = False
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        # Bounded in bytes too: a striped slide's strips span the whole width.
        self._cache_tiles = max(1, min(cache_tiles, cache_bytes * s * s // tile_bytes))
        self.tiles_decoded = 0

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> LevelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        key = (ty, tx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        idx = ty * self.tiles_x + tx
        off, n = int(self._offsets[idx]), int(self._counts[idx])
        where = f"{self.info.path.name} level {self.level.index} tile ({tx}, {ty})"
        if n == 0 or off + n > self._file_size:
            raise SlideReadError(
                f"{where}: tile data missing or beyond the end of the file (truncated slide?)"
            )
        self._fh.seek(off)
        data = self._fh.read(n)
        try:
            if self._scaled_checked and self.decode_scale > 1:
                stream = jpeg_stream(data, self._page.jpegtables, rgb=self._rgb)
                tile = decode_jpeg_scaled(stream, self.decode_scale)
            else:
                tile = self._decode_full(data, idx, where)
                if not self._scaled_checked:
                    tile = self._check_scaled(data, tile, where)
        except SlideReadError:
            raise
        except Exception as err:  # codecs raise their own error types
            raise SlideReadError(f"{where}: cannot decode ({err})") from err
        self._cache[key] = tile
        self.tiles_decoded += 1
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def _decode_full(self, data: bytes, idx: int, where: str) -> np.ndarray:
        arr, _, _ = self._page.decode(data, idx, jpegtables=self._page.jpegtables)
        if arr is None:
            raise SlideReadError(f"{where}: cannot decode (no data)")
        return np.asarray(arr).reshape(arr.shape[-3:])[..., :3]

    def _check_scaled(self, data: bytes, full: np.ndarray, where: str) -> np.ndarray:
        """The first tile at 1/scale: the scaled decode when it agrees with the box-shrunk full decode
        (then every later tile is decoded scaled), else the box-shrunk full decode from now on."""
        s = self.decode_scale
        boxed = reduce_box(np.ascontiguousarray(full), s)
        if self._fallback:
            return boxed
        scaled = decode_jpeg_scaled(jpeg_stream(data, self._page.jpegtables, rgb=self._rgb), s)
        diff = float(np.abs(scaled[: boxed.shape[0], : boxed.shape[1]].astype(np.int16) - boxed).mean())
        if scaled.shape != boxed.shape or diff > SCALED_DECODE_MAX_DIFF:
            log.warning(
                "%s: decoding at 1/%d differs from the full decode by %.1f on average (colour space?): "
                "decoding in full and shrinking instead",
                where,
                s,
                diff,
            )
            self._fallback = True
            return boxed
        self._scaled_checked = True
        return scaled

    def tile_stream(self, tx: int, ty: int) -> bytes:
        """Tile ``(tx, ty)``'s JPEG data as a standalone JPEG stream (JPEGTables merged in)."""
        idx = ty * self.tiles_x + tx
        off, n = int(self._offsets[idx]), int(self._counts[idx])
        if n == 0 or off + n > self._file_size:
            raise SlideReadError(
                f"{self.info.path.name} level {self.level.index} tile ({tx}, {ty}): tile data missing "
                "or beyond the end of the file (truncated slide?)"
            )
        self._fh.seek(off)
        return jpeg_stream(self._fh.read(n), self._page.jpegtables, rgb=self._rgb)

    def tiles_of(self, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
        """The ``(tx, ty)`` tiles (or strips, ``tx = 0``) that the region ``x, y, w, h`` touches."""
        return [
            (tx, ty)
            for ty in range(y // self.tile_h, (y + h - 1) // self.tile_h + 1)
            for tx in range(x // self.tile_w, (x + w - 1) // self.tile_w + 1)
        ]

    def read_shrunk(self, max_side_px: int) -> np.ndarray:
        """The whole level shrunk by an integer factor to at most ``max_side_px`` a side (box mean),
        read band by band: memory stays within one band of ``factor`` rows plus the cache. (With
        ``decode_scale`` > 1 the tiles are already decoded shrunk: the factor applies after it.)"""
        f = max(1, -(-max(self.width, self.height) // max_side_px))
        out_w, out_h = self.width // f, self.height // f
        out = np.empty((out_h, out_w, 3), np.uint8)
        band = max(1, self.tile_h // f)  # output rows per read: about one tile row
        for oy in range(0, out_h, band):
            rows = min(band, out_h - oy)
            block = self.read(0, oy * f, out_w * f, rows * f)
            out[oy : oy + rows] = np.asarray(Image.fromarray(block).reduce(f)) if f > 1 else block
        return out

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB pixels of the level region ``[x, x+w) × [y, y+h)`` (must lie inside the level)."""
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"region {x},{y} {w}×{h} outside level {self.width}×{self.height}")
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // self.tile_h, (y + h - 1) // self.tile_h + 1):
            for tx in range(x // self.tile_w, (x + w - 1) // self.tile_w + 1):
                tile = self._tile(ty, tx)
                ty0, tx0 = ty * self.tile_h, tx * self.tile_w
                sy0, sx0 = max(y, ty0), max(x, tx0)
                sy1 = min(y + h, ty0 + self.tile_h, self.height)
                sx1 = min(x + w, tx0 + self.tile_w, self.width)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out
