"""Container image names, the hashed lock files they install, and the weights baked into them.

One place names the images: ``image("base")`` / ``image("train")`` return
``{registry}/digilut-{kind}:{tag}`` exactly as the Makefile builds them, from ``DIGILUT_REGISTRY``
(default ``ghcr.io/digilut``) and ``DIGILUT_TAG`` (default: the repository's 12-character git short
SHA, or ``dev`` outside a git checkout). Mutable tags such as ``latest`` are refused: a compiled
pipeline must name images that cannot change under it.

``render_lock`` turns a pip installation report (``pip install --dry-run --report``) into a
``--require-hashes`` requirements file; ``images/lock.py`` is the script that calls it.
``download_imagenet_weights`` fills a torch cache (``TORCH_HOME``) at image build time so pods never
download at run time.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from digilut.errors import ConfigError

log = logging.getLogger(__name__)

ImageKind = Literal["base", "train"]
IMAGE_KINDS: tuple[str, ...] = get_args(ImageKind)

REGISTRY_ENV = "DIGILUT_REGISTRY"
TAG_ENV = "DIGILUT_TAG"
DEFAULT_REGISTRY = "ghcr.io/digilut"
FALLBACK_TAG = "dev"
TAG_SHA_CHARS = 12
# Tags that registries and CI conventionally move: an image named by one of them is not reproducible.
MUTABLE_TAGS = frozenset({"latest", "stable", "main", "master", "nightly", "edge"})

# OCI distribution spec grammar, restricted to lowercase (repository paths must be lowercase).
_REGISTRY_RE = re.compile(
    r"^[a-z0-9]+(?:[.-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

REPO_ROOT = Path(__file__).resolve().parents[1]

# torchvision architectures whose ImageNet weights the train image carries (TORCH_HOME/hub/checkpoints).
IMAGENET_ARCHES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
IMAGENET_WEIGHTS = "IMAGENET1K_V1"

# Packages the CPU image leaves out of the lock: the CUDA build of torch and what only it pulls in.
GPU_ONLY_PACKAGES = re.compile(r"^(torch|torchvision|triton|nvidia-.+|cuda-.+)$")


def check_registry(registry: str) -> str:
    """Return ``registry`` (``host[:port]/path``) or raise :class:`ConfigError` saying what is valid."""
    if not _REGISTRY_RE.fullmatch(registry):
        raise ConfigError(
            f"{REGISTRY_ENV}={registry!r} is not a registry path: use lowercase 'host[:port]/namespace' "
            "without scheme or trailing slash, e.g. 'ghcr.io/digilut' or 'localhost:5000/digilut'"
        )
    return registry


def check_tag(tag: str) -> str:
    """Return ``tag`` or raise :class:`ConfigError` for a malformed or mutable tag."""
    if not _TAG_RE.fullmatch(tag):
        raise ConfigError(
            f"{TAG_ENV}={tag!r} is not a valid image tag: 1-128 characters of [A-Za-z0-9_.-], "
            "not starting with '.' or '-'"
        )
    if tag.lower() in MUTABLE_TAGS:
        raise ConfigError(
            f"{TAG_ENV}={tag!r} is a mutable tag ({', '.join(sorted(MUTABLE_TAGS))} are refused): "
            "use an immutable tag such as the git short SHA (the default)"
        )
    return tag


@functools.cache
def default_tag(repo: Path = REPO_ROOT) -> str:
    """The 12-character git short SHA of ``repo``'s HEAD, or ``dev`` when it is not a git checkout.

    Read once per process: components fix their image when their module is imported, so a commit
    made while a long run (the test suite, a compile) is going must not give later callers another
    tag than the components already carry."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", f"--short={TAG_SHA_CHARS}", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return FALLBACK_TAG
    return out.stdout.strip() or FALLBACK_TAG


