"""``digilut prepare``: the pipeline's data steps chained on local folders.

The same step functions the components call (``list_source`` → ``ingest`` → ``extract``, all slides
in one batch → ``merge`` → ``label``), with the shard store inside the output folder, so a
prepared folder holds what the pipeline's ``patches`` and ``labels`` artifacts hold::

    OUT/manifest.parquet    labelled patches (no label column without train.csv)
    OUT/report.json         per-slide results, settings and every dropped slide/row (problems)
    OUT/<stem>-<sha>.shard  one shard per slide (OUT is the shard store: no shards.json)
    OUT/thumbnails/         one PNG per slide + slides.json
    OUT/annotations/        boxes.csv and ingest.json (the ingest step's artifact)
    OUT/extracted/          the extract step's artifact; a re-run reuses its finished slides
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from digilut.annotations import list_slides
from digilut.extract import ExtractConfig, PrepareReport
from digilut.files import atomic_write
from digilut.ingest import INGEST_NAME, SourceObject
from digilut.labels import LabelConfig
from digilut.manifest import SHARDS_NAME
from digilut.steps.extract import extract_step
from digilut.steps.ingest import ingest_step, list_source_step
from digilut.steps.label import label_step
from digilut.steps.merge import merge_step

log = logging.getLogger(__name__)


def prepare_step(
    data: Path,
    out: Path,
    cfg: ExtractConfig,
    label_cfg: LabelConfig | None = None,
    *,
    workers: int = 1,
    threads: int | None = None,
) -> PrepareReport:
    """Extract every slide of ``data/images`` into ``out`` and label the patches with the boxes of
    ``data/train.csv`` when there is one (validated row by row: bad rows are dropped and listed in
    the report). Running it again reuses the slides already extracted with the same settings.
    ``threads`` per slide default to the cores shared among the slides in flight."""
    t0 = time.perf_counter()
    data_uri = str(data)
    listing = list_source_step(data_uri)  # raises FileNotFoundError naming DATA/images when absent
    problems: list[str] = []
    list_slides(data / "images", problems=problems)  # the file names the listing skipped, for the report
    n = max(1, len(listing["slides"]))
    batches = ingest_step(data_uri, listing, out / "annotations", slides_per_batch=n, require_boxes=False)
    problems += json.loads((out / "annotations" / INGEST_NAME).read_text())["problems"]
    slides = [SourceObject.from_dict(s) for batch in batches for s in batch]
    log.info("prepare: %d slides in %s -> %s (%s)", len(slides), data / "images", out, cfg)
    extract_step(
        data_uri, slides, out / "extracted", cfg, workers=workers, threads=threads, shards_uri=str(out)
    )
    merged = merge_step([out / "extracted"], out, out / "thumbnails")
    (out / SHARDS_NAME).unlink()  # the store is OUT itself, which a manifest without one means: OUT can move
    if listing.get("train_csv"):
        problems += label_step(out, out / "annotations", out, label_cfg or LabelConfig()).problems
    report = PrepareReport(merged.slides, time.perf_counter() - t0, cfg.__dict__.copy(), problems)
    atomic_write(out / "report.json", [report.to_json().encode()])
    log.info(
        "prepare: %d/%d slides ok, %d failed, %d empty; %d patches in %.1fs",
        sum(r.status == "ok" for r in report.slides.values()),
        len(report.slides),
        len(report.failed),
        sum(r.status == "empty" for r in report.slides.values()),
        report.patches,
        report.seconds,
    )
    return report
