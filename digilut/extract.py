"""Patch extraction: tissue patches of every slide into one shard per slide plus a manifest.

``extract_slide`` does one slide: pyFAST tissue mask → patch grid at the target resolution (level
chosen from the slide's mpp; resized from the closest finer level when none matches) → pixels read
tile by tile → JPEG → one shard + a manifest part + a thumbnail. ``extract_slides`` runs it over
many slides in worker processes, a failing slide reported, never fatal; the ``extract`` step
(:mod:`digilut.steps.extract`) publishes the shards to the shard store.

Output layout of ``extract_slide`` (all paths in a part are relative to ``OUT``)::

    OUT/shards/<stem>.shard        JPEG patches of one slide (see digilut.shards)
    OUT/parts/<stem>.parquet       that slide's manifest rows
    OUT/thumbnails/<stem>.png      whole-slide thumbnail (long side ≤ 1024 px)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from digilut.annotations import (
    check_slide_name,
    patient_of,
)
from digilut.errors import ConfigError, DigilutError, SlideReadError, TissueNotFoundError
from digilut.files import atomic_write, file_sha256
from digilut.level_reader import CACHE_BYTES
from digilut.manifest import EXTRACT_COLUMNS, write_manifest
from digilut.patch_reader import MASK_PX, CellReads, Grid, ReadPlan, lay_grid, read_overview, read_patches
from digilut.shards import write_shard
from digilut.slide import choose_level, read_slide_info
from digilut.tissue import shrink, tissue_mask

log = logging.getLogger(__name__)
THUMB_PX = 1024
# A level with more pixels than this is never decoded whole: the thumbnail and pyFAST's tissue mask
# then come from a streamed, shrunk copy (non-pyramidal slides). 64 Mpx ≈ 192 MiB of RGB.
MAX_WHOLE_LEVEL_PX = 64 * 2**20
# What became of a slide: patches extracted, no tissue patch at all, or unreadable.
SlideStatus = Literal["ok", "empty", "failed"]


TRAIN_STRIDE_PX = 256  # the training grid: patches side by side (``digilut prepare``)
INFERENCE_STRIDE_PX = 128  # the inference grid: 50% overlap, finer heatmaps (both pipelines, all slides)


@dataclass(frozen=True)
class ExtractConfig:
    """How patches are cut. Sizes are in pixels *at the target resolution* (``target_mpp``)."""

    patch_px: int = 256
    target_mpp: float = 0.5  # 20x
    stride_px: int = TRAIN_STRIDE_PX  # INFERENCE_STRIDE_PX for slides whose boxes are predicted
    min_tissue_fraction: float = 0.5
    tissue_threshold: int = 85  # FAST colour threshold: distance from white
    slide_mpp: float | None = None  # override for slides without mpp metadata
    jpeg_quality: int = 90
    max_constant_fraction: float = 0.02  # more unreadable (flat/garbled) tissue patches = unreadable slide

    def __post_init__(self) -> None:
        if not 16 <= self.patch_px <= 4096:
            raise ConfigError(f"patch_px={self.patch_px} must be in 16..4096")
        if not 1 <= self.stride_px <= self.patch_px * 4:
            raise ConfigError(f"stride_px={self.stride_px} must be in 1..{self.patch_px * 4}")
        if not 0.05 <= self.target_mpp <= 20:
            raise ConfigError(f"target_mpp={self.target_mpp} µm/px must be in 0.05..20 (20x = 0.5)")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(f"min_tissue_fraction={self.min_tissue_fraction} must be in [0, 1]")
        if not 1 <= self.tissue_threshold <= 441:
            raise ConfigError(f"tissue_threshold={self.tissue_threshold} must be in 1..441")
        if self.slide_mpp is not None and not 0.05 <= self.slide_mpp <= 20:
            raise ConfigError(f"slide_mpp={self.slide_mpp} µm/px must be in 0.05..20 (DigiLut: 0.25)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality={self.jpeg_quality} must be in 1..100")

    def digest(self) -> str:
        """Short hash of the settings: a slide extracted with other settings is redone."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class SlidePatches:
    """Result of extracting one slide."""

    slide: str
    status: SlideStatus
    patches: int = 0
    seconds: float = 0.0
    error: str = ""
    level: int = -1
    scale: float = 1.0
    mpp: float = 0.0
    width: int = 0
    height: int = 0
    config: str = ""
    shard_sha256: str = ""
    warning: str = ""  # e.g. unreadable patches dropped from an otherwise good slide

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _stem(slide: str) -> str:
    return Path(slide).stem


def _unreadable_warning(name: str, bad: list[str], tissue_cells: int, cfg: ExtractConfig) -> str:
    """The warning for the unreadable tissue patches dropped ("" when none); more than
    ``cfg.max_constant_fraction`` of them fail the slide."""
    if not bad:
        return ""
    shown = "; ".join(bad[:5]) + (f"; … {len(bad) - 5} more" if len(bad) > 5 else "")
    if len(bad) > cfg.max_constant_fraction * tissue_cells:
        raise SlideReadError(
            f"{name}: {len(bad)} of {tissue_cells} tissue patches are unreadable ({shown}); "
            "the slide is skipped"
        )
    log.warning("%s: %d unreadable tissue patches dropped (%s)", name, len(bad), shown)
    return f"{len(bad)} unreadable tissue patches dropped ({shown})"


