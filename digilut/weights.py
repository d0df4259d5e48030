"""Pretrained weights for the classifier's ResNet backbone, and the record of what it started from.

``weights`` (:func:`init_backbone`, called by :func:`digilut.model.build_model`):

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

What a backbone really started from is a :class:`BackboneInit` (``model.init``).
"""

from __future__ import annotations

import dataclasses
import logging
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

from digilut.errors import ConfigError
from digilut.files import file_sha256

log = logging.getLogger(__name__)

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


def load_backbone_weights(backbone: nn.Module, arch: str, path: Path, source: str) -> BackboneInit:
    """Load the tensors of the state-dict file ``path`` (named ``source`` in messages) into the
    ``arch`` ``backbone`` and return what was loaded; a shape that does not fit is an error naming
    the key."""
    state = _read_state_dict(path, source)
    target = backbone.state_dict()
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
                    f"weights={source}: {key} has shape {tuple(value.shape)} but {arch} "
                    f"expects {tuple(target[name].shape)} for {name} (a checkpoint of another arch?)"
                )
            loaded[name] = value
        elif name is None or name.split(".")[0] not in modules:
            if name is None or not name.startswith(("fc.", "head.", "classifier.")):
                unexpected.append(key)  # another part of the checkpoint (a projector, a key encoder…)
        else:  # under a backbone module, yet not one of its keys: a deeper or other network
            raise ConfigError(
                f"weights={source}: {key} has no place in a {arch} backbone (a checkpoint of another arch?)"
            )
    missing = sorted(wanted - set(loaded))
    backbone.load_state_dict(loaded, strict=False)
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


def init_backbone(backbone: nn.Module, arch: str, weights: str) -> BackboneInit:
    """Initialise ``backbone`` (a torchvision ``arch``, ``fc`` removed) as ``weights`` says (see the
    module docstring); what it really started from."""
    if weights == "none":
        log.info("model: %s with random initialisation (weights=none)", arch)
        return BackboneInit("random")
    if weights in ("auto", "imagenet"):
        path = _imagenet_file(arch, weights)
        if path is None:
            log.warning(
                "model: %s ImageNet weights not in %s (weights=auto never downloads): RANDOM INITIALISATION",
                arch,
                Path(torch.hub.get_dir()) / "checkpoints",
            )
            return BackboneInit("random")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        backbone.load_state_dict(state)  # torchvision's own file: every key must fit
        init = BackboneInit("imagenet", str(path), file_sha256(path))
    elif weights.startswith("s3://"):
        from digilut.s3config import S3Config, parse_s3_uri
        from digilut.storage import download_file

        bucket, key = parse_s3_uri(weights)
        cfg = dataclasses.replace(S3Config.from_env(), bucket=bucket)
        with tempfile.TemporaryDirectory(prefix="digilut-weights-") as tmp:
            local = download_file(cfg, key, Path(tmp) / Path(key).name)
            init = load_backbone_weights(backbone, arch, local, weights)
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(
                f"weights={weights!r}: not auto, imagenet, none, an s3:// URI nor an existing file"
            )
        init = load_backbone_weights(backbone, arch, path, str(path))
    log.info("model: %s backbone: %s", arch, init.words)
    return init
