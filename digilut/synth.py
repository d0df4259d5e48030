"""Synthetic DigiLut-like datasets: ``images/<patient>_a.tif`` / ``_b.tif`` and ``train.csv``.

``synth_dataset(out, cfg)`` writes ``out/images/<patient>_a.tif`` / ``_b.tif`` and
``out/train.csv`` in the challenge format, two slides per patient. ``cfg.realism`` chooses the
generator: ``simple`` plans slides with :mod:`digilut.synth_plan` (fragments, lesions, boxes of the
real sizes and gaps) and writes them with :mod:`digilut.synth_render` (procedural H&E-like texture,
a real 40x pyramid, any size up to full); ``real`` is :mod:`digilut.synth_real` (real H&E texture,
per-slide stain, infiltrate lesions, loose boxes). Deterministic per seed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from digilut.synth_plan import SynthConfig, patient_names, plan_slide
from digilut.synth_render import write_slide

log = logging.getLogger(__name__)


def synth_dataset(out: str | Path, cfg: SynthConfig) -> pd.DataFrame:
    """Write a synthetic DigiLut dataset to ``out`` and return its boxes (the rows of train.csv)."""
    if cfg.realism == "real":
        from digilut.synth_real import synth_real_dataset

        return synth_real_dataset(out, cfg)[0]
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 1])
    rows = []
    t0 = time.perf_counter()
    names = patient_names(cfg.patients, cfg.seed)
    for p, patient in enumerate(names):
        for s, suffix in enumerate(("a", "b")):
            name = f"{patient}_{suffix}.tif"
            positive = bool(rng.random() < cfg.positive_fraction)
            plan = plan_slide(name, cfg, seed=cfg.seed * 100_003 + p * 2 + s, positive=positive)
            write_slide(plan, images / name, quality=cfg.jpeg_quality)
            for x1, x2, y1, y2 in plan.boxes:
                rows.append((name, x1, x2, y1, y2, plan.width, plan.height))
            log.info("synth %s: %d×%d px, %d box(es)", name, plan.width, plan.height, len(plan.boxes))
    df = pd.DataFrame(rows, columns=["filename", "x1", "x2", "y1", "y2", "max_x", "max_y"])
    df.to_csv(out / "train.csv", index=False)
    log.info(
        "synth: %d slides, %d boxes in %.1fs -> %s", 2 * cfg.patients, len(df), time.perf_counter() - t0, out
    )
    return df
