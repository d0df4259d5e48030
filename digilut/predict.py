"""Ensemble prediction of patch probabilities, and patch-level metrics.

:func:`predict_patches` runs every fold model on the patches of a manifest (for test slides:
extracted with stride 128 at 20x, so patches overlap by half) and returns the manifest rows with a
``prob`` column: the mean of the models' sigmoid outputs. Each patch is read and decoded once per
batch and the same device batch feeds all the models; on a GPU under bf16 autocast and
channels-last. Heatmaps and boxes are the next steps (:mod:`digilut.heatmap`, ``digilut.boxes``).

Patch metrics (AUROC, precision, recall, F1 at a threshold) compare with the original method's
single ResNet18 on the real data: recall 0.536, precision 0.034, F1 0.063.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, precision_recall_fscore_support, roc_auc_score

from digilut.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it runs: the metrics below serve torch-free CPU steps
    import torch

    from digilut.model import LoadedModel

log = logging.getLogger(__name__)

# Patch-level figures of the original method (single ResNet18, real DigiLut test patients).
ORIGINAL_METHOD = {"recall": 0.536, "precision": 0.034, "f1": 0.063}


@dataclass(frozen=True)
class PredictConfig:
    predict_batch_size: int = 256  # patches per inference batch
    num_workers: int = 2
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: bool = True  # on CUDA

    def __post_init__(self) -> None:
        if not 1 <= self.predict_batch_size <= 8192:
            raise ConfigError(f"predict_batch_size={self.predict_batch_size} must be in 1..8192")
        if not 0 <= self.num_workers <= 64:
            raise ConfigError(f"num_workers={self.num_workers} must be in 0..64")


def amp_dtype(device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16, or fp16 on a GPU without bf16 (then training needs a GradScaler)."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Ensemble:
    """Fold models that predict together: one uint8 batch in, the mean probability out."""

    def __init__(
        self,
        models: Sequence[LoadedModel],
        device: torch.device,
        *,
        amp: bool = True,
        channels_last: bool = True,
    ) -> None:
        if not models:
            raise ConfigError("an ensemble needs at least one model file")
        self.models = list(models)
        methods = sorted({m.spec.stain_norm for m in self.models} - {"none"})
        if len(methods) > 1:  # one set of slide statistics is fitted per ensemble
            raise ConfigError(
                "an ensemble's models must share one stain_norm; got "
                + ", ".join(f"{m.path}: {m.spec.stain_norm}" for m in self.models)
            )
        self.stain_norm = methods[0] if methods else "none"  # the statistics ``stain`` must hold
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.channels_last = channels_last and device.type == "cuda"
        if self.channels_last:
            import torch

            for m in self.models:
                m.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(
        cls,
        paths: Sequence[str | Path],
        device: torch.device,
        *,
        amp: bool = True,
        channels_last: bool = True,
    ) -> Ensemble:
        from digilut.model import load_model

        return cls([load_model(p, device) for p in paths], device, amp=amp, channels_last=channels_last)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def needs_stain(self) -> bool:
        """Whether a model was trained on stain-normalised patches (then give ``stain`` to predict)."""
        return self.stain_norm != "none"

    def predict_batch(self, images: torch.Tensor, stain: torch.Tensor | None = None) -> torch.Tensor:
        """Mean probability (float32, on the CPU) of uint8 ``B×H×W×3`` patches; ``stain``: the
        patches' slide stain statistics (:attr:`stain_norm`'s, :mod:`digilut.stain`), needed by
        :attr:`needs_stain`."""
        import torch

        from digilut.transforms import to_model_input

        with torch.inference_mode():
            inputs: dict[tuple[int, str], torch.Tensor] = {}  # one input per model input size and stain
            total = torch.zeros(images.shape[0], device=self.device)
            for m in self.models:
                key = (m.spec.input_px, m.spec.stain_norm)
                if key not in inputs:
                    if m.spec.stain_norm != "none" and stain is None:
                        raise ConfigError(
                            f"{m.path}: trained with stain_norm={m.spec.stain_norm}: pass stain"
                        )
                    inputs[key] = to_model_input(
                        images,
                        self.device,
                        input_px=m.spec.input_px,
                        channels_last=self.channels_last,
                        stain=stain if m.spec.stain_norm != "none" else None,
                        stain_norm=m.spec.stain_norm,
                    )
                with torch.autocast(self.device.type, dtype=amp_dtype(self.device), enabled=self.amp):
                    logits = m.model(inputs[key])
                total += torch.sigmoid(logits.float())
            return (total / len(self.models)).cpu()


def predict_patches(
    rows: pd.DataFrame,
    root: str | Path,
    model_files: Sequence[str | Path],
    cfg: PredictConfig,
    device: torch.device,
) -> pd.DataFrame:
    """``rows`` (manifest rows; shards relative to ``root``) with ``prob``: the ensemble's mean."""
    from digilut.data import PatchDataset, make_loader, make_sampler

    ensemble = Ensemble.load(model_files, device, amp=cfg.amp, channels_last=cfg.channels_last)
    out = rows.reset_index(drop=True).copy()
    probs = np.full(len(out), np.nan, np.float32)
    if len(out):
        dataset = PatchDataset(root, out, augment=False, local_copy_bytes=0)  # each patch read once
        loader = make_loader(
            dataset,
            make_sampler(dataset.labels, "sequential"),
            batch_size=cfg.predict_batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
        stain = None
        if ensemble.needs_stain:  # each slide's stain fitted on its patches, as in training
            from digilut.data import slide_stain_stats
            from digilut.stain import row_stain_stats

            method = ensemble.stain_norm
            stain = row_stain_stats(out, slide_stain_stats(root, out, method), method)
        t0 = time.perf_counter()
        for batch in loader:
            batch_stain = None if stain is None else stain[batch.index]
            probs[batch.index.numpy()] = ensemble.predict_batch(batch.images, batch_stain).numpy()
        dt = time.perf_counter() - t0
        log.info(
            "predict: %d patches × %d model(s) in %.1fs (%.0f patches/s) on %s",
            len(out),
            len(ensemble),
            dt,
            len(out) / max(dt, 1e-9),
            device,
        )
    out["prob"] = probs
    return out


@dataclass(frozen=True)
class PatchMetrics:
    """Patch-level classification figures at ``threshold`` (``auroc`` NaN with a single class)."""

    auroc: float
    precision: float
    recall: float
    f1: float
    threshold: float
    patches: int
    positives: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def safe_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC, or NaN when ``labels`` hold a single class."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, probs))


def patch_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> PatchMetrics:
    """AUROC and precision/recall/F1 of ``probs >= threshold`` against binary ``labels``."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, pred, average="binary", labels=[True], zero_division=0.0
    )
    return PatchMetrics(
        safe_auroc(labels, probs),
        float(precision),
        float(recall),
        float(f1),
        float(threshold),
        len(labels),
        int(labels.sum()),
    )


def tune_threshold(labels: np.ndarray, probs: np.ndarray, beta: float = 1.0) -> float:
    """The probability threshold maximising F-beta on (out-of-fold) ``labels``/``probs``.

    Returns 0.5 when there is no positive to find.
    """
    if beta <= 0:
        raise ConfigError(f"beta={beta} must be > 0")
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if not labels.any():
        return 0.5
    precision, recall, cut = precision_recall_curve(labels, probs)  # cuts ascending, distinct
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no cut
    b2 = beta * beta
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(recall > 0, (1 + b2) * precision * recall / (b2 * precision + recall), 0.0)
    return float(cut[len(f) - 1 - int(np.argmax(f[::-1]))])  # on a tie, the highest cut
