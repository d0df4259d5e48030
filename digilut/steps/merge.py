"""Step ``merge``: the extracted batches into one patch manifest and thumbnails folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from digilut.errors import ShardError
from digilut.extract import PrepareReport, SlidePatches
from digilut.files import atomic_write
from digilut.manifest import (
    EXTRACT_COLUMNS,
    MANIFEST_NAME,
    conform,
    shard_store,
    write_manifest,
    write_shard_store,
)
from digilut.steps.common import write_json

log = logging.getLogger(__name__)


def merge_step(extracted: list[Path], patches: Path, thumbnails: Path) -> PrepareReport:
    """Merge extraction batches into one ``patches`` folder (manifest, report, the shard store's
    name: no shard is copied) and one ``thumbnails`` folder."""
    for d in (patches, thumbnails):
        d.mkdir(parents=True, exist_ok=True)
    slides: dict[str, SlidePatches] = {}
    parts: list[pd.DataFrame] = []
    sizes: dict[str, tuple[int, int]] = {}
    stores = {shard_store(batch) for batch in extracted}
    if len(stores) > 1:
        raise ShardError(
            f"extraction batches put their shards in different stores ({', '.join(sorted(stores))}); "
            "one run uses one shards_uri"
        )
    for batch in extracted:
        report = PrepareReport.load(batch / "report.json")
        for name, r in report.slides.items():
            slides[name] = r
            if r.status != "ok":
                continue
            stem = Path(name).stem
            _link_or_copy(batch / "thumbnails" / f"{stem}.png", thumbnails / f"{stem}.png")
            parts.append(pd.read_parquet(batch / "parts" / f"{stem}.parquet"))
            sizes[name] = (r.width, r.height)
    manifest = (
        conform(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame(columns=list(EXTRACT_COLUMNS))
    )
    write_manifest(manifest, patches / MANIFEST_NAME)
    if stores:
        write_shard_store(patches, stores.pop())
    merged = PrepareReport(slides, sum(r.seconds for r in slides.values()))
    atomic_write(patches / "report.json", [merged.to_json().encode()])
    write_json(thumbnails / "slides.json", {k: {"width": w, "height": h} for k, (w, h) in sizes.items()})
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