def _write_outputs(
    out_dir: Path, name: str, grid: Grid, level: int, tissue: np.ndarray, reads: CellReads, thumb: Image.Image
) -> str:
    """Write the slide's shard, manifest part and thumbnail; return the shard's SHA-256."""
    stem = _stem(name)
    shard_rel = f"shards/{stem}.shard"
    index = write_shard(out_dir / shard_rel, reads.jpegs)
    sel = np.asarray(reads.kept, dtype=np.int64)
    part = pd.DataFrame(
        {
            "slide": name,
            "patient": patient_of(name),
            "x0": grid.x0[sel],
            "y0": grid.y0[sel],
            "w0": np.full(len(sel), grid.side0),
            "h0": np.full(len(sel), grid.side0),
            "level": level,
            "tissue": tissue[sel],
            "shard": shard_rel,
            "offset": index.offset,
            "nbytes": index.nbytes,
        },
        columns=list(EXTRACT_COLUMNS),
    )
    write_manifest(part, out_dir / "parts" / f"{stem}.parquet")
    png = io.BytesIO()
    thumb.save(png, format="PNG", compress_level=1)  # 2× faster than the default 6, 5 % larger
    atomic_write(out_dir / "thumbnails" / f"{stem}.png", [png.getvalue()])  # a full disk names the file
    return file_sha256(out_dir / shard_rel)


def _how_read(plan: ReadPlan) -> str:
    if plan.tile_copy:
        return "JPEG tiles copied"
    if plan.decode_scale > 1:
        return f"decoded at 1/{plan.decode_scale}, {plan.resize:.3g}× resize"
    return f"{plan.resize:.3g}× resize"


def extract_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    cfg: ExtractConfig,
    *,
    threads: int = 1,
    max_level_px: int = MAX_WHOLE_LEVEL_PX,
) -> SlidePatches:
    """Extract one slide's tissue patches into ``out_dir`` (shard, manifest part, thumbnail).

    Raises a :class:`~digilut.errors.DigilutError` subclass naming the slide when it cannot be
    read; :func:`extract_slides` turns that into a failed result and goes on. ``threads`` read
    and encode patches in parallel (the output does not depend on it). A slide whose coarsest level
    has more than ``max_level_px`` pixels (a non-pyramidal slide) is never decoded whole.

    Unreadable tissue patches — flat (a black or blank tile) or garbled (a tile that decodes to
    pixels whose colour disagrees with a coarser level, beyond the slide's own level-to-level
    colour map: :func:`digilut.garbled.calibrate_levels`) or, for JPEG tiles stored as they are,
    corrupt JPEG data (:func:`digilut.garbled.suspect_stream`) — are dropped and named in ``warning``;
    more than ``cfg.max_constant_fraction`` of them fail the slide.
    """
    t0 = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    name = check_slide_name(slide_path.name)
    info = read_slide_info(slide_path, mpp=cfg.slide_mpp)
    choice = choose_level(info, cfg.target_mpp)
    plan, grid = lay_grid(info, choice, cfg.patch_px, cfg.stride_px, cfg.jpeg_quality)
    overview, whole = read_overview(info, max_level_px)
    mask = tissue_mask(shrink(overview, MASK_PX), info.width, info.height, threshold=cfg.tissue_threshold)
    sides0 = np.full_like(grid.x0, grid.side0)
    tissue = mask.fractions(grid.x0, grid.y0, sides0, sides0)
    keep = np.flatnonzero(tissue >= cfg.min_tissue_fraction)
    thumb = Image.fromarray(overview)
    thumb.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BOX)
    cache_bytes = min(CACHE_BYTES, max_level_px * 3 // 2)  # decoded tiles a reader may hold
    plan, reads = read_patches(
        info, plan, grid, keep, overview=overview if whole else None, threads=threads, cache_bytes=cache_bytes
    )
    warning = _unreadable_warning(name, reads.bad, len(keep), cfg)
    empty = (
        ""
        if reads.kept
        else str(
            TissueNotFoundError(
                f"{name}: no patch has ≥ {cfg.min_tissue_fraction:.0%} tissue (FAST threshold "
                f"{cfg.tissue_threshold}); nothing extracted, excluded from training"
            )
        )
    )
    sha = _write_outputs(out_dir, name, grid, choice.level, tissue, reads, thumb)
    result = SlidePatches(
        slide=name,
        status="ok" if reads.kept else "empty",
        patches=len(reads.kept),
        seconds=time.perf_counter() - t0,
        error=empty,
        level=choice.level,
        scale=choice.scale,
        mpp=info.mpp,
        width=info.width,
        height=info.height,
        config=cfg.digest(),
        shard_sha256=sha,
        warning=warning,
    )
    log.info(
        "%s: %d patches (%d tissue cells, level %d, %s) in %.1fs = %.0f patches/s",
        name,
        result.patches,
        len(keep),
        choice.level,
        _how_read(plan),
        result.seconds,
        result.patches / max(result.seconds, 1e-9),
    )
    return result


def _extract_safely(slide_path: str, out_dir: str, cfg: ExtractConfig, threads: int = 1) -> SlidePatches:
    """extract_slide that returns a failed result instead of raising (runs in a worker)."""
    t0 = time.perf_counter()
    try:
        return extract_slide(slide_path, out_dir, cfg, threads=threads)
    except (DigilutError, OSError, ValueError, RuntimeError, MemoryError) as err:
        return SlidePatches(
            Path(slide_path).name,
            "failed",
            seconds=time.perf_counter() - t0,
            error=f"{type(err).__name__}: {err}",
            config=cfg.digest(),
        )


@dataclass
class PrepareReport:
    """Per-slide results of the steps ``extract`` and ``merge`` plus totals; saved as ``report.json``."""

    slides: dict[str, SlidePatches]
    seconds: float = 0.0
    config: dict[str, object] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)  # dropped/corrected CSV rows

    @property
    def failed(self) -> list[str]:
        return [s for s, r in self.slides.items() if r.status == "failed"]

    @property
    def patches(self) -> int:
        return sum(r.patches for r in self.slides.values())

    def to_json(self) -> str:
        return json.dumps(
            {
                "seconds": round(self.seconds, 3),
                "patches": self.patches,
                "config": self.config,
                "problems": self.problems,
                "slides": {k: v.to_dict() for k, v in sorted(self.slides.items())},
            },
            indent=2,
        )

    @classmethod
    def load(cls, path: Path) -> PrepareReport:
        data = json.loads(path.read_text())
        slides = {k: SlidePatches(**v) for k, v in data.get("slides", {}).items()}
        return cls(slides, data.get("seconds", 0.0), data.get("config", {}), data.get("problems", []))


