"""Tiny patch datasets for the training/prediction tests: shards and a split manifest, no slides.

Lesion patches are cell-dense and dark purple, the others pink with sparse nuclei (like
:mod:`digilut.synth`), so a small network separates them within an epoch or two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from digilut.manifest import write_manifest
from digilut.shards import encode_jpeg, write_shard
from digilut.train_config import TrainConfig

# The smallest training that still learns the fixture patches: test_train and test_gpu share it.
TINY_TRAIN = TrainConfig(
    input_px=64, epochs=2, train_batch_size=16, num_workers=0, weights="none", hidden_units=32, lr=1e-3
)

NORMAL_RGB = (236, 160, 196)
LESION_RGB = (190, 115, 175)


def render_patch(rng: np.random.Generator, px: int, lesion: bool) -> np.ndarray:
    """An H&E-like ``px×px×3`` uint8 patch."""
    img = np.empty((px, px, 3), np.float32)
    img[:] = LESION_RGB if lesion else NORMAL_RGB
    img += rng.normal(0, 6, (px, px, 1))
    density = 0.006 if lesion else 0.001
    n = rng.poisson(density * px * px)
    ys, xs = rng.integers(0, px - 3, n), rng.integers(0, px - 3, n)
    colour = np.array((52, 25, 100) if lesion else (70, 40, 120), np.float32)
    for y, x in zip(ys, xs, strict=True):
        img[y : y + 3, x : x + 3] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def make_patch_manifest(
    out: Path,
    *,
    patients: int = 5,
    grid: int = 5,
    px: int = 64,
    folds: int = 2,
    test_patients: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``out/shards/*.shard`` and ``out/manifest.parquet`` (split into folds); return its path.

    Each patient has one slide with a ``grid × grid`` patch grid (level-0 step ``2·px``); the
    patches of a square block in the slide's corner are lesions (about a third of them).
    The last ``test_patients`` patients are the test split; the others go round-robin into folds.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        patient = f"P{p:03d}"
        slide = f"{patient}_a.tif"
        shard = f"shards/{patient}_a.shard"
        block = int(np.ceil(grid * 0.6))
        cells = [(r, c) for r in range(grid) for c in range(grid)]
        labels = [int(r < block and c < block) for r, c in cells]
        jpegs = [encode_jpeg(render_patch(rng, px, bool(lab))) for lab in labels]
        index = write_shard(out / shard, jpegs)
        test = p >= patients - test_patients
        for (r, c), lab, off, nb in zip(cells, labels, index.offset, index.nbytes, strict=True):
            rows.append(
                {
                    "slide": slide,
                    "patient": patient,
                    "x0": c * 2 * px,
                    "y0": r * 2 * px,
                    "w0": 2 * px,
                    "h0": 2 * px,
                    "level": 1,
                    "tissue": 1.0,
                    "shard": shard,
                    "offset": int(off),
                    "nbytes": int(nb),
                    "overlap": float(lab),
                    "label": lab,
                    "split": "test" if test else "train",
                    "fold": -1 if test else p % folds,
                    "sampled": True,
                }
            )
    return write_manifest(pd.DataFrame(rows), out / "manifest.parquet")


def tiny_training_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split manifest of 5 patients, 5×5 patches of 64 px each, in 2 folds (for TINY_TRAIN)."""
    return make_patch_manifest(tmp_path_factory.mktemp("data"), patients=5, grid=5, px=64, folds=2)
