"""Configuration of training: model, augmentation and optimisation settings, without torch.

The CLI builds its training options from :class:`TrainConfig`'s fields, so this module imports
nothing heavy (the command line starts fast); :mod:`digilut.model`, :mod:`digilut.data` and
:mod:`digilut.train` re-export these classes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digilut.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50")
SAMPLERS = ("weighted", "shuffle", "sequential")
LOSSES = ("bce", "focal")
SCHEDULES = ("cosine", "plateau")
STAIN_NORMS = ("none", "reinhard", "macenko")  # per-slide stain normalisation (digilut.stain)
# Fields that do not change what is learnt: a resumed run may differ in them.
_RUNTIME_FIELDS = frozenset({"num_workers", "cpu_threads", "log_every_steps"})


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a classifier: backbone, head and the input size it was trained at."""

    arch: str = "resnet18"
    hidden_units: int = 256  # 0 = a single linear layer after dropout
    dropout: float = 0.3
    input_px: int = 256  # patches are resized on the device to input_px × input_px
    stain_norm: str = "none"  # none | reinhard | macenko: each slide's stain onto a reference (digilut.stain)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.hidden_units < 0:
            raise ConfigError(f"hidden_units={self.hidden_units} must be ≥ 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not 32 <= self.input_px <= 1024:
            raise ConfigError(f"input_px={self.input_px} must be in 32..1024")
        if self.stain_norm not in STAIN_NORMS:
            raise ConfigError(f"stain_norm={self.stain_norm!r}: choose one of {', '.join(STAIN_NORMS)}")


@dataclass(frozen=True)
class ColourAugment:
    """Per-patch colour augmentation applied on the device (all ranges are ± around identity).

    ``brightness``/``contrast``/``saturation``: multiplicative jitter, e.g. 0.1 = ×[0.9, 1.1].
    ``stain_scale``/``stain_shift``: H&E stain augmentation (Tellez et al. 2018): in the
    haematoxylin-eosin-DAB optical-density space each stain is scaled by ``1 ± stain_scale`` and
    shifted by ``± stain_shift`` (scikit-image ``rgb2hed`` units). Strengths: 0/0 = off;
    0.05/0.01 (default) = light, the variation within one lab; 0.2/0.05 = strong (Tellez's
    "HED-strong"), the variation between labs and scanners.
    """

    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    stain_scale: float = 0.05
    stain_shift: float = 0.01

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "saturation", "stain_scale"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}={v} must be in [0, 1)")
        if not 0.0 <= self.stain_shift <= 0.1:
            raise ConfigError(f"stain_shift={self.stain_shift} must be in [0, 0.1]")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a fold's training (CLI options and pipeline parameters share these names)."""

    arch: str = "resnet18"
    weights: str = "auto"  # none | auto (cached ImageNet, else random) | imagenet | state dict file/s3 URI
    hidden_units: int = 256
    dropout: float = 0.3
    input_px: int = 256  # patches are resized on the device (128 trains ~4× faster on a CPU)
    stain_norm: str = "none"  # none | reinhard | macenko (per slide, fitted on its tissue; used to predict)
    loss: str = "bce"  # bce | focal
    pos_weight: float = 1.0  # BCE weight of positives (the weighted sampler already balances classes)
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25  # -1 disables the class weighting of the focal loss
    epochs: int = 10
    patience: int = 3  # early stopping: epochs without a better validation AUROC
    train_batch_size: int = 64  # patches per training step
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (per step, 5% warm-up) | plateau (halve on a flat AUROC)
    sampler: str = "weighted"  # weighted (class-balanced) | shuffle
    patches_per_epoch: int = 0  # 0 = as many as training rows
    use_sampled: bool = True  # train on the rows kept by negative undersampling only
    # Training positives must lie at least this share inside their box (the manifest's ``overlap``);
    # the others — mostly a loose box's margin, plain tissue labelled lesion — are left out of
    # training (validation keeps every row). 0 = every positive the labeller made.
    train_min_overlap: float = 0.0
    max_val_patches: int = 0  # 0 = every validation patch; else a fixed random subset
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    stain_scale: float = 0.05
    stain_shift: float = 0.01
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile on CUDA
    num_workers: int = 2
    cpu_threads: int = 0  # on a CPU: torch intra-op threads (0 = torch's default, one per core)
    seed: int = 0
    log_every_steps: int = 20

    def __post_init__(self) -> None:
        self.model_spec()  # validates arch, hidden_units, dropout, input_px
        self.colour_augment()
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.sampler not in SAMPLERS[:2]:
            raise ConfigError(f"sampler={self.sampler!r}: choose one of {', '.join(SAMPLERS[:2])}")
        checks = {
            "epochs": 1 <= self.epochs <= 1000,
            "patience": 1 <= self.patience <= 1000,
            "train_batch_size": 2 <= self.train_batch_size <= 8192,
            "lr": 0 < self.lr < 1,
            "weight_decay": 0 <= self.weight_decay < 1,
            "pos_weight": 0 < self.pos_weight <= 1000,
            "focal_gamma": 0 <= self.focal_gamma <= 10,
            "focal_alpha": self.focal_alpha == -1 or 0 < self.focal_alpha < 1,
            "patches_per_epoch": self.patches_per_epoch >= 0,
            "max_val_patches": self.max_val_patches >= 0,
            "train_min_overlap": 0 <= self.train_min_overlap <= 1,
            "num_workers": 0 <= self.num_workers <= 64,
            "cpu_threads": 0 <= self.cpu_threads <= 1024,
            "log_every_steps": self.log_every_steps >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                ", ".join(f"{b}={getattr(self, b)}" for b in bad)
                + " out of range (epochs, patience ≥ 1; train_batch_size 2..8192; 0 < lr < 1; "
                "0 < pos_weight; focal_alpha in (0, 1) or -1; train_min_overlap in [0, 1]; counts ≥ 0)"
            )

    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.arch, self.hidden_units, self.dropout, self.input_px, self.stain_norm)

    def colour_augment(self) -> ColourAugment:
        return ColourAugment(
            self.brightness, self.contrast, self.saturation, self.stain_scale, self.stain_shift
        )

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME_FIELDS}


