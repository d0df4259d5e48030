"""Per-slide stain normalisation (Reinhard et al. 2001, in CIELAB), fitted on the slide's tissue.

Slides from different labs, scanners and days differ in stain colour. ``stain_norm="reinhard"``
maps each slide's colour statistics onto one fixed reference: every patch of a slide is converted
to CIELAB, each channel is standardised with the **slide's** mean and standard deviation over
tissue pixels (near-white background excluded) and rescaled to the reference's, then converted
back to RGB; background pixels (lighter than ``TISSUE_MAX_L``) are left as they are, with a soft
edge, so glass stays white whatever the slide's stain. The slide statistics are fitted on up to
:data:`FIT_PATCHES` of the slide's tissue patches, spread evenly over its manifest rows, by
:func:`digilut.data.slide_stain_stats`; training and prediction both use it, and the model file records
``stain_norm`` (:class:`ModelSpec`), so a model always sees its inputs normalised as in training.

The arithmetic is batched torch on the device (:func:`reinhard_normalise`, called by
:func:`digilut.transforms.to_model_input`); the fit reads a few dozen patches per slide.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)
FIT_PATCHES = 32  # patches per slide the statistics are fitted on
TISSUE_MAX_L = 88.0  # CIELAB lightness above which a pixel counts as background (glass)
# The reference: LAB mean and standard deviation over tissue pixels of a typical H&E slide at 20x.
REFERENCE = torch.tensor([[62.0, 28.0, -14.0], [14.0, 9.0, 7.0]])

_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])  # D65
_EPS = (6.0 / 29.0) ** 3


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB ``B×3×H×W`` in [0, 1] → CIELAB (D65): L in [0, 100], a and b about ±100."""
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("bchw,dc->bdhw", lin, _XYZ_FROM_RGB.to(x.device))
    xyz = xyz / _WHITE.to(x.device).view(1, 3, 1, 1)
    f = torch.where(
        xyz > _EPS, xyz.clamp_min(_EPS) ** (1.0 / 3.0), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB ``B×3×H×W`` → sRGB in [0, 1] (out-of-gamut colours clipped)."""
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack((fy + lab[:, 1] / 500.0, fy, fy - lab[:, 2] / 200.0), 1)
    xyz = torch.where(f > 6.0 / 29.0, f**3, 3 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0))
    xyz = xyz * _WHITE.to(lab.device).view(1, 3, 1, 1)
    lin = torch.einsum("bchw,dc->bdhw", xyz, _RGB_FROM_XYZ.to(lab.device)).clamp(0.0, 1.0)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


def tissue_lab_stats(images: torch.Tensor) -> torch.Tensor:
    """LAB mean and standard deviation (``2×3``) over the tissue pixels of uint8 ``N×H×W×3`` patches
    (every pixel when fewer than 1 % are tissue)."""
    lab = rgb_to_lab(images.permute(0, 3, 1, 2).float().div(255.0))
    pixels = lab.permute(1, 0, 2, 3).reshape(3, -1)
    tissue = pixels[0] < TISSUE_MAX_L
    if int(tissue.sum()) >= 0.01 * pixels.shape[1]:
        pixels = pixels[:, tissue]
    return torch.stack((pixels.mean(1), pixels.std(1).clamp_min(1e-3)))


def reinhard_normalise(
    x: torch.Tensor, stats: torch.Tensor, reference: torch.Tensor = REFERENCE
) -> torch.Tensor:
    """Map float ``B×3×H×W`` patches in [0, 1] whose slides have LAB ``stats`` (``B×2×3``: mean,
    std) onto ``reference`` (``2×3``) channel by channel in CIELAB."""
    stats = stats.to(x.device, torch.float32)
    ref = reference.to(x.device, torch.float32)
    lab = rgb_to_lab(x)
    src_mean, src_std = stats[:, 0].view(-1, 3, 1, 1), stats[:, 1].view(-1, 3, 1, 1)
    mapped = (lab - src_mean) / src_std * ref[1].view(1, 3, 1, 1) + ref[0].view(1, 3, 1, 1)
    # glass stays as it is: the mapping fades out over ±4 L around the tissue/background cut
    tissue = ((TISSUE_MAX_L + 4.0 - lab[:, :1]) / 8.0).clamp(0.0, 1.0)
    return lab_to_rgb(tissue * mapped + (1.0 - tissue) * lab)


def row_stain_stats(rows: pd.DataFrame, by_slide: dict[str, np.ndarray]) -> torch.Tensor:
    """``len(rows)×2×3`` statistics: each row gets its slide's (index a batch with its ``index``)."""
    if not len(rows):
        return torch.zeros((0, 2, 3))
    return torch.from_numpy(np.stack([by_slide[str(s)] for s in rows["slide"]]).astype(np.float32))