def _reusable(prev: SlidePatches | None, out_dir: Path, cfg: ExtractConfig) -> bool:
    """A slide done before with the same settings, whose shard still has the same content."""
    if prev is None or prev.status not in ("ok", "empty") or prev.config != cfg.digest():
        return False
    stem = _stem(prev.slide)
    shard, part = out_dir / "shards" / f"{stem}.shard", out_dir / "parts" / f"{stem}.parquet"
    return shard.is_file() and part.is_file() and file_sha256(shard) == prev.shard_sha256


def extract_slides(
    slide_paths: list[Path],
    out_dir: Path,
    cfg: ExtractConfig,
    *,
    workers: int = 1,
    threads: int = 1,
    previous: dict[str, SlidePatches] | None = None,
) -> dict[str, SlidePatches]:
    """Extract many slides, reusing finished ones; a failing slide is reported, never fatal.

    ``workers`` ≥ 1 runs slides in that many spawned worker processes, so a slide whose reader
    crashes natively or runs out of memory kills only its worker: it is reported as
    ``worker killed`` and the others go on. ``workers=0`` runs in this process (tests, debugging).
    """
    previous = previous or {}
    results: dict[str, SlidePatches] = {}
    todo: list[Path] = []
    for p in slide_paths:
        if _reusable(previous.get(p.name), out_dir, cfg):
            results[p.name] = previous[p.name]
            log.info("%s: already extracted with the same settings (shard checksum matches), reused", p.name)
        else:
            todo.append(p)
    t0 = time.perf_counter()
    done_patches = 0

    def record(r: SlidePatches) -> None:
        nonlocal done_patches
        results[r.slide] = r
        done_patches += r.patches
        rate = done_patches / max(time.perf_counter() - t0, 1e-9)
        msg = (
            f"[{len(results)}/{len(slide_paths)}] {r.slide}: {r.status}, {r.patches} patches; "
            f"{rate:.0f} patches/s overall"
        )
        if r.status == "failed":
            log.error("%s — %s", msg, r.error)
        else:
            log.info("%s", msg)

    if workers <= 0:
        for p in todo:
            record(_extract_safely(str(p), str(out_dir), cfg, threads))
        return results

    def run_pool(paths: list[Path], n: int) -> list[Path]:
        """Run ``paths`` in a pool of ``n`` spawned workers; return those lost to a dead worker."""
        lost: list[Path] = []
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_extract_safely, str(p), str(out_dir), cfg, threads): p for p in paths}
            for fut, p in futures.items():
                try:
                    record(fut.result())
                except BrokenProcessPool:
                    lost.append(p)
        return lost

    if todo:
        # A dead worker breaks the whole pool: redo its unfinished slides one per pool to find it.
        for p in run_pool(todo, min(workers, len(todo))):
            if run_pool([p], 1):
                record(
                    SlidePatches(
                        p.name,
                        "failed",
                        config=cfg.digest(),
                        error="worker killed (the slide crashed or exhausted its worker process)",
                    )
                )
    return results