def image_registry() -> str:
    """``DIGILUT_REGISTRY`` (validated) or the default ``ghcr.io/digilut``."""
    return check_registry(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def image_tag() -> str:
    """``DIGILUT_TAG`` (validated) or the git short SHA of this repository (``dev`` without git)."""
    return check_tag(os.environ.get(TAG_ENV) or default_tag())


def image(kind: ImageKind, *, tag: str | None = None) -> str:
    """The reference of a digilut image, ``{registry}/digilut-{kind}:{tag}``, as ``make images`` builds it
    (``tag`` default: :func:`image_tag`)."""
    if kind not in IMAGE_KINDS:
        raise ConfigError(f"image kind={kind!r}: choose one of {', '.join(IMAGE_KINDS)}")
    return f"{image_registry()}/digilut-{kind}:{check_tag(tag) if tag is not None else image_tag()}"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render_lock(
    report: Mapping[str, Any],
    *,
    exclude: re.Pattern[str] | None = None,
    only: Collection[str] | None = None,
    header: Sequence[str] = (),
) -> str:
    """A ``--require-hashes`` requirements file from a pip installation report.

    ``report`` is the JSON that ``pip install --dry-run --report`` writes (format version 1): each
    ``install`` item's name, version and the sha256 of the file pip chose. Names matching
    ``exclude`` are left out; with ``only``, just those (normalised) names are kept. Lines are sorted by
    normalised name so that regenerating an unchanged lock gives the same bytes.
    """
    items = report.get("install")
    if not isinstance(items, list) or not items:
        raise ConfigError("pip report has no 'install' list: run pip install --dry-run --report FILE")
    wanted = {_normalise(n) for n in only} if only is not None else None
    entries: dict[str, str] = {}
    for item in items:
        meta = item["metadata"]
        name = _normalise(meta["name"])
        if (exclude is not None and exclude.fullmatch(name)) or (wanted is not None and name not in wanted):
            continue
        info = item["download_info"]
        digest = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        if not digest:
            raise ConfigError(
                f"pip report: {name}=={meta['version']} from {info.get('url')!r} has no sha256 "
                "(a local directory or VCS checkout cannot be locked by hash)"
            )
        entries[name] = f"{name}=={meta['version']} \\\n    --hash=sha256:{digest}"
    if wanted is not None and wanted - entries.keys():
        raise ConfigError(f"pip report lacks {sorted(wanted - entries.keys())}: add them to the resolution")
    lines = [f"# {line}" if line else "#" for line in header]
    lines += [entries[n] for n in sorted(entries)]
    return "\n".join(lines) + "\n"


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Parse a hashed lock written by :func:`render_lock`: normalised name -> (version, sha256 hashes)."""
    text = path.read_text().replace("\\\n", " ")
    out: dict[str, tuple[str, list[str]]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *opts = line.split()
        if "==" not in spec:
            raise ConfigError(f"{path} line {n}: {spec!r} is not pinned with '=='")
        name, version = spec.split("==", 1)
        hashes = [o.removeprefix("--hash=sha256:") for o in opts if o.startswith("--hash=sha256:")]
        out[_normalise(name)] = (version, hashes)
    return out


def imagenet_weight_files(arches: Sequence[str] = IMAGENET_ARCHES) -> dict[str, str]:
    """Architecture -> checkpoint file name torchvision looks for in ``$TORCH_HOME/hub/checkpoints``."""
    from torchvision.models import get_model_weights

    out = {}
    for arch in arches:
        try:
            weights = get_model_weights(arch)[IMAGENET_WEIGHTS]
        except (ValueError, KeyError) as err:
            raise ConfigError(f"torchvision has no {arch}.{IMAGENET_WEIGHTS} weights") from err
        out[arch] = weights.url.rsplit("/", 1)[-1]
    return out


def download_imagenet_weights(torch_home: Path, arches: Sequence[str] = IMAGENET_ARCHES) -> list[Path]:
    """Put the ``IMAGENET1K_V1`` checkpoints of ``arches`` under ``torch_home/hub/checkpoints``.

    Files already there are kept (torchvision's own cache rule); downloads are checked against the hash
    prefix in their file names. Each checkpoint is then loaded once so a truncated file fails the build,
    not a training pod. Returns the checkpoint paths.
    """
    import torch
    from torchvision.models import get_model_weights

    model_dir = torch_home / "hub" / "checkpoints"
    model_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch, file_name in imagenet_weight_files(arches).items():
        url = get_model_weights(arch)[IMAGENET_WEIGHTS].url
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=str(model_dir), file_name=file_name, progress=False, check_hash=True
        )
        path = model_dir / file_name
        log.info(
            "imagenet weights: %s %s (%d tensors, %.1f MB)", arch, path, len(state), path.stat().st_size / 1e6
        )
        paths.append(path)
    return paths
