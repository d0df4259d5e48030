"""Fast region reads of one pyramid level, straight from the TIFF's JPEG tiles (or strips).

Pixels come through tifffile + libjpeg-turbo (imagecodecs), each tile decoded once and cached
while a patch grid sweeps over it (:class:`LevelReader`). This is ~3× faster than reading patch
by patch through OpenSlide or pyFAST's PatchGenerator, and it raises on unreadable tiles instead
of returning black pixels. A tile's JPEG stream can also be taken as it is (:func:`jpeg_stream`)
or decoded at 1/2, 1/4 or 1/8 in the DCT domain (:func:`decode_jpeg_scaled`).
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from collections import OrderedDict

import numpy as np
import tifffile
from PIL import Image

from digilut.errors import SlideReadError
from digilut.slide import DECODE_SCALES, JPEG_COMPRESSION, SlideInfo

log = logging.getLogger(__name__)

# A decoded tile/strip larger than this is refused (a single-strip slide would need it all at once).
MAX_TILE_BYTES = 256 * 2**20
# The LevelReader's cache of decoded tiles holds at most this many bytes (wide strips are big).
CACHE_BYTES = 256 * 2**20
# The most bytes one read of back-to-back JPEG tiles takes (LevelReader.tile_streams).
MAX_READ_BYTES = 8 * 2**20
# Scaled decoding is checked once per reader against the full decode shrunk by a box mean:
# the mean absolute difference (0-255) above which the reader falls back to that box mean
# (libjpeg guessed another colour space than the TIFF's Photometric says).
SCALED_DECODE_MAX_DIFF = 4.0


# APP14 "Adobe" segment with transform 0: the components are RGB, not YCbCr (read by libjpeg).
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def jpeg_stream(tile: bytes | memoryview, tables: bytes | None, *, rgb: bool = False) -> bytes:
    """A TIFF JPEG tile/strip as a standalone JPEG stream: the page's JPEGTables (quantisation and
    Huffman tables between their own SOI and EOI) merged in after the tile's SOI. ``rgb``: the
    components are RGB (Photometric RGB without a JFIF marker, as Aperio writes them), which a
    stand-alone decoder would take for YCbCr: an Adobe marker with transform 0 says so."""
    mid = (_ADOBE_RGB if rgb else b"") + (tables[2:-2] if tables and len(tables) > 4 else b"")
    return b"".join((tile[:2], mid, tile[2:]))


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
        self._offsets = np.asarray(page.dataoffsets, np.int64)
        self._counts = np.asarray(page.databytecounts, np.int64)
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
        return self.tile_streams(np.array([tx]), np.array([ty]))[0]

    def tile_streams(self, tx: np.ndarray, ty: np.ndarray) -> list[bytes]:
        """The standalone JPEG streams of tiles ``(tx[k], ty[k])`` (see :meth:`tile_stream`), read
        with one ``pread`` per run of tiles whose data lie back to back in the file (a raster-order
        row of tiles usually does), at most ``MAX_READ_BYTES`` a read."""
        idx = np.asarray(ty, np.int64) * self.tiles_x + np.asarray(tx, np.int64)
        offs, counts = self._offsets[idx], self._counts[idx]
        bad = np.flatnonzero((counts == 0) | (offs + counts > self._file_size))
        if len(bad):
            k = int(bad[0])
            raise SlideReadError(
                f"{self.info.path.name} level {self.level.index} tile ({int(tx[k])}, {int(ty[k])}): tile "
                "data missing or beyond the end of the file (truncated slide?)"
            )
        ends = offs + counts
        # a new read starts where a tile's data do not follow the previous tile's
        starts = [*np.flatnonzero(np.r_[True, offs[1:] != ends[:-1]]).tolist(), len(idx)]
        tables, fd, out = self._page.jpegtables, self._fh.fileno(), []
        for a, b in itertools.pairwise(starts):
            while a < b:  # split a long run into reads of at most MAX_READ_BYTES
                c = a + 1
                while c < b and ends[c] - offs[a] <= MAX_READ_BYTES:
                    c += 1
                base = int(offs[a])
                block = memoryview(os.pread(fd, int(ends[c - 1]) - base, base))
                for k in range(a, c):
                    data = block[int(offs[k]) - base : int(ends[k]) - base]
                    out.append(jpeg_stream(data, tables, rgb=self._rgb))
                a = c
        return out

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
