"""The pipeline's steps on folders: one function per Kubeflow component.

Each function takes input folders (KFP artifact paths), parameters and output folders, calls the
library and writes its outputs. The components in ``components/`` only adapt KFP artifacts to
these calls, and ``digilut run`` runs the same components through ``kfp.local``, so a step behaves
the same in a pod, locally and in a test.

Artifacts (folders)::

    annotations   boxes.csv (validated training boxes), ingest.json (slides, batches, problems)
    extracted     one batch: shards/, parts/, thumbnails/, report.json
    patches       all batches merged: manifest.parquet, shards/, report.json
    thumbnails    <stem>.png + slides.json (level-0 size of every slide)
    labels        manifest.parquet (+ overlap, label)
    split         manifest.parquet (+ split, fold, sampled), split.json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from digilut.extract import ExtractConfig, PrepareReport, SlidePatches, extract_slides
from digilut.ingest import BOXES_NAME, fetch_slides, ingest_data
from digilut.labels import LabelConfig, label_patches
from digilut.manifest import EXTRACT_COLUMNS, MANIFEST_NAME, conform, read_manifest, write_manifest
from digilut.shards import atomic_write
from digilut.split import SplitConfig, split_dataset

log = logging.getLogger(__name__)


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, [json.dumps(data, indent=2, default=str).encode()])


def read_boxes(annotations: Path) -> pd.DataFrame:
    """The validated boxes of an ``annotations`` artifact."""
    return pd.read_csv(annotations / BOXES_NAME)


def ingest_step(data_uri: str, annotations: Path, *, batch_size: int) -> list[list[str]]:
    """List and validate the data source; return the slide batches for extraction."""
    return ingest_data(data_uri, annotations, batch_size=batch_size).batches


def extract_step(
    data_uri: str, slides: list[str], extracted: Path, cfg: ExtractConfig, *, workers: int = 1
) -> PrepareReport:
    """Fetch one batch of slides and extract them into ``extracted``; failures are reported."""
    extracted.mkdir(parents=True, exist_ok=True)
    results: dict[str, SlidePatches] = {}
    with tempfile.TemporaryDirectory(prefix="digilut-slides-") as tmp:
        paths: list[Path] = []
        for name in slides:
            try:
                paths.extend(fetch_slides(data_uri, [name], Path(tmp)).values())
            except (OSError, ValueError) as err:  # missing or unsafe slide: report, go on
                results[name] = SlidePatches(name, "failed", error=f"{type(err).__name__}: {err}")
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        results.update(extract_slides(paths, extracted, cfg, workers=workers, threads=threads))
    report = PrepareReport(results, sum(r.seconds for r in results.values()), cfg.__dict__.copy())
    atomic_write(extracted / "report.json", [report.to_json().encode()])
    return report


def merge_step(extracted: list[Path], patches: Path, thumbnails: Path) -> PrepareReport:
    """Merge extraction batches into one ``patches`` folder and one ``thumbnails`` folder."""
    for d in (patches / "shards", thumbnails):
        d.mkdir(parents=True, exist_ok=True)
    slides: dict[str, SlidePatches] = {}
    parts: list[pd.DataFrame] = []
    sizes: dict[str, tuple[int, int]] = {}
    for batch in extracted:
        report = PrepareReport.load(batch / "report.json")
        for name, r in report.slides.items():
            slides[name] = r
            if r.status != "ok":
                continue
            stem = Path(name).stem
            _link_or_copy(batch / "shards" / f"{stem}.shard", patches / "shards" / f"{stem}.shard")
            _link_or_copy(batch / "thumbnails" / f"{stem}.png", thumbnails / f"{stem}.png")
            parts.append(pd.read_parquet(batch / "parts" / f"{stem}.parquet"))
            sizes[name] = (r.width, r.height)
    manifest = (
        conform(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame(columns=list(EXTRACT_COLUMNS))
    )
    write_manifest(manifest, patches / MANIFEST_NAME)
    merged = PrepareReport(slides, sum(r.seconds for r in slides.values()))
    atomic_write(patches / "report.json", [merged.to_json().encode()])
    _write_json(thumbnails / "slides.json", {k: {"width": w, "height": h} for k, (w, h) in sizes.items()})
    failed = merged.failed
    log.info(
        "merge: %d batch(es), %d slides ok, %d failed%s; %d patches",
        len(extracted),
        len(parts),
        len(failed),
        f" ({', '.join(failed)})" if failed else "",
        len(manifest),
    )
    return merged


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def label_step(patches: Path, annotations: Path, labels: Path, cfg: LabelConfig) -> pd.DataFrame:
    """Label every patch of ``patches`` by its overlap with the boxes of ``annotations``."""
    labels.mkdir(parents=True, exist_ok=True)
    df = label_patches(read_manifest(patches), read_boxes(annotations), cfg)
    write_manifest(df, labels / MANIFEST_NAME)
    return df


def split_step(labels: Path, split: Path, cfg: SplitConfig) -> list[int]:
    """Split patients, undersample and assign folds; return the fold ids to train."""
    split.mkdir(parents=True, exist_ok=True)
    df = split_dataset(read_manifest(labels, require=("patient", "label")), cfg)
    write_manifest(df, split / MANIFEST_NAME)
    summary = {
        "test_patients": sorted(df.loc[df["split"] == "test", "patient"].unique().tolist()),
        "folds": {
            int(k): sorted(g["patient"].unique().tolist())
            for k, g in df[df["split"] == "train"].groupby("fold")
        },
        "config": cfg.__dict__,
    }
    _write_json(split / "split.json", summary)
    return sorted(summary["folds"])
