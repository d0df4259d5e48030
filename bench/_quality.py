"""The end-to-end quality run of ``python -m bench train``, and the CPU training-budget study.

Data (:func:`bench.train.prepare_data`): realistic synthetic slides (``--realism real``), training
patients drawn with seed 0, held-out patients with a seed never used while developing
(:data:`bench.train.HELDOUT_SEED`). Every fold is trained with :data:`QUALITY` on the training
patients, the fold models are averaged on the held-out slides (stride 128, as test slides are
predicted), and boxes are made with the defaults and with the configuration tuned on the
out-of-fold predictions (stride 128 too). Reported side by side:

* patch AUROC against the labeller's loose-box labels, and against *core* labels (positives at least
  half inside a box vs patches outside every box): the margin of a loose box is labelled lesion
  but is plain tissue;
* the generator's ceiling on the first (``label_ceiling_auroc``: the annotated infiltrate's exact
  cover as the score) and its colour-only AUROC (mean-RGB logistic regression across slides);
* mean F2, and the same boxes step on perfect patch labels (its bound);
* the backbone initialisation, in words.

The budget study (``python -m bench._quality study [NAME ...]``, not part of ``make bench``: an
hour on 2 cores) trains each configuration of :data:`STUDY` the same way and writes one row per
configuration to ``bench-out/train/study/study.csv``; configurations are chosen by their
out-of-fold figures, never by the held-out ones.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import cpu_seconds, quick

# The CPU quality config (2 cores, ≤ 15 min of training for the 3 folds): chosen by the study below.
QUALITY: dict[str, Any] = {
    "arch": "resnet18",
    "weights": "auto",
    "input_px": 64,
    "epochs": 12,
    "train_batch_size": 32,
    "lr": 1e-3,
    "patches_per_epoch": 960,
    "max_val_patches": 1000,
    "stain_scale": 0.2,
    "stain_shift": 0.05,
    "train_min_overlap": 0.0,
    "num_workers": 1,
}
QUALITY_GRID_PX = 128  # training patches on the stride-128 grid (4× the positives of stride 256)
QUICK_QUALITY = {**QUALITY, "input_px": 32, "epochs": 1, "train_batch_size": 16, "patches_per_epoch": 32,
                 "max_val_patches": 32, "num_workers": 0, "hidden_units": 16}  # fmt: skip
# The budget study: (overrides of QUALITY, training grid stride). All at weights=none (no pretrained
# weights can be downloaded here).
_OLD = {"epochs": 3, "max_val_patches": 0, "stain_scale": 0.05, "stain_shift": 0.01}
STUDY: dict[str, tuple[dict[str, Any], int]] = {
    "64px_3ep_stride256": (_OLD, 256),  # the earlier QUALITY (developed on --realism simple)
    "64px_12ep_hed": ({}, 128),  # = QUALITY (the best out-of-fold AUROC, by a hair)
    "64px_12ep_hed_core": ({"train_min_overlap": 0.5}, 128),
    "128px_5ep_hed_core": ({"input_px": 128, "epochs": 5, "train_min_overlap": 0.5}, 128),
    "128px_7ep_hed": ({"input_px": 128, "epochs": 7}, 128),  # ~15 min of training on 2 idle cores
}
TUNED_FIELDS = ("high", "low", "fit_miss_weight")
CORE_OVERLAP = 0.5


# prepare_data's result: the stride-256 split manifest, its train.csv, the held-out manifest, its train.csv
Prepared = tuple[Path, Path, Path, Path]


def training_manifest(split: Path, grid_px: int) -> Path:
    """The split manifest to train on: ``split`` (stride 256) as prepared, or the stride-128 grid beside
    it with every patient in the fold ``split`` gave it (so out-of-fold predictions stay out of fold)."""
    from digilut.manifest import read_manifest, write_manifest
    from digilut.split import undersample

    if grid_px == 256:
        return split
    grid = split.parent.parent / "train-patches-128"
    path = grid / "split.parquet"
    if not path.is_file():
        fold_of = read_manifest(split).groupby("patient", observed=True)["fold"].first()
        df = read_manifest(grid / "manifest.parquet", require=("label",))
        df = df.assign(split="train", fold=df["patient"].map(fold_of).astype(np.int8))
        df["sampled"] = undersample(df, 3.0, 0)
        write_manifest(df, path)
    return path


def oof_at_stride_128(models: list[Path], split: Path, pcfg: Any, device: Any) -> pd.DataFrame:
    """Out-of-fold predictions on the stride-128 grid beside ``split``: every training slide predicted
    by ``models[k]``, the model of the fold ``k`` that held it out."""
    from digilut.manifest import read_manifest
    from digilut.predict import predict_patches

    fold_of = read_manifest(split).groupby("slide", observed=True)["fold"].first()
    grid = split.parent.parent / "train-patches-128"
    rows = read_manifest(grid / "manifest.parquet")
    parts = [
        predict_patches(rows[rows["slide"].map(fold_of).eq(k)], grid, [model], pcfg, device)
        for k, model in enumerate(models)
    ]
    return pd.concat(parts, ignore_index=True)


def core_auroc(pred: pd.DataFrame) -> float | None:
    """AUROC of positives at least :data:`CORE_OVERLAP` inside a box against patches outside every box
    (NaN with a single class)."""
    from digilut.predict import safe_auroc

    if "overlap" not in pred:
        return None
    core = pred[(pred["overlap"] >= CORE_OVERLAP) | (pred["overlap"] <= 0)]
    return safe_auroc(core["overlap"] >= CORE_OVERLAP, core["prob"])


def _realism(folder: Path) -> dict[str, Any]:
    path = folder / "realism.json"
    if not path.is_file():  # --realism simple writes none
        return {"colour_auroc": None, "label_ceiling_auroc": None}
    report = json.loads(path.read_text())
    ceiling = report.get("label_ceiling_auroc")
    return {"colour_auroc": report["colour"]["auroc"], "label_ceiling_auroc": ceiling}


def fit_and_score(
    out: Path, prepared: Prepared, quality: dict[str, Any], grid_px: int, folds: int
) -> dict[str, Any]:
    """Train ``folds`` fold models with ``quality`` on the data :func:`bench.train.prepare_data`
    made, predict the held-out patients and the out-of-fold grid, score patches and boxes."""
    import torch

    from bench.boxes import miss_reasons
    from digilut.boxes import BoxesConfig
    from digilut.evaluate import evaluate_predictions
    from digilut.manifest import read_manifest, write_manifest
    from digilut.model import select_device
    from digilut.predict import PredictConfig, predict_patches
    from digilut.score import read_truth_csv
    from digilut.train import TrainConfig, train_fold

    device = select_device("auto")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the loader worker has the other core; faster on a busy 2-core box
    split, train_csv, heldout, heldout_csv = prepared
    cfg = TrainConfig(**quality)
    manifest = training_manifest(split, grid_px)
    c0, t0 = cpu_seconds(), time.perf_counter()
    results = [train_fold(manifest, k, out / "models" / f"fold{k}", cfg, device) for k in range(folds)]
    train_s, train_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    t0 = time.perf_counter()
    models = [out / "models" / f"fold{k}" / "model.pt" for k in range(folds)]
    pcfg = PredictConfig(predict_batch_size=128, num_workers=1)
    pred = predict_patches(read_manifest(heldout), heldout.parent, models, pcfg, device)
    predict_s = time.perf_counter() - t0
    oof = oof_at_stride_128(models, split, pcfg, device)
    torch.set_num_threads(threads)
    write_manifest(pred, out / "heldout-pred.parquet")
    write_manifest(oof, out / "oof-128.parquet")
    truth, oof_truth = read_truth_csv(heldout_csv), read_truth_csv(train_csv)
    ev = evaluate_predictions(pred, truth, oof=oof, boxes_config=BoxesConfig())
    tuned = evaluate_predictions(pred, truth, oof=oof, oof_truth=oof_truth)
    perfect = pred.assign(prob=pred["label"].astype(float))
    oracle = evaluate_predictions(perfect, truth, boxes_config=BoxesConfig())
    misses = miss_reasons(perfect, truth, oracle.boxes)
    ev.save(out / "quality")
    tuned.save(out / "quality-tuned")
    print(ev.format_table())
    print(tuned.score.format_table())
    print(f"perfect labels: mean F2 {oracle.score.mean_f2:.4f}; missed truth boxes and why:")
    print(misses.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return {
        "config": {**quality, "train_grid_px": grid_px, "folds": folds},
        "init": results[0].init.get("words", "not recorded"),
        "fold_val_auroc": [r.best_val_auroc for r in results],
        "train_patches_per_fold": [r.train_patches for r in results],
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "predict_s": predict_s,
        "heldout_patches": len(pred),
        "heldout_slides_scored": len(ev.score.slides),
        "patch": ev.patch.to_dict(),
        "patch_auroc_core": core_auroc(pred),
        "oof_auroc": tuned.oof_patch.auroc if tuned.oof_patch else None,
        "oof_tuned_f2": tuned.tuned_f2,
        "heldout": _realism(heldout_csv.parent),
        "training_set": _realism(train_csv.parent),
        "mean_f2": ev.score.mean_f2,
        "mean_f2_oof_tuned_boxes": tuned.score.mean_f2,
        "mean_f2_perfect_labels": oracle.score.mean_f2,
        "perfect_labels_misses": misses["reason"].value_counts().to_dict(),
        "oof_tuned_boxes_config": {k: getattr(tuned.boxes_config, k) for k in TUNED_FIELDS},
    }


def quality_run(out: Path, prepared: Prepared, folds: int) -> dict[str, Any]:
    """:data:`QUALITY` (quick: :data:`QUICK_QUALITY` at stride 256) through :func:`fit_and_score`."""
    if quick():
        return fit_and_score(out, prepared, QUICK_QUALITY, 256, folds)
    return fit_and_score(out, prepared, QUALITY, QUALITY_GRID_PX, folds)


def budget_study(out: Path, prepared: Prepared, names: list[str], folds: int) -> pd.DataFrame:
    """Train and score every named :data:`STUDY` configuration; one row each (``out/study.csv``)."""
    rows = []
    for name in names:
        over, grid_px = STUDY[name]
        f = fit_and_score(out / name, prepared, {**QUALITY, "weights": "none", **over}, grid_px, folds)
        rows.append(
            {
                "config": name,
                "train_cpu_s": f["train_cpu_s"],
                "train_s": f["train_s"],
                "oof_auroc": f["oof_auroc"],
                "oof_tuned_f2": f["oof_tuned_f2"],
                "heldout_auroc": f["patch"]["auroc"],
                "heldout_auroc_core": f["patch_auroc_core"],
                "heldout_f2": f["mean_f2"],
                "heldout_f2_tuned": f["mean_f2_oof_tuned_boxes"],
            }
        )
        table = pd.DataFrame(rows)
        table.to_csv(out / "study.csv", index=False)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    import logging

    from bench.train import FOLDS, prepare_data

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sys.argv[1:2] != ["study"]:
        sys.exit(f"usage: python -m bench._quality study [{' '.join(STUDY)}]")
    root = Path("bench-out") / "train"
    budget_study(root / "study", prepare_data(root), sys.argv[2:] or list(STUDY), FOLDS)
