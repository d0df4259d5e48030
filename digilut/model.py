"""The patch classifier: a torchvision ResNet backbone and a small MLP head; its model file; and
:func:`select_device`, the one place that picks the device to run on.

Backbone initialisation (``weights``): :func:`digilut.weights.init_backbone`; the model records
what it really started from in ``model.init``.

A model file (``*.pt``) is one ``torch.save`` dict, loadable with ``weights_only=True``:
``{"format", "spec": ModelSpec fields, "state_dict", "meta": {...}}``, written atomically.
"""

from __future__ import annotations

import dataclasses
import io
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
from digilut.files import atomic_write
from digilut.k8s import GPU_RESOURCE, REQUIRE_GPU_ENV
from digilut.train_config import ModelSpec
from digilut.weights import BackboneInit, init_backbone


class ModelFileError(DigilutError, OSError):
    """A model file is missing, unreadable or not a digilut model."""


MODEL_FORMAT = "digilut-patch-classifier/1"


class PatchClassifier(nn.Module):
    """ResNet features → (Linear → ReLU →) Dropout → Linear: one lesion logit per patch."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.init = BackboneInit("random")  # build_model records what the backbone was loaded from
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


def build_model(spec: ModelSpec, weights: str = "auto") -> PatchClassifier:
    """A new classifier whose backbone is initialised as ``weights`` says (see
    :func:`digilut.weights.init_backbone`); ``model.init`` records what was really used."""
    model = PatchClassifier(spec)
    model.init = init_backbone(model.backbone, spec.arch, weights)
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
