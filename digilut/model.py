"""The patch classifier: a torchvision ResNet backbone and a small MLP head, and its checkpoint file.

Backbone initialisation (``weights``), see :func:`build_model`:

* ``none``: random initialisation.
* ``auto``: torchvision's ImageNet weights when the file is in the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``, where the train image bakes them in), else random
  initialisation, said in the log; never downloads.
* ``imagenet``: the cached file, else torchvision's download into that cache (offline: a clear error).
* a local path or ``s3://`` URI of a state dict (``.pt``/``.pth``/``.ckpt``, ``.safetensors`` when
  the ``safetensors`` package is installed): torchvision or timm ResNet weights, or a
  self-supervised checkpoint whose keys carry a prefix (``module.``, ``backbone.``, ``model.``,
  ``module.encoder_q.``…: the prefix under which most keys fit the backbone is stripped). Shapes
  must match (the first mismatching key is named); missing and unused keys are counted.

The model records what it really started from in ``model.init`` (:class:`BackboneInit`).

A model file (``*.pt``) is one ``torch.save`` dict, loadable with ``weights_only=True``:
``{"format", "spec": ModelSpec fields, "state_dict", "meta": {...}}``, written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from digilut.errors import ConfigError, DigilutError, GpuUnavailableError
from digilut.files import atomic_write, file_sha256
from digilut.k8s import GPU_RESOURCE, REQUIRE_GPU_ENV
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


INIT_KINDS = ("random", "imagenet", "file")
# Prefixes preferred when several fit equally well (MoCo keeps a query and a key encoder, DINO a
# teacher and a student): the encoder a user means.
_PREFERRED_PREFIXES = ("", "module.", "backbone.", "model.", "encoder.", "module.encoder_q.", "encoder_q.")
_PREFERRED_PREFIXES += ("teacher.backbone.", "teacher.", "module.backbone.", "model.backbone.")
# Where checkpoints keep their state dict, in the order looked at.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "teacher", "network", "net")


@dataclass(frozen=True)
class BackboneInit:
    """What a backbone really started from: ``kind`` random | imagenet | file, the file or URI it was
    read from and its SHA-256, the prefix stripped from its keys, and the backbone keys the file
    lacked (``missing``) and the file's keys that were not used (``unexpected``, classifier heads
    excluded)."""

    kind: str = "random"
    source: str = ""
    sha256: str = ""
    prefix: str = ""
    missing: tuple[str, ...] = field(default_factory=tuple)
    unexpected: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ConfigError(f"initialisation kind {self.kind!r}: one of {', '.join(INIT_KINDS)}")

    @property
    def label(self) -> str:
        """``random``, ``imagenet`` or ``file:<first 12 hex digits of the file's SHA-256>``."""
        return f"file:{self.sha256[:12]}" if self.kind == "file" else self.kind

    @property
    def words(self) -> str:
        """The initialisation in words, for logs and reports."""
        if self.kind == "random":
            return "random initialisation (no pretrained weights)"
        what = "ImageNet weights (torchvision)" if self.kind == "imagenet" else "pretrained weights"
        detail = f"sha256 {self.sha256[:12]}"
        if self.prefix:
            detail += f", key prefix {self.prefix!r} stripped"
        if self.missing or self.unexpected:
            detail += f", {len(self.missing)} missing / {len(self.unexpected)} unused keys"
        return f"{what} from {self.source} ({detail})"

    def to_dict(self) -> dict[str, Any]:
        """Plain values (result.json, checkpoints): the fields plus ``label`` and ``words``."""
        return {
            **dataclasses.asdict(self),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "label": self.label,
            "words": self.words,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneInit:
        return cls(
            str(d.get("kind", "random")),
            str(d.get("source", "")),
            str(d.get("sha256", "")),
            str(d.get("prefix", "")),
            tuple(d.get("missing", ())),
            tuple(d.get("unexpected", ())),
        )

    def tracking_params(self) -> dict[str, Any]:
        """MLflow params: ``init`` (the label), the source and the missing/unused key counts."""
        return {
            "init": self.label,
            "init_source": self.source or "-",
            "init_missing_keys": len(self.missing),
            "init_unexpected_keys": len(self.unexpected),
        }


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


def cached_imagenet_weights(arch: str) -> Path | None:
    """Path of torchvision's ImageNet weights for ``arch`` in the torch hub cache, or ``None``."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    enum = _WEIGHT_ENUMS[arch]
    for member in (enum.DEFAULT, *enum):
        path = folder / Path(member.url).name
        if path.is_file():
            return path
    return None


def _read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``torch.save`` without pickled code, or safetensors)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ConfigError(
                f"weights={source}: a .safetensors file needs the safetensors package, which is not "
                "installed; convert it with torch.save(state_dict, 'weights.pt') or install safetensors"
            ) from err
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ConfigError(f"weights={source}: not a readable safetensors file ({err})") from err
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(f"weights={source}: cannot load as a state dict ({err})") from err
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, {"teacher": {...}}: unwrap
        if not isinstance(blob, dict):
            break
        inner = next((blob[k] for k in _STATE_KEYS if isinstance(blob.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in blob.values()):
            break
        blob = inner
    if not isinstance(blob, dict):
        raise ConfigError(f"weights={source}: holds a {type(blob).__name__}, not a state dict")
    tensors = {str(k): v for k, v in blob.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"weights={source}: no tensors in it (keys: {list(blob)[:5]})")
    return tensors


def _key_prefix(keys: list[str], target: set[str], source: str) -> str:
    """The prefix under which most of ``keys`` are keys of ``target`` ("" when they fit as they are)."""
    counts: Counter[str] = Counter()
    for key in keys:
        for t in target:
            if key.endswith(t) and (len(key) == len(t) or key[-len(t) - 1] == "."):
                counts[key[: len(key) - len(t)]] += 1
    if not counts:
        raise ConfigError(
            f"weights={source}: none of its {len(keys)} keys fits the backbone (first keys "
            f"{keys[:3]}; expected ResNet keys such as {sorted(target)[:3]}): a ResNet state dict "
            "of the same arch is needed"
        )
    best = max(counts.values())
    tied = sorted(p for p, n in counts.items() if n == best)
    if len(tied) == 1:
        return tied[0]
    preferred = [p for p in _PREFERRED_PREFIXES if p in tied]
    if preferred:
        return preferred[0]
    raise ConfigError(
        f"weights={source}: the backbone fits equally under the key prefixes {tied}: save the state "
        "dict of the one encoder you mean"
    )


def load_backbone_weights(model: PatchClassifier, path: Path, source: str) -> BackboneInit:
    """Load the backbone tensors of the state-dict file ``path`` (named ``source`` in messages) into
    ``model`` and return what was loaded; a shape that does not fit is an error naming the key."""
    state = _read_state_dict(path, source)
    target = model.backbone.state_dict()
    wanted = {k for k in target if not k.endswith("num_batches_tracked")}
    prefix = _key_prefix(list(state), wanted, source)
    modules = {k.split(".")[0] for k in target}  # conv1, bn1, layer1…layer4
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name in target:
            if tuple(value.shape) != tuple(target[name].shape):
                raise ConfigError(
                    f"weights={source}: {key} has shape {tuple(value.shape)} but {model.spec.arch} "
                    f"expects {tuple(target[name].shape)} for {name} (a checkpoint of another arch?)"
                )
            loaded[name] = value
        elif name is None or name.split(".")[0] not in modules:
            if name is None or not name.startswith(("fc.", "head.", "classifier.")):
                unexpected.append(key)  # another part of the checkpoint (a projector, a key encoder…)
        else:  # under a backbone module, yet not one of its keys: a deeper or other network
            raise ConfigError(
                f"weights={source}: {key} has no place in a {model.spec.arch} backbone (a checkpoint "
                "of another arch?)"
            )
    missing = sorted(wanted - set(loaded))
    model.backbone.load_state_dict(loaded, strict=False)
    if missing or unexpected:
        log.warning(
            "weights=%s: %d backbone keys missing (left at random, e.g. %s), %d keys unused (e.g. %s)",
            source,
            len(missing),
            missing[:3],
            len(unexpected),
            unexpected[:3],
        )
    return BackboneInit("file", source, file_sha256(path), prefix, tuple(missing), tuple(unexpected))


def _imagenet_file(arch: str, weights: str) -> Path | None:
    """The cached ImageNet file; with ``weights=imagenet`` downloaded into the cache when absent."""
    path = cached_imagenet_weights(arch)
    if path is not None or weights == "auto":
        return path
    from digilut.container_images import download_imagenet_weights  # the image's bake step, same code path

    torch_home = Path(torch.hub.get_dir()).parent
    try:
        return download_imagenet_weights(torch_home, [arch])[0]
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
        raise ConfigError(
            f"weights=imagenet: torchvision's {arch} ImageNet weights are not in "
            f"{torch_home / 'hub' / 'checkpoints'} and downloading them failed ({err}). Bake them into "
            "the image (images/train/Dockerfile BAKE_IMAGENET_WEIGHTS=1, TORCH_HOME), copy the file "
            "there, pass weights=<file or s3:// URI>, or weights=none for random initialisation"
        ) from err


def build_model(spec: ModelSpec, weights: str = "auto") -> PatchClassifier:
    """A new classifier whose backbone is initialised as ``weights`` says (see the module docstring);
    ``model.init`` records what was really used."""
    model = PatchClassifier(spec)
    if weights == "none":
        log.info("model: %s with random initialisation (weights=none)", spec.arch)
        return model
    if weights in ("auto", "imagenet"):
        path = _imagenet_file(spec.arch, weights)
        if path is None:
            log.warning(
                "model: %s ImageNet weights not in %s (weights=auto never downloads): RANDOM INITIALISATION",
                spec.arch,
                Path(torch.hub.get_dir()) / "checkpoints",
            )
            return model
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.backbone.load_state_dict(state)  # torchvision's own file: every key must fit
        model.init = BackboneInit("imagenet", str(path), file_sha256(path))
    elif weights.startswith("s3://"):
        from digilut.s3config import S3Config, parse_s3_uri
        from digilut.storage import download_file

        bucket, key = parse_s3_uri(weights)
        cfg = dataclasses.replace(S3Config.from_env(), bucket=bucket)
        with tempfile.TemporaryDirectory(prefix="digilut-weights-") as tmp:
            local = download_file(cfg, key, Path(tmp) / Path(key).name)
            model.init = load_backbone_weights(model, local, weights)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(
                f"weights={weights!r}: not auto, imagenet, none, an s3:// URI nor an existing file"
            )
        model.init = load_backbone_weights(model, path, str(path))
    log.info("model: %s backbone: %s", spec.arch, model.init.words)
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
