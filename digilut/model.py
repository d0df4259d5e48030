"""The patch classifier: a torchvision ResNet backbone and a small MLP head, and its checkpoint file.

Pretrained weights are never downloaded at run time. ``weights="auto"`` uses torchvision's
ImageNet weights when the file is already in the torch hub cache (``$TORCH_HOME/hub/checkpoints``,
where a container image bakes them in) and otherwise starts from random initialisation, saying so
in the log; ``"imagenet"`` insists on the cached file; a path loads a local ``state_dict``.

A model file (``*.pt``) is one ``torch.save`` dict, loadable with ``weights_only=True``:
``{"format", "spec": ModelSpec fields, "state_dict", "meta": {...}}``, written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from digilut.errors import ConfigError, DigilutError, GpuUnavailableError
from digilut.k8s import GPU_RESOURCE, REQUIRE_GPU_ENV
from digilut.shards import atomic_write
from digilut.train_config import ModelSpec

log = logging.getLogger(__name__)


class ModelFileError(DigilutError, OSError):
    """A model file is missing, unreadable or not a digilut model."""


MODEL_FORMAT = "digilut-patch-classifier/1"
_WEIGHT_ENUMS = {
    "resnet18": torchvision.models.ResNet18_Weights,
    "resnet34": torchvision.models.ResNet34_Weights,
    "resnet50": torchvision.models.ResNet50_Weights,
}


class PatchClassifier(nn.Module):
    """ResNet features → (Linear → ReLU →) Dropout → Linear: one lesion logit per patch."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        backbone = getattr(torchvision.models, spec.arch)(weights=None)
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        if spec.hidden_units:
            self.head = nn.Sequential(
                nn.Linear(features, spec.hidden_units),
                nn.ReLU(inplace=True),
                nn.Dropout(spec.dropout),
                nn.Linear(spec.hidden_units, 1),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)).squeeze(1)


def cached_imagenet_weights(arch: str) -> Path | None:
    """Path of torchvision's ImageNet weights for ``arch`` in the torch hub cache, or ``None``."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    enum = _WEIGHT_ENUMS[arch]
    for member in (enum.DEFAULT, *enum):
        path = folder / Path(member.url).name
        if path.is_file():
            return path
    return None


def _load_backbone(model: PatchClassifier, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(f"weights={path}: cannot load ({err})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"weights={path} does not fit {model.spec.arch}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def build_model(spec: ModelSpec, weights: str = "auto") -> PatchClassifier:
    """A new classifier; ``weights`` = ``auto`` | ``imagenet`` | ``none`` | a local ``state_dict`` path."""
    model = PatchClassifier(spec)
    if weights == "none":
        log.info("model: %s with random initialisation (weights=none)", spec.arch)
        return model
    if weights in ("auto", "imagenet"):
        path = cached_imagenet_weights(spec.arch)
        if path is None:
            where = Path(torch.hub.get_dir()) / "checkpoints"
            if weights == "imagenet":
                raise ConfigError(
                    f"weights=imagenet: no torchvision {spec.arch} ImageNet file in {where} and digilut "
                    "never downloads; bake it into the image, pass a local file, or use weights=auto/none"
                )
            log.warning(
                "model: %s ImageNet weights not in %s (no download at run time): RANDOM INITIALISATION",
                spec.arch,
                where,
            )
            return model
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights={weights!r}: not auto, imagenet, none, nor an existing file")
    _load_backbone(model, path)
    log.info("model: %s backbone initialised from %s", spec.arch, path)
    return model


def save_model(path: str | Path, model: PatchClassifier, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (weights on the CPU) and ``meta`` (plain values) as a model file, atomically."""
    path = Path(path)
    module = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves its original
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    buf = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FORMAT,
            "spec": dataclasses.asdict(module.spec),
            "state_dict": state,
            "meta": meta or {},
        },
        buf,
    )
    atomic_write(path, [buf.getvalue()])
    return path


@dataclass
class LoadedModel:
    model: PatchClassifier
    spec: ModelSpec
    meta: dict[str, Any]
    path: Path


def load_model(path: str | Path, device: torch.device) -> LoadedModel:
    """Read a model file written by :func:`save_model` onto ``device``, in eval mode."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ModelFileError(f"{path}: model file not found") from err
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ModelFileError(f"{path}: not a readable model file ({err})") from err
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a digilut model file (expected format {MODEL_FORMAT})")
    spec = ModelSpec(**blob["spec"])
    model = PatchClassifier(spec)
    model.load_state_dict(blob["state_dict"])
    return LoadedModel(model.to(device).eval(), spec, dict(blob.get("meta", {})), path)


def gpu_required(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was scheduled on a GPU: ``DIGILUT_REQUIRE_GPU`` set to anything but
    ""/0/false/no (the pipeline sets the node's name)."""
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_GPU_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _cuda_diagnosis() -> str:
    """Why torch sees no CUDA device, in the words of torch and of the environment."""
    try:
        torch.cuda.init()
        reason = "torch.cuda.init() succeeded but no device is visible"
    except Exception as err:  # torch raises AssertionError/RuntimeError with its own reason
        reason = f"{type(err).__name__}: {err}"
    names = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
    visible = {k: os.environ[k] for k in names if k in os.environ}
    return (
        f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (a CPU-only build)'}; "
        f"{reason}; {', '.join(f'{k}={v!r}' for k, v in visible.items()) or 'no *_VISIBLE_DEVICES set'}"
    )


def select_device(name: str = "auto", environ: Mapping[str, str] | None = None) -> torch.device:
    """The device to run on: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    With ``DIGILUT_REQUIRE_GPU`` set (the pipeline sets it on its GPU tasks, to the node name) a
    missing CUDA device raises :class:`~digilut.errors.GpuUnavailableError` at once, naming what to
    check, instead of falling back to the CPU; without it local CPU runs work as before.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if gpu_required(environ):
            flag = (os.environ if environ is None else environ)[REQUIRE_GPU_ENV]
            raise GpuUnavailableError(
                f"{REQUIRE_GPU_ENV}={flag!r} (this task was scheduled on a GPU, on that node) but CUDA is "
                f"unavailable: "
                f"{_cuda_diagnosis()}. Check the node's NVIDIA driver (nvidia-smi on the node; the "
                "image's CUDA must not be newer than the driver supports), that the NVIDIA device "
                f"plugin / GPU operator runs there, and that the task requests {GPU_RESOURCE} "
                f"(limit 1). Refusing to train on the CPU; unset {REQUIRE_GPU_ENV} to allow it."
            )
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r}: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device here (use auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: use auto, cpu, cuda or cuda:N")
    return device
