"""Per-slide Reinhard stain normalisation: colour round trip, identity on the reference, and
stain-shifted copies of a slide normalised back to nearly the same pixels (metamorphic)."""

from __future__ import annotations

import numpy as np
import torch

from digilut.stain import lab_to_rgb, reinhard_normalise, rgb_to_lab, tissue_lab_stats

# Ruifrok & Johnston haematoxylin and eosin optical-density vectors
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.11])


def _he_patches(h_gain: float = 1.0, e_gain: float = 1.0, n: int = 4, px: int = 64) -> torch.Tensor:
    """uint8 ``n×px×px×3`` H&E-like patches: nuclei (haematoxylin), stroma (eosin) and glass, with the
    stain amounts multiplied by ``h_gain``/``e_gain`` (another lab's staining of the same tissue)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:px, :px]
    out = []
    for _ in range(n):
        h = np.zeros((px, px))
        for cy, cx in rng.uniform(0, px, (12, 2)):
            h += 1.2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        e = 0.35 + 0.25 * rng.random((px, px))
        glass = xx > 0.75 * px  # a quarter of background
        h[glass], e[glass] = 0.0, 0.02
        od = h_gain * h[..., None] * _H + e_gain * e[..., None] * _E
        out.append(np.clip(255 * np.exp(-od), 0, 255).round().astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255.0


def test_lab_round_trip_is_identity() -> None:
    x = _float(_he_patches())
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-4, rtol=0)
    white = rgb_to_lab(torch.ones(1, 3, 1, 1)).flatten()
    torch.testing.assert_close(white, torch.tensor([100.0, 0.0, 0.0]), atol=0.05, rtol=0)


def test_normalisation_is_identity_on_the_reference() -> None:
    images = _he_patches()
    stats = tissue_lab_stats(images)
    x = _float(images)
    same = reinhard_normalise(x, stats.expand(len(x), 2, 3), reference=stats)
    assert (same - x).abs().max() < 2e-3


def test_stain_shifted_copies_normalise_to_nearly_the_same_pixels() -> None:
    base = _he_patches()
    x = _float(base)
    ref = tissue_lab_stats(base)
    normal = reinhard_normalise(x, tissue_lab_stats(base).expand(len(x), 2, 3), ref)
    for gains in ((1.4, 0.8), (0.7, 1.3), (1.25, 1.25)):
        shifted = _he_patches(*gains)
        y = _float(shifted)
        before = (y - x).abs().mean()
        after = (
            (reinhard_normalise(y, tissue_lab_stats(shifted).expand(len(y), 2, 3), ref) - normal).abs().mean()
        )
        assert before > 0.015, gains  # the shift is visible
        assert after < 0.35 * before, (gains, float(before), float(after))  # measured 0.10–0.31
