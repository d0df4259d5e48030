"""Per-slide stain normalisation, fitted on the slide's tissue: Reinhard (CIELAB statistics) or
Macenko (H&E stain vectors), chosen by ``stain_norm``.

Slides from different labs, scanners and days differ in stain colour. Both methods map each slide
onto one fixed reference; each keeps near-white background (glass) as it is, with a soft edge, so
glass stays white whatever the slide's stain.

* ``reinhard`` (Reinhard et al. 2001): every patch is converted to CIELAB, each channel is
  standardised with the **slide's** mean and standard deviation over tissue pixels (lighter than
  ``TISSUE_MAX_L`` excluded) and rescaled to the reference's (:data:`REFERENCE`), then converted
  back to RGB. Statistics: ``2×3`` (LAB mean, std).
* ``macenko`` (Macenko et al. 2009): optical density ``OD = -log((I + 1) / 256)`` of the slide's
  tissue pixels (every channel ≥ :data:`MACENKO_BETA`), the plane of its two main eigenvectors,
  the angles at the :data:`MACENKO_ALPHA` and ``100 - alpha`` percentiles in it → the H and E
  stain vectors (H: the larger red OD), and the 99th percentile of each stain's concentration.
  A patch's concentrations (least squares: the pseudo-inverse of its slide's stain matrix) are
  scaled to the reference's maxima and recombined with the reference stains (:data:`HE_REF`,
  :data:`MAX_C_REF`, the values of the reference implementations). Statistics: ``3×3`` (rows:
  H vector, E vector, ``(max C_H, max C_E, 1)``); all zeros when the slide had too little tissue
  to fit (the slide is then left as it is, with a warning naming it).

The statistics are fitted (:func:`fit_stain`) on up to :data:`FIT_PATCHES` of the slide's tissue
patches, spread evenly over its manifest rows, by :func:`digilut.data.slide_stain_stats`; each
patch row carries its slide's (:func:`row_stain_stats`), whatever their shape. Training and
prediction both use it, and the model file records ``stain_norm`` (:class:`ModelSpec`), so a model
always sees its inputs normalised as in training.

The arithmetic is batched torch on the device (:func:`normalise_stain`, called by
:func:`digilut.transforms.to_model_input`); the fit reads a few dozen patches per slide.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from digilut.errors import ConfigError

log = logging.getLogger(__name__)
FIT_PATCHES = 32  # patches per slide the statistics are fitted on
TISSUE_MAX_L = 88.0  # CIELAB lightness above which a pixel counts as background (glass)
# The reference: LAB mean and standard deviation over tissue pixels of a typical H&E slide at 20x.
REFERENCE = torch.tensor([[62.0, 28.0, -14.0], [14.0, 9.0, 7.0]])
# Macenko: the reference H and E optical-density vectors (columns) and 99th-percentile concentrations
HE_REF = torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAX_C_REF = torch.tensor([1.9705, 1.0308])
MACENKO_BETA = 0.15  # a pixel with OD below this in any channel is too light to fit the stains on
MACENKO_ALPHA = 1.0  # percentile of the angles in the stain plane that gives the extreme stains
MACENKO_MIN_PIXELS = 500  # fewer tissue pixels than this: no fit, the slide is left as it is
# OD (mean over channels) where the Macenko mapping fades in: glass ~0.0-0.06, L=88 grey ~0.14
TISSUE_OD = (0.10, 0.19)
STATS_SHAPES = {"reinhard": (2, 3), "macenko": (3, 3)}  # a slide's statistics per method
_QUANTILE_PIXELS = 1 << 22  # the percentiles are taken over at most this many pixels (a stride)

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


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """``-log((I + 1) / 256)`` of intensities ``I`` in 0..255 (0 for white, finite for black)."""
    return -torch.log((x + 1.0) / 256.0)


def macenko_stats(images: torch.Tensor, slide: str = "") -> torch.Tensor:
    """Macenko statistics (``3×3``: H vector, E vector, ``(max C_H, max C_E, 1)``) of the tissue
    pixels of uint8 ``N×H×W×3`` patches; all zeros (no fit) when fewer than
    :data:`MACENKO_MIN_PIXELS` pixels are tissue, with a warning naming ``slide``."""
    od = optical_density(images.reshape(-1, 3).double())
    od = od[(od >= MACENKO_BETA).all(1)]
    if len(od) < MACENKO_MIN_PIXELS:
        log.warning(
            "stain: %s has %d tissue pixel(s) with OD ≥ %.2f in every channel (< %d): too little to fit "
            "Macenko stain vectors; its patches are left as they are",
            slide or "slide",
            len(od),
            MACENKO_BETA,
            MACENKO_MIN_PIXELS,
        )
        return torch.zeros(STATS_SHAPES["macenko"])
    _, vecs = torch.linalg.eigh(torch.cov(od.T))  # eigenvalues ascending
    plane = vecs[:, [2, 1]]  # the two main directions; the first made to point into positive OD
    plane[:, 0] *= torch.sign(plane[:, 0].sum())
    sample = od[:: -(-len(od) // _QUANTILE_PIXELS)]
    proj = sample @ plane
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    ends = torch.quantile(phi, torch.tensor([MACENKO_ALPHA, 100.0 - MACENKO_ALPHA], dtype=phi.dtype) / 100)
    v = plane @ torch.stack((torch.cos(ends), torch.sin(ends)))  # 3×2: the two extreme stains
    he = v if v[0, 0] > v[0, 1] else v.flip(1)  # haematoxylin first: the larger red OD
    conc = torch.linalg.lstsq(he, sample.T).solution  # 2×n
    max_c = torch.quantile(conc, 0.99, dim=1)
    return torch.cat((he.T, torch.stack((*max_c, torch.ones((), dtype=he.dtype)))[None])).float()


def macenko_normalise(
    x: torch.Tensor, stats: torch.Tensor, he_ref: torch.Tensor = HE_REF, max_c_ref: torch.Tensor = MAX_C_REF
) -> torch.Tensor:
    """Map float ``B×3×H×W`` patches in [0, 1] whose slides have Macenko ``stats`` (``B×3×3``) onto
    the reference stains ``he_ref`` (``3×2``) and concentrations ``max_c_ref`` (2); rows of
    ``stats`` that are all zeros (no fit) leave their patch as it is."""
    stats = stats.to(x.device, torch.float32)
    he_ref, max_c_ref = he_ref.to(x.device, torch.float32), max_c_ref.to(x.device, torch.float32)
    fitted = stats[:, 2, 2] > 0
    he = torch.where(fitted.view(-1, 1, 1), stats[:, :2].transpose(1, 2), he_ref)  # B×3×2
    od = optical_density(x * 255.0)
    conc = torch.einsum("bsc,bchw->bshw", torch.linalg.pinv(he), od)
    scale = torch.where(fitted.view(-1, 1), max_c_ref / stats[:, 2, :2].clamp_min(1e-6), 1.0)
    mapped = torch.einsum("cs,bshw->bchw", he_ref, conc * scale.view(-1, 2, 1, 1))
    out = ((256.0 * torch.exp(-mapped) - 1.0) / 255.0).clamp(0.0, 1.0)
    lo, hi = TISSUE_OD
    tissue = ((od.mean(1, keepdim=True) - lo) / (hi - lo)).clamp(0.0, 1.0) * fitted.view(-1, 1, 1, 1)
    return tissue * out + (1.0 - tissue) * x


def fit_stain(images: torch.Tensor, method: str, slide: str = "") -> torch.Tensor:
    """A slide's statistics for ``method`` (shape :data:`STATS_SHAPES`) from uint8 ``N×H×W×3``
    patches of its tissue."""
    if method == "reinhard":
        return tissue_lab_stats(images)
    if method == "macenko":
        return macenko_stats(images, slide)
    raise ConfigError(f"stain_norm={method!r}: no statistics to fit; choose one of {', '.join(STATS_SHAPES)}")


def describe_stain(stats: np.ndarray, method: str) -> str:
    """One log line's worth of a slide's statistics."""
    if method == "macenko":
        h, e, (ch, ce, fitted) = stats
        if not fitted:
            return "Macenko not fitted (identity)"
        vectors = "Macenko H {:.2f}/{:.2f}/{:.2f}, E {:.2f}/{:.2f}/{:.2f}".format(*h, *e)
        return f"{vectors}, max C {ch:.2f}/{ce:.2f}"
    mean, std = stats
    return "LAB mean {:.1f}/{:.1f}/{:.1f}, std {:.1f}/{:.1f}/{:.1f}".format(*mean, *std)


def normalise_stain(x: torch.Tensor, stats: torch.Tensor, method: str) -> torch.Tensor:
    """Normalise float ``B×3×H×W`` patches in [0, 1] with their slides' ``method`` statistics
    (``B×`` :data:`STATS_SHAPES` ``[method]``)."""
    shape = STATS_SHAPES.get(method)
    if shape is None:
        raise ConfigError(f"stain_norm={method!r}: choose one of {', '.join(STATS_SHAPES)}")
    if tuple(stats.shape) != (x.shape[0], *shape):
        raise ConfigError(
            f"stain_norm={method}: statistics of shape {tuple(stats.shape)} for {x.shape[0]} patch(es); "
            f"expected {(x.shape[0], *shape)}"
        )
    return reinhard_normalise(x, stats) if method == "reinhard" else macenko_normalise(x, stats)


def row_stain_stats(rows: pd.DataFrame, by_slide: dict[str, np.ndarray], method: str) -> torch.Tensor:
    """``len(rows)×`` :data:`STATS_SHAPES` ``[method]`` statistics: each row gets its slide's (index a
    batch with its ``index``)."""
    if not len(rows):
        return torch.zeros((0, *STATS_SHAPES[method]))
    return torch.from_numpy(np.stack([by_slide[str(s)] for s in rows["slide"]]).astype(np.float32))
