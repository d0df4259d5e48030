"""Painting a realistic synthetic slide plan and writing it as a pyramidal tiled-JPEG TIFF.

The slide is rendered at the reference image's own scale, 0.5 µm/px (level 1, the pipeline's 20x),
whole in memory, strip by strip: the stained reference texture inside the fragments, vessels,
then red cells, pigment and nuclei as Gaussian discs, then the section's uneven thickness. Stains
act in HED space (Ruifrok & Johnston's matrix). Level 0 shows each level-1 pixel as 2×2 (a 20x
scan at 40x); the reduced levels are 2×2 area means of the level above, laid out as
:func:`digilut.synth_render.write_slide` lays them out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from digilut.synth_plan import MASK_PX, MPP0
from digilut.synth_real_plan import RealSlidePlan, Stain, mirror, reference_image, turned
from digilut.synth_render import TILE_PX, level_shapes

GLASS = np.array([242.0, 242.0, 242.0], np.float32)
NUCLEUS_RGB = np.array([68.0, 45.0, 118.0], np.float32)  # a lymphocyte's dense haematoxylin
NUCLEUS_SIGMA_PX = 7.0  # level-0 px: discs ≈ 24 px ≈ 6 µm across
PIGMENT_SIGMA_PX = 3.0  # level-0 px: an anthracotic granule
RED_CELL_SIGMA_PX = 5.0  # level-0 px: a red cell
STRIP_PX = 1024

# Ruifrok & Johnston: rows are the optical densities of haematoxylin, eosin and DAB.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)


def _alpha(mask: np.ndarray, y0: int, y1: int, width: int, cell_px: float) -> np.ndarray:
    """The coarse ``mask`` (cells of ``cell_px`` image px) bilinearly at rows ``y0..y1`` (float32)."""
    ys = (np.arange(y0, y1) + 0.5) / cell_px - 0.5
    xs = (np.arange(width) + 0.5) / cell_px - 0.5
    rows = np.clip(ys, 0, mask.shape[0] - 1)
    r0 = np.floor(rows).astype(int)
    r1 = np.minimum(r0 + 1, mask.shape[0] - 1)
    fr = (rows - r0).astype(np.float32)[:, None]
    m = mask[r0] * (1 - fr) + mask[r1] * fr  # (rows, mask cols)
    cols = np.clip(xs, 0, mask.shape[1] - 1)
    c0 = np.floor(cols).astype(int)
    c1 = np.minimum(c0 + 1, mask.shape[1] - 1)
    fc = (cols - c0).astype(np.float32)[None, :]
    return (m[:, c0] * (1 - fc) + m[:, c1] * fc).astype(np.float32)


def _stain(rgb: np.ndarray, s: Stain) -> np.ndarray:
    """``rgb`` (float, 0..255) with the slide's stain: HED concentrations scaled, DAB cast, brightness."""
    od = -np.log((np.asarray(rgb, np.float32) + 1.0) / 256.0)
    hed = od @ _HED_FROM_RGB
    hed *= np.array([s.h, s.e, 1.0], np.float32)
    hed[..., 2] = np.maximum(hed[..., 2], 0) + s.d
    out = 256.0 * np.exp(-(hed @ _RGB_FROM_HED)) - 1.0
    return np.clip(out * s.brightness, 0, 255).astype(np.float32)


def _vessels(
    plan: RealSlidePlan, y0: int, y1: int, rgb: np.ndarray, wall: np.ndarray, lumen: np.ndarray
) -> None:
    """Paint each vessel crossing level-1 rows ``y0..y1``: a pale lumen in a pink wall (in place)."""
    for inf in plan.infiltrates:
        r, cx, cy = inf.vessel_px / 2, inf.cx / 2, inf.cy / 2
        if r <= 0 or cy + r < y0 or cy - r >= y1:
            continue
        ya, yb = max(y0, int(cy - r)), min(y1, int(cy + r) + 1)
        xa, xb = max(0, int(cx - r)), min(rgb.shape[1], int(cx + r) + 1)
        yy, xx = np.mgrid[ya:yb, xa:xb]
        d = np.hypot(yy - cy, (xx - cx) * 1.2) / r
        sub = rgb[ya - y0 : yb - y0, xa:xb]
        sub[:] = np.where(
            ((d <= 1) & (d > 0.7))[..., None], wall, np.where((d <= 0.7)[..., None], lumen, sub)
        )


