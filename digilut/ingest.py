"""Ingest: find the slides and annotations of a data source and cut them into extraction batches.

A data source is a local folder or an S3 prefix with the same layout::

    DATA/images/<patient>_a.tif, <patient>_b.tif, ...
    DATA/train.csv            (training boxes; optional for inference)

``list_source`` lists the slides and ``train.csv`` with their versions (size and ETag on S3; size and
modification time in a folder): the pipeline's uncached first step, whose value is the cache key of
everything after it. ``ingest_data`` validates ``train.csv`` against the listed slides (bad rows
dropped and reported) and cuts them into batches for parallel extraction, each slide with its
version. ``check_version`` refuses a slide changed since it was listed; a worker fetches its batch with
:func:`digilut.locations.fetch_slides`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from digilut.annotations import (
    BOX_COLUMNS,
    SLIDE_SUFFIXES,
    list_slides,
    patient_of,
    read_boxes_csv,
    safe_slide_names,
)
from digilut.errors import ConfigError, SlideChangedError, SlideNotFoundError
from digilut.files import atomic_write
from digilut.locations import fetch_file, is_s3, s3_target

if TYPE_CHECKING:
    from digilut.s3config import S3Config

log = logging.getLogger(__name__)
BOXES_NAME = "boxes.csv"
INGEST_NAME = "ingest.json"


@dataclass(frozen=True)
class SourceObject:
    """One file of a data source and its version: ``etag`` is the S3 ETag, or for a folder the
    modification time and size (``<mtime_ns hex>-<size hex>``): a file replaced under the same name
    gets another one."""

    name: str
    size: int
    etag: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SourceObject:
        """From ``{"name", "size", "etag"}`` (a loop item, a listing); a clear error otherwise."""
        if (
            not isinstance(data, dict)
            or set(data) != {"name", "size", "etag"}
            or not isinstance(data["name"], str)
            or not isinstance(data["size"], int | float)
            or not isinstance(data["etag"], str)
        ):
            raise ConfigError(f"{data!r}: expected a listed file {{'name': str, 'size': int, 'etag': str}}")
        return cls(data["name"], int(data["size"]), data["etag"])


def _local_object(path: Path) -> SourceObject:
    st = path.stat()
    return SourceObject(path.name, st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}")


@dataclass(frozen=True)
class SourceListing:
    """The slides under ``DATA/images`` (sorted) and ``DATA/train.csv`` (None when absent), versioned."""

    slides: list[SourceObject]
    train_csv: SourceObject | None

    def to_dict(self) -> dict[str, Any]:
        """A pipeline parameter (a struct): ``train_csv`` is left out when absent, as KFP refuses a null."""
        out: dict[str, Any] = {"slides": [s.to_dict() for s in self.slides]}
        if self.train_csv is not None:
            out["train_csv"] = self.train_csv.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> SourceListing:
        if not isinstance(data, dict) or "slides" not in data or not set(data) <= {"slides", "train_csv"}:
            raise ConfigError(f"source listing {data!r}: expected {{'slides': [...], 'train_csv': ...}}")
        csv = data.get("train_csv")
        return cls(
            [SourceObject.from_dict(s) for s in data["slides"]],
            None if csv is None else SourceObject.from_dict(csv),
        )


def _source_key(data_uri: str, rel: str) -> tuple[S3Config, str]:
    cfg, prefix = s3_target(data_uri)
    return cfg, f"{prefix}/{rel}" if prefix else rel


def _s3_object(data_uri: str, rel: str) -> SourceObject | None:
    from digilut.storage import list_objects

    cfg, key = _source_key(data_uri, rel)
    found = [o for o in list_objects(cfg, key) if o.key == key]
    return SourceObject(Path(rel).name, found[0].size, found[0].etag) if found else None


def list_source(data_uri: str) -> SourceListing:
    """The slides (``*.tif``/``*.tiff`` under ``DATA/images``, unsafe names skipped) and ``train.csv``
    of a folder or S3 prefix, each with its size and ETag (S3) or modification time (folder)."""
    if not is_s3(data_uri):
        images = Path(data_uri) / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"{images}: no images folder (expected DATA/images/*.tif)")
        csv = Path(data_uri) / "train.csv"
        return SourceListing(
            [_local_object(images / n) for n in list_slides(images)],
            _local_object(csv) if csv.is_file() else None,
        )
    from digilut.storage import list_objects

    cfg, base = _source_key(data_uri, "images/")
    found: dict[str, SourceObject] = {}
    for obj in list_objects(cfg, base):
        name = obj.key[len(base) :]
        if "/" in name or not name.lower().endswith(SLIDE_SUFFIXES):
            continue
        found[name] = SourceObject(name, obj.size, obj.etag)
    return SourceListing([found[n] for n in safe_slide_names(list(found))], _s3_object(data_uri, "train.csv"))


def _current(data_uri: str, rel: str) -> SourceObject | None:
    if is_s3(data_uri):
        return _s3_object(data_uri, rel)
    path = Path(data_uri) / rel
    return _local_object(path) if path.is_file() else None


def check_version(data_uri: str, rel: str, obj: SourceObject) -> None:
    """Raise :class:`SlideChangedError` when file ``rel`` of the source (``images/<slide>``,
    ``train.csv``) is no longer the listed version ``obj``: what is made of it would be cached under the
    old version."""
    now = _current(data_uri, rel)
    if now is None:
        raise SlideNotFoundError(f"{data_uri}/{rel}: listed but gone")
    if (now.size, now.etag) != (obj.size, obj.etag):
        raise SlideChangedError(
            f"{data_uri}/{rel} changed since it was listed (size {obj.size} → {now.size}, "
            f"ETag {obj.etag} → {now.etag}): run the pipeline again"
        )


@dataclass
class IngestResult:
    """What a data source holds: its slides, the valid boxes and the batches for extraction."""

    listing: SourceListing
    batches: list[list[str]]
    boxes: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    @property
    def slides(self) -> list[str]:
        return [s.name for s in self.listing.slides]

    def versioned_batches(self) -> list[list[dict[str, Any]]]:
        """The batches with each slide's name, size and ETag (what extraction is cached on)."""
        by_name = {s.name: s.to_dict() for s in self.listing.slides}
        return [[by_name[name] for name in batch] for batch in self.batches]

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / BOXES_NAME, [self.boxes.to_csv(index=False).encode()])
        info = {
            "source": self.listing.to_dict(),
            "slides": self.slides,
            "batches": self.batches,
            "problems": self.problems,
        }
        atomic_write(out_dir / INGEST_NAME, [json.dumps(info, indent=2).encode()])