@dataclass
class FoldResult:
    """What a fold's training produced (``result.json``); file names are relative to its folder."""

    fold: int
    best_epoch: int
    best_val_auroc: float
    best_val_loss: float
    epochs_run: int
    finished: bool
    stopped_early: bool
    train_patches: int
    val_patches: int
    val_positives: int
    seconds: float
    device: str
    mlflow_run_id: str | None
    config: dict[str, Any]
    history: list[dict[str, float]]
    model_file: str = "model.pt"
    oof_file: str = "oof.parquet"
    model_sha256: str = ""  # a re-run reuses the fold only when model.pt still has this content
    data_sha256: str = ""  # hash of the fold's training and validation rows
    patch_bytes_fetched: int = 0  # bytes of shards read (this run), ranged GETs when they are in S3
    patch_requests: int = 0  # reads (GETs) that fetched them
    patch_local_hits: int = 0  # patches read again from the local copy instead
    init: dict[str, Any] = dataclasses.field(default_factory=dict)  # BackboneInit.to_dict(): weights used

    def save(self, path: str | Path) -> Path:
        from digilut.files import atomic_write

        path = Path(path)
        atomic_write(path, [json.dumps(dataclasses.asdict(self), indent=2, allow_nan=True).encode()])
        return path

    def artifact_metadata(self) -> dict[str, Any]:
        """What the KFP UI shows of the fold's model artifact."""
        init = self.init.get("label", "")
        return {"fold": self.fold, "best_epoch": self.best_epoch, "framework": "pytorch",
                "mlflow_run_id": self.mlflow_run_id or "", "init": init}  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> FoldResult:
        path = Path(path)
        if path.is_dir():
            path = path / "result.json"
        return cls(**json.loads(path.read_text()))
