"""From per-patch probabilities to the DigiLut score, with post-processing tuned out of fold.

:func:`evaluate_predictions` chains the steps after :func:`~digilut.predict.predict_patches`:

1. the patch threshold maximising F1 on the out-of-fold predictions (``oof``), and the patch
   metrics of the test patches at that threshold, next to the original method's figures;
2. the box post-processing (:class:`~digilut.boxes.BoxesConfig`) tuned on the out-of-fold slides
   (:func:`~digilut.box_tuning.tune_boxes`) when their truth boxes are given, else the default;
3. exactly N boxes per test slide (N = its number of truth boxes, or ``counts``) and the mean F2.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from digilut.box_tuning import tune_boxes
from digilut.boxes import BoxesConfig, slide_boxes
from digilut.files import atomic_write
from digilut.predict import ORIGINAL_METHOD, PatchMetrics, patch_metrics, tune_threshold
from digilut.score import ScoreResult, score_slides

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """Patch metrics (at the OOF-tuned threshold), boxes and their DigiLut score."""

    patch: PatchMetrics
    oof_patch: PatchMetrics | None
    boxes_config: BoxesConfig
    tuned_f2: float | None  # mean F2 of the chosen boxes config on the OOF slides
    score: ScoreResult
    boxes: pd.DataFrame

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch": self.patch.to_dict(),
            "oof_patch": self.oof_patch.to_dict() if self.oof_patch else None,
            "original_method_patch": ORIGINAL_METHOD,
            "boxes_config": dataclasses.asdict(self.boxes_config),
            "oof_mean_f2": self.tuned_f2,
            "mean_f2": self.score.mean_f2,
            "score": self.score.to_dict(),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``metrics.json`` and ``boxes.csv`` into ``out_dir``; return the metrics path."""
        out_dir = Path(out_dir)
        atomic_write(out_dir / "boxes.csv", [self.boxes.to_csv(index=False).encode()])
        text = json.dumps(self.to_dict(), indent=2, default=str)
        atomic_write(out_dir / "metrics.json", [text.encode()])
        return out_dir / "metrics.json"

    def format_table(self) -> str:
        """The patch figures next to the original method's, and the mean F2, as plain text."""
        p, o = self.patch, ORIGINAL_METHOD
        lines = [
            f"{'patch metric':<14}{'this model':>12}{'original':>10}",
            f"{'AUROC':<14}{p.auroc:>12.4f}{'—':>10}",
            f"{'precision':<14}{p.precision:>12.4f}{o['precision']:>10.3f}",
            f"{'recall':<14}{p.recall:>12.4f}{o['recall']:>10.3f}",
            f"{'F1':<14}{p.f1:>12.4f}{o['f1']:>10.3f}",
            f"threshold {p.threshold:.3f} (tuned on out-of-fold predictions), {p.patches} patches, "
            f"{p.positives} positive",
            f"DigiLut mean F2 = {self.score.mean_f2:.4f} over {len(self.score.slides)} slide(s)",
        ]
        return "\n".join(lines)


def evaluate_predictions(
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    *,
    oof: pd.DataFrame | None = None,
    oof_truth: pd.DataFrame | None = None,
    counts: dict[str, int] | None = None,
    boxes_config: BoxesConfig | None = None,
    tune_base: BoxesConfig | None = None,
) -> Evaluation:
    """Score test-patch predictions ``pred`` (manifest rows + ``prob`` + ``label``) against ``truth``.

    ``oof``: out-of-fold predictions of the training slides (``oof.parquet`` of every fold) for the
    threshold; with ``oof_truth`` (their boxes) the boxes config is tuned on them unless
    ``boxes_config`` is given, starting from ``tune_base`` (its ``method`` and the fields the grid does
    not set). ``counts``: boxes per slide (default: each slide's truth count).
    """
    threshold = 0.5
    oof_patch = None
    if oof is not None and len(oof):
        threshold = tune_threshold(oof["label"].to_numpy(), oof["prob"].to_numpy())
        oof_patch = patch_metrics(oof["label"].to_numpy(), oof["prob"].to_numpy(), threshold)
    patch = patch_metrics(pred["label"].to_numpy(), pred["prob"].to_numpy(), threshold)
    tuned_f2 = None
    if boxes_config is None and oof is not None and oof_truth is not None and len(oof_truth):
        tuned = tune_boxes(oof, oof_truth, base=tune_base)
        boxes_config, tuned_f2 = tuned.best, tuned.best_f2
        log.info(
            "evaluate: boxes config tuned on %d OOF slide(s): mean F2 %.4f", oof["slide"].nunique(), tuned_f2
        )
    boxes_config = boxes_config or tune_base or BoxesConfig()
    if counts is None:
        counts = {str(k): int(v) for k, v in truth.groupby("filename").size().items()}
    boxes = slide_boxes(pred, counts, boxes_config)
    score = score_slides(boxes, truth, counts)
    log.info(
        "evaluate: patch AUROC %.4f, F1 %.4f at %.3f; mean F2 %.4f over %d slide(s)",
        patch.auroc, patch.f1, threshold, score.mean_f2, len(score.slides),
    )  # fmt: skip
    return Evaluation(patch, oof_patch, boxes_config, tuned_f2, score, boxes)
