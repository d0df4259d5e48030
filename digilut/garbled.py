"""The garbled-tile check: a tissue patch must agree in colour with a coarser level of its slide.

A pyramid is redundant, so a tile that decodes without error but to wrong pixels (zeroed or
corrupted JPEG data: libjpeg fills it with grey) shows as a patch whose mean colour differs from the
same region of a coarser level. Levels encoded or colour-processed differently (another JPEG
quality, a gamma or white-balance step) disagree by a consistent per-channel linear map, fitted per
slide (:func:`calibrate_levels`); a garbled tile does not follow it (:func:`find_garbled`).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

import numpy as np

from digilut.level_reader import LevelReader
from digilut.slide import SlideInfo

log = logging.getLogger(__name__)

# A tissue patch whose mean colour differs from the same region of a coarser level by more than
# this (0-255, any channel), after the slide's own level-to-level colour map, holds garbled pixels.
GARBLED_MEAN_DIFF = 24.0
# The level-to-level colour map is fitted only on slides with this many patches; it must keep
# slopes within 1/MAX_SLOPE..MAX_SLOPE and move mid-grey by at most MAX_SHIFT, and most patches
# must follow it; otherwise patches are judged against the coarser level as it is.
MIN_CALIBRATION_PATCHES = 8
MAX_SLOPE = 1.4
MAX_SHIFT = 48.0
REFERENCE_PX = 16 * 2**20  # the largest level held whole as that reference
# A copied JPEG tile (stored as it is) is dropped as corrupt when its bytes say so (:func:`suspect_stream`:
# e.g. this many zero bytes in a row in its entropy-coded data), decoded and checked when it may be of
# one colour, or when it is every this-many-th copied tile: the slide's level-to-level colour map is
# fitted on those and a level garbled throughout is seen (:func:`find_garbled`).
SUSPECT_ZERO_RUN = 16
CHECK_EVERY_MAX = 16


def mean_rgb(pixels: np.ndarray) -> np.ndarray:
    """Mean colour of an ``H×W×3`` uint8 region, exactly: per-column sums first (contiguous rows add
    up 20-30× faster than numpy's ``reshape(-1, 3).mean(axis=0)``, which cost more than decoding)."""
    h, w = pixels.shape[:2]
    cols = pixels.sum(axis=0, dtype=np.uint32)  # W×3: ≤ H·255 each
    return cols.sum(axis=0, dtype=np.uint64) / max(1, h * w)


@functools.lru_cache(maxsize=256)
def _symbol0_lengths(dht: bytes) -> tuple[tuple[int, int, int, bool], ...]:
    """(class, id, code length of symbol 0, whether the all-zero code is symbol 0) of each Huffman
    table in a DHT segment's body that codes symbol 0 (DC difference 0 / AC end-of-block); cached:
    every tile of a level repeats its tables."""
    out, i = [], 0
    while i + 17 <= len(dht):
        counts = dht[i + 1 : i + 17]
        symbols = dht[i + 17 : i + 17 + sum(counts)]
        if 0 in symbols:
            at = symbols.index(0)
            length = next(k + 1 for k in range(16) if sum(counts[: k + 1]) > at)
            out.append((dht[i] >> 4, dht[i] & 15, length, at == 0))  # canonical: code 0…0 is the first
        i += 17 + sum(counts)
    return tuple(out)


def _flat_scan_bits(stream: bytes) -> tuple[int, int, bool]:
    """Where the entropy-coded data of a baseline JPEG ``stream`` starts, and the most bits it can
    take when every block has the same colour (each block: the DC code of difference 0 and the AC
    end-of-block code; the first block of each component and of each restart interval: ≤ 27 bits
    and ≤ 8 padding bits, 2 marker bytes); and whether zero bits decode as such blocks (every
    table's all-zero code is symbol 0: then zero bytes can be intact data). (-1, 0, False) when the
    header cannot be parsed."""
    dc0: dict[int, int] = {}  # Huffman table id → code length of symbol 0 (DC diff 0 / AC EOB)
    ac0: dict[int, int] = {}
    zero_code: dict[tuple[int, int], bool] = {}  # (class, id) → its all-zero code is symbol 0
    comps: dict[int, tuple[int, int]] = {}  # component id → (h, v)
    width = height = restart = 0
    pos = 2
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker, size = stream[pos + 1], int.from_bytes(stream[pos + 2 : pos + 4], "big")
        body = stream[pos + 4 : pos + 2 + size]
        if marker == 0xC4:  # DHT: class/id, 16 counts, symbols
            for tc, th, length, first in _symbol0_lengths(body):
                (ac0 if tc else dc0)[th] = length
                zero_code[(tc, th)] = first
        elif marker in (0xC0, 0xC1):  # baseline / extended sequential
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            for k in range(body[5]):
                cid, hv = body[6 + 3 * k], body[7 + 3 * k]
                comps[cid] = (hv >> 4, hv & 15)
        elif marker == 0xDD:  # DRI
            restart = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:  # SOS: the scan follows
            if not comps or not width:
                return -1, 0, False
            hmax, vmax = max(h for h, _ in comps.values()), max(v for _, v in comps.values())
            mcus = -(-width // (8 * hmax)) * -(-height // (8 * vmax))
            bits, intervals, zeros_flat = 0, 1 + (mcus - 1) // restart if restart else 1, True
            for k in range(body[0]):
                cid, tables = body[1 + 2 * k], body[2 + 2 * k]
                if cid not in comps or tables >> 4 not in dc0 or tables & 15 not in ac0:
                    return -1, 0, False
                h, v = comps[cid]
                bits += mcus * h * v * (dc0[tables >> 4] + ac0[tables & 15]) + intervals * 27
                zeros_flat &= zero_code[(0, tables >> 4)] and zero_code[(1, tables & 15)]
            return pos + 2 + size, bits + intervals * 24, zeros_flat
        pos += 2 + size
    return -1, 0, False


# Headers already parsed (every tile of a level repeats its own: tables, frame, scan header) → what
# _flat_scan_bits said; a stream that starts with one of them parses alike (the parse reads no further).
_HEADERS: dict[bytes, tuple[int, int, bool]] = {}
_MAX_HEADERS = 64


def _scan_header(stream: bytes) -> tuple[int, int, bool]:
    """:func:`_flat_scan_bits` of ``stream``, parsed once per distinct header (15 µs a tile saved)."""
    for head, parsed in list(_HEADERS.items()):
        if stream.startswith(head):
            return parsed
    parsed = _flat_scan_bits(stream)
    if parsed[0] > 0 and len(_HEADERS) < _MAX_HEADERS:
        _HEADERS[stream[: parsed[0]]] = parsed
    return parsed


_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in a scan: only stuffed 0xFF 0x00 and RST0-7
MAYBE_FLAT = "one colour?"  # suspect_stream: small enough to be of one colour (decode to tell)


def suspect_stream(stream: bytes) -> str:
    """Why a JPEG tile that is stored without being decoded must not be stored as it is, or "" when
    its bytes look intact. Corrupt: a header that cannot be parsed, no EOI at the end (cut data;
    zero bytes may follow it),
    ``SUSPECT_ZERO_RUN`` zero bytes in a row in the scan (zeroed data, which decodes without error to
    the last block's colour, then grey: intact tiles measured at most 4 in a row), a marker other
    than RST0-7 inside the scan (random data). ``MAYBE_FLAT``: a scan small enough to be of one
    colour (a black or blank tile), or a zero run where the Huffman tables code zero bits as blocks
    of one colour (optimised tables may: zeroed data is then told apart only by decoding), to be
    decoded and checked."""
    start, flat_bits, zeros_flat = _scan_header(stream)
    if start < 0:
        return "header"
    end = len(stream.rstrip(b"\x00"))  # zero padding after the EOI is allowed
    if stream[end - 2 : end] != b"\xff\xd9":
        return "no EOI"
    zero_run = stream.find(bytes(SUSPECT_ZERO_RUN), start, end - 2) >= 0
    if zero_run and not zeros_flat:
        return "zero run"
    if _MARKER.search(stream, start, end - 2):
        return "marker in scan"
    if zero_run or (end - 2 - start) * 8 <= flat_bits:
        return MAYBE_FLAT
    return ""


@dataclass(frozen=True)
class Reference:
    """A coarser level in memory and its scale: what every patch's mean colour must agree with."""

    pixels: np.ndarray
    scale_x: float  # level-0 px per reference px
    scale_y: float

    def mean(self, x0: int, y0: int, side0: int) -> np.ndarray:
        h, w = self.pixels.shape[:2]
        c0, c1 = int(x0 / self.scale_x), max(int(x0 / self.scale_x) + 1, round((x0 + side0) / self.scale_x))
        r0, r1 = int(y0 / self.scale_y), max(int(y0 / self.scale_y) + 1, round((y0 + side0) / self.scale_y))
        return mean_rgb(self.pixels[r0 : min(r1, h), c0 : min(c1, w)])


def reference_level(info: SlideInfo, level: int, side0: int, coarsest: np.ndarray | None) -> Reference | None:
    """The finest level coarser than ``level`` that fits in memory (≤ REFERENCE_PX), whole; None
    when there is none or a patch would cover under 4 of its pixels (too coarse to compare).
    ``coarsest``: the coarsest level's pixels when already read."""
    for lv in info.levels[level + 1 :]:
        if lv.width * lv.height > REFERENCE_PX or side0 / lv.downsample < 4:
            continue
        if lv.index == info.levels[-1].index and coarsest is not None:
            pixels = coarsest
        else:
            with LevelReader(info, lv.index) as reader:
                pixels = reader.read(0, 0, lv.width, lv.height)
        return Reference(pixels, info.width / lv.width, info.height / lv.height)
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

    @property
    def is_identity(self) -> bool:
        """Whether the levels agree in colour (slopes within 2 % of 1, offsets within 2)."""
        slope, offset = np.asarray(self.slope), np.asarray(self.offset)
        return not (np.abs(slope - 1).max() > 0.02 or np.abs(offset).max() > 2)


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


def find_garbled(
    patch_means: np.ndarray, ref_means: np.ndarray
) -> tuple[np.ndarray, np.ndarray, LevelCalibration]:
    """The indices of the garbled patches, every patch's colour distance (0-255) from the slide's
    level-to-level map, and that map (:func:`calibrate_levels`)."""
    calibration = calibrate_levels(patch_means, ref_means)
    off = calibration.colour_off(patch_means, ref_means)
    return np.flatnonzero(off > GARBLED_MEAN_DIFF), off, calibration