def _coverage(points: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Coverage (0..0.95) at level 1 of round bodies at ``points`` (``x, y, weight``, level-0 px):
    a Gaussian stamp of ``sigma_px`` (level-0 px) per body, summed and thresholded into discs."""
    sigma = sigma_px / 2
    k = int(3 * sigma) + 1
    oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
    stamp = np.exp(-(ox**2 + oy**2) / (2 * sigma**2)).astype(np.float32).ravel()
    h, w = shape
    x = np.round(points[:, 0] / 2).astype(np.int64)
    y = np.round(points[:, 1] / 2).astype(np.int64)
    xs, ys = x[:, None] + ox.ravel(), y[:, None] + oy.ravel()
    ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    weights = points[:, 2:3] * stamp[None, :]
    field_ = np.bincount((ys * w + xs)[ok], weights=weights[ok], minlength=h * w).reshape(h, w)
    return np.clip((field_.astype(np.float32) - 0.3) * 2.5, 0, 0.95)


def render_level1(plan: RealSlidePlan) -> np.ndarray:
    """Level 1 (0.5 µm/px, the reference image's own scale) of ``plan``: (height/2, width/2, 3) uint8.

    The stain is applied to the reference image and to the painted colours (a per-pixel map, so
    blending after it is the same picture up to rounding)."""
    ref, _ = reference_image()
    src = _stain(turned(ref, plan.turn, plan.flip), plan.stain)
    glass, nucleus = _stain(GLASS, plan.stain), _stain(NUCLEUS_RGB, plan.stain)
    wall, lumen = (
        _stain(np.float32([205, 120, 165]), plan.stain),
        _stain(np.float32([238, 222, 228]), plan.stain),
    )
    h, w = -(-plan.height // 2), -(-plan.width // 2)
    out = np.empty((h, w, 3), np.uint8)
    cols = mirror(np.arange(w) + plan.offset[0], src.shape[1])
    layers = [
        (_coverage(plan.blood, (h, w), RED_CELL_SIGMA_PX), _stain(np.float32([196, 52, 72]), plan.stain)),
        (_coverage(plan.pigment, (h, w), PIGMENT_SIGMA_PX), _stain(np.float32([38, 32, 30]), plan.stain)),
        (_coverage(plan.nuclei, (h, w), NUCLEUS_SIGMA_PX), nucleus),
    ]
    for y0 in range(0, h, STRIP_PX):
        y1 = min(h, y0 + STRIP_PX)
        rgb = src[mirror(np.arange(y0, y1) + plan.offset[1], src.shape[0])][:, cols]
        a = _alpha(plan.fragments, y0, y1, w, MASK_PX / 2)[..., None]
        rgb = glass + (rgb - glass) * a
        _vessels(plan, y0, y1, rgb, wall, lumen)
        for cover, colour in layers:
            d = cover[y0:y1, :, None]
            rgb = rgb + (colour - rgb) * d
        if plan.thickness is not None:  # a thicker section absorbs more: optical density × factor
            t = _alpha(plan.thickness, y0, y1, w, MASK_PX / 2)[..., None]
            rgb = 256.0 * np.power((rgb + 1.0) / 256.0, t) - 1.0
        out[y0:y1] = np.clip(rgb, 0, 255).astype(np.uint8)
    return out


def _halve(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    a = a[: 2 * h, : 2 * w].astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _level0_tiles(level1: np.ndarray, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """Level-0 tiles: each level-1 pixel as 2×2 (the texture's own scale is 0.5 µm/px)."""
    h, w = shape
    half = TILE_PX // 2
    for ty in range(-(-h // TILE_PX)):
        for tx in range(-(-w // TILE_PX)):
            block = level1[ty * half : (ty + 1) * half, tx * half : (tx + 1) * half]
            tile = np.zeros((TILE_PX, TILE_PX, 3), np.uint8)
            up = block.repeat(2, axis=0).repeat(2, axis=1)
            tile[: up.shape[0], : up.shape[1]] = up
            yield tile


def write_real_slide(plan: RealSlidePlan, path: Path) -> list[np.ndarray]:
    """Write ``plan`` as a pyramidal tiled-JPEG TIFF laid out as :func:`digilut.synth_render.write_slide`
    lays it out; returns the levels from level 1 on (level 0 is level 1 at 2×2 per pixel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = level_shapes(plan.width, plan.height)
    levels = [render_level1(plan)]
    for shape in shapes[2:]:
        levels.append(_halve(levels[-1], shape))
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=plan.width * plan.height > 2**31) as tif:
        for level, shape in enumerate(shapes):
            px_per_cm = 1e4 / (MPP0 * 2**level)
            data = (
                _level0_tiles(levels[0], shape) if level == 0 else levels[level - 1][: shape[0], : shape[1]]
            )
            tif.write(
                data,
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                compressionargs={"level": plan.stain.quality},
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                description=f"digilut synthetic slide (realistic)|mpp={MPP0}" if level == 0 else None,
                metadata=None,
                software="digilut",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
            )
    tmp.replace(path)
    return levels
