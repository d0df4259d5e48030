"""Device-side transforms of patch batches: uint8 patches → the model's normalised input, with
colour jitter and H&E stain augmentation in training (:func:`to_model_input`).

Everything here is arithmetic on a ``B×3×H×W`` batch, done on the model's device in a few
kernels; the CPU side (:mod:`digilut.data`) only reads, decodes and flips/rotates uint8 patches.
Random draws come from a generator on the device, seeded per batch by the caller.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from digilut.errors import ConfigError
from digilut.stain import normalise_stain
from digilut.train_config import ColourAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H&E(-DAB) stain vectors (Ruifrok & Johnston, as in scikit-image's rgb2hed)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_UNIT = float(-np.log(1e-6))  # scikit-image's stain unit, so shift jitter reads like its values
_LUMA = (0.299, 0.587, 0.114)


def _uniform(
    n: int, shape: tuple[int, ...], spread: float, gen: torch.Generator, device: torch.device, centre: float
) -> torch.Tensor:
    u = torch.rand((n, *shape), generator=gen, device=device)
    return centre + (2 * u - 1) * spread


def colour_augment(x: torch.Tensor, aug: ColourAugment, gen: torch.Generator) -> torch.Tensor:
    """Apply :class:`ColourAugment` to a float ``B×3×H×W`` batch in [0, 1] (per-patch draws)."""
    n, dev = x.shape[0], x.device
    if aug.stain_scale or aug.stain_shift:
        hed_from_rgb = _HED_FROM_RGB.to(dev)
        rgb_from_hed = _RGB_FROM_HED.to(dev)
        od = -torch.log(x.clamp_min(1e-6))  # B×3×H×W optical density
        hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
        alpha = _uniform(n, (3, 1, 1), aug.stain_scale, gen, dev, 1.0)
        beta = _uniform(n, (3, 1, 1), aug.stain_shift * _OD_UNIT, gen, dev, 0.0)
        od = torch.einsum("bdhw,dc->bchw", hed * alpha + beta, rgb_from_hed)
        x = torch.exp(-od.clamp_min(0.0))
    if aug.brightness:
        x = x * _uniform(n, (1, 1, 1), aug.brightness, gen, dev, 1.0)
    luma = torch.tensor(_LUMA, device=dev).view(1, 3, 1, 1)
    if aug.contrast:
        mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (x - mean) * _uniform(n, (1, 1, 1), aug.contrast, gen, dev, 1.0) + mean
    if aug.saturation:
        grey = (x * luma).sum(1, keepdim=True)
        x = (x - grey) * _uniform(n, (1, 1, 1), aug.saturation, gen, dev, 1.0) + grey
    return x.clamp(0.0, 1.0)


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    *,
    input_px: int,
    channels_last: bool = False,
    augment: ColourAugment | None = None,
    generator: torch.Generator | None = None,
    stain: torch.Tensor | None = None,
    stain_norm: str = "none",
) -> torch.Tensor:
    """uint8 ``B×H×W×3`` patches → the model's normalised float ``B×3×input_px×input_px`` input.

    Moves the batch to ``device`` (non-blocking from pinned memory), resizes when ``input_px``
    differs from the patch size (antialiased), maps each patch onto the reference stain with its
    slide's ``stain_norm`` statistics ``stain`` (``B×…``, :mod:`digilut.stain`; needed unless
    ``stain_norm`` is ``none``), applies ``augment`` with
    ``generator`` (a generator on ``device``), normalises with the ImageNet mean and std.
    """
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_px or x.shape[-2] != input_px:
        x = F.interpolate(x, size=(input_px, input_px), mode="bilinear", antialias=True, align_corners=False)
    if stain_norm != "none":
        if stain is None:
            raise ConfigError(f"to_model_input: stain_norm={stain_norm} needs the slides' stain statistics")
        x = normalise_stain(x, stain, stain_norm)
    if augment is not None:
        if generator is None:
            raise ConfigError("to_model_input: augment needs a generator on the device")
        x = colour_augment(x, augment, generator)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