def make_batches(slides: list[str], batch_size: int) -> list[list[str]]:
    """Consecutive batches of at most ``batch_size`` slides; a patient's slides stay together."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be ≥ 1")
    batches: list[list[str]] = []
    for slide in slides:
        same_patient = batches and patient_of(batches[-1][-1]) == patient_of(slide)
        if batches and (len(batches[-1]) < batch_size or same_patient):
            batches[-1].append(slide)
        else:
            batches.append([slide])
    return batches


def ingest_data(
    data_uri: str,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    require_boxes: bool = True,
    listing: SourceListing | None = None,
) -> IngestResult:
    """Validate a data source as ``listing`` (default: list it now) describes it; write ``boxes.csv`` and
    ``ingest.json`` into ``out_dir``. ``train.csv`` must still be the listed version."""
    out_dir = Path(out_dir)
    listing = listing if listing is not None else list_source(data_uri)
    slides = [s.name for s in listing.slides]
    if not slides:
        raise SlideNotFoundError(f"{data_uri}: no slides under images/ (expected images/*.tif)")
    csv = None
    if listing.train_csv is not None:
        check_version(data_uri, "train.csv", listing.train_csv)
        csv = fetch_file(data_uri, "train.csv", out_dir / "source")
    problems: list[str] = []
    if csv is None:
        if require_boxes:
            raise FileNotFoundError(f"{data_uri}: no train.csv (training needs the boxes)")
        boxes = pd.DataFrame(columns=[*BOX_COLUMNS, "patient"])
    else:
        table = read_boxes_csv(csv, slides=slides)
        table.log_problems()
        boxes, problems = table.rows, [str(p) for p in table.problems]
    result = IngestResult(listing, make_batches(slides, batch_size), boxes, problems)
    result.save(out_dir)
    log.info(
        "ingest %s: %d slides of %d patients in %d batch(es); %d boxes, %d CSV row problem(s)",
        data_uri,
        len(slides),
        len({patient_of(s) for s in slides}),
        len(result.batches),
        len(boxes),
        len(problems),
    )
    return result
