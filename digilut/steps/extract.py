"""Step ``extract``: one batch of slides to patches, shards published to the shard store."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from digilut.annotations import check_slide_name
from digilut.cpus import available_cpus
from digilut.extract import ExtractConfig, PrepareReport, SlidePatches, extract_slides
from digilut.files import atomic_write, file_sha256
from digilut.ingest import (
    SourceObject,
    check_version,
)
from digilut.locations import fetch_slides
from digilut.manifest import (
    write_manifest,
    write_shard_store,
)
from digilut.shards import publish_shard, shard_name

log = logging.getLogger(__name__)


SHARD_STORE_DIR = "digilut-shards"


def shard_store_for(data_uri: str, shards_uri: str = "") -> str:
    """The shard store of a run: ``shards_uri`` when given, else ``<data_uri>/digilut-shards``.

    Beside the data by default: a cache derived from the slides, in the bucket the pipeline already
    reads, the same for every run, pipeline root and cache hit (so a fold's rows, and its checkpoint
    key, do not change from run to run), with content-addressed names so that runs, datasets and
    settings never overwrite each other's shard. Pass ``shards_uri`` when the data is read-only.
    """
    return shards_uri.rstrip("/") or f"{data_uri.rstrip('/')}/{SHARD_STORE_DIR}"


def _publish_shards(out_dir: Path, results: dict[str, SlidePatches], store: str) -> None:
    """Move the shards extracted into ``out_dir/shards`` to ``store`` under content-addressed
    names, point the slides' manifest parts at them and record the store in ``out_dir``."""
    uploaded = 0
    for name, r in results.items():
        stem = Path(name).stem
        local = out_dir / "shards" / f"{stem}.shard"
        if r.status == "ok":
            shard = shard_name(stem, r.shard_sha256)
            uploaded += publish_shard(local, store, shard)
            part_path = out_dir / "parts" / f"{stem}.parquet"
            write_manifest(pd.read_parquet(part_path).assign(shard=shard), part_path)
        local.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    write_shard_store(out_dir, store)
    ok = sum(r.status == "ok" for r in results.values())
    log.info("shards: %d slide(s) in %s (%d new, %d already there)", ok, store, uploaded, ok - uploaded)


def _reusable(prev: SlidePatches | None, extracted: Path, store: str, cfg: ExtractConfig) -> bool:
    """A slide ``extracted`` holds from an earlier call with the same settings whose shard is still in
    the (local) store with the same content; a damaged shard is removed, to be extracted again."""
    if prev is None or prev.status not in ("ok", "empty") or prev.config != cfg.digest():
        return False
    if prev.status == "empty":
        return True
    stem = Path(prev.slide).stem
    shard = Path(store) / shard_name(stem, prev.shard_sha256)
    part = extracted / "parts" / f"{stem}.parquet"
    if store.startswith("s3://") or not part.is_file() or not shard.is_file():
        return False
    if file_sha256(shard) != prev.shard_sha256:
        log.warning("%s: content does not match its name, removed; %s is extracted again", shard, prev.slide)
        shard.unlink()
        return False
    return True


def extract_step(
    data_uri: str,
    slides: list[SourceObject],
    extracted: Path,
    cfg: ExtractConfig,
    *,
    workers: int = 1,
    threads: int | None = None,
    shards_uri: str = "",
) -> PrepareReport:
    """Fetch one batch of slides and extract them; failures are reported. A slide that is no longer
    its listed version (size, ETag) is reported failed, not extracted. The shards go to the shard
    store (:func:`shard_store_for`), the manifest parts and thumbnails into ``extracted``. Slides and
    shards are written under ``TMPDIR`` (a sized scratch volume in the pod).

    When ``extracted`` already holds a report (``digilut prepare`` run again on the same folder), a
    slide extracted there with the same settings whose shard is intact in a local store is reused.
    ``threads`` per slide default to the cores shared among the ``workers``."""
    extracted.mkdir(parents=True, exist_ok=True)
    store = shard_store_for(data_uri, shards_uri)
    earlier = extracted / "report.json"
    done = PrepareReport.load(earlier).slides if earlier.is_file() else {}
    reused = {s.name: done[s.name] for s in slides if _reusable(done.get(s.name), extracted, store, cfg)}
    for name in reused:
        log.info("%s: already extracted with the same settings (shard checksum matches), reused", name)
    results: dict[str, SlidePatches] = {}
    with tempfile.TemporaryDirectory(prefix="digilut-slides-") as tmp:
        paths: list[Path] = []
        for slide in (s for s in slides if s.name not in reused):
            try:
                check_slide_name(slide.name)  # before any path join
                check_version(data_uri, f"images/{slide.name}", slide)
                paths.extend(fetch_slides(data_uri, [slide.name], Path(tmp)).values())
            except (OSError, ValueError) as err:  # missing, changed or unsafe slide: report, go on
                results[slide.name] = SlidePatches(slide.name, "failed", error=f"{type(err).__name__}: {err}")
        threads = threads or max(1, available_cpus() // max(1, min(workers, len(paths))))
        work = Path(tmp) / "extracted"
        results.update(extract_slides(paths, work, cfg, workers=workers, threads=threads))
        _publish_shards(work, results, store)
        shutil.copytree(work, extracted, dirs_exist_ok=True)
    results.update(reused)
    report = PrepareReport(results, sum(r.seconds for r in results.values()), cfg.__dict__.copy())
    atomic_write(extracted / "report.json", [report.to_json().encode()])
    return report
