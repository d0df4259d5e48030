"""Extraction on three kinds of slide, per CPU-second (the 2 cores here are shared with other jobs).

Slide types, generated here with tifffile from one synthetic H&E slide (``digilut.synth``), every
reduced level an area average of level 0:

* ``2x-pyramid-20x``: DigiLut-like 2× pyramid at 0.25 µm/px with a 20x level, 256-px JPEG tiles
  (at stride 256 a patch is one tile: digilut copies the tile's JPEG stream);
* ``4x-pyramid``: Aperio-style 4× pyramid (downsamples 1/4/16) at 0.243 µm/px, 512-px tiles: no
  level near 20x, so 20x is read from level 0 and shrunk 2.06× (digilut decodes at 1/2);
* ``striped``: one level at 0.25 µm/px in 64-row JPEG strips (no pyramid, no tiles).

For each, on the same patch grid (256 px at 0.5 µm/px, stride 256): (a) ``digilut prepare`` end to
end in this process, one thread (tissue mask, read, checks, JPEG, shard, manifest); (b) the original
method: pyFAST ``PatchGenerator`` + one Pillow JPEG file per patch; (c) a naive OpenSlide
``read_region`` loop over (a)'s patches, read only; (d) the same loop + BOX resize to 256 px +
Pillow JPEG q90. CPU time is the process's user + system time including children
(``resource.getrusage``), so other jobs on the machine do not count.

(a) runs first on a crop of the slide, untimed (a worker's one-off costs: imports, first use of
pyarrow and Pillow's encoders), then ``RUNS`` times (median), each run followed by one of its
per-slide cost — all it spends on a slide whatever its number of patches: ``digilut prepare`` on the
same slide with no tissue patch (:func:`per_slide_cpu`). (a)'s per-patch rate is its patches over
the median of the pairs' differences (CPU time less that cost), and the rate a slide of
``REAL_PATCHES`` tissue patches (a DigiLut slide at 20x) would get follows from both. Where tiles
are decoded at 1/2-1/8 in the DCT domain, the stored patches are compared with the same patches
decoded in full, BOX-resized and JPEG-encoded alike: mean absolute pixel difference and a ResNet18
classifier's (fixed seed, the project's ``PatchClassifier``) probabilities on both.
"""

from __future__ import annotations

import cProfile
import dataclasses
import io
import pstats
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from bench import cpu_seconds
from digilut.extract import ExtractConfig

SLIDE_TYPES = ("2x-pyramid-20x", "4x-pyramid", "striped")
PATCH_PX, TARGET_MPP, QUALITY = 256, 0.5, 90
REAL_PATCHES = 10_000  # tissue patches of a DigiLut slide at 20x, stride 256
OURS = "(a) digilut prepare, 1 thread"
RUNS = 9  # (a) and its per-slide cost: medians of this many runs


def _timed(fn: Callable[[], tuple[int, int, int]]) -> dict[str, float]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    patches, nbytes, objects = fn()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {
        "patches": patches,
        "per_cpu_s": patches / max(cpu, 1e-9),
        "per_wall_s": patches / max(wall, 1e-9),
        "bytes": nbytes / max(patches, 1),
        "objects": objects,
    }


def _resolution(mpp: float) -> dict[str, object]:
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def _levels(level0: np.ndarray, factor: int, min_side: int = 512) -> list[np.ndarray]:
    """Level 0 and its area averages by ``factor``, ``factor²``, … while the long side ≥ min_side."""
    out = [level0]
    while max(out[-1].shape[:2]) // factor >= min_side:
        out.append(np.asarray(Image.fromarray(out[-1]).reduce(factor)))
    return out


def write_slide_type(kind: str, level0: np.ndarray, path: Path) -> Path:
    """``level0`` (H&E-like RGB) written as the slide type ``kind`` (see the module docstring)."""
    opts = {"compression": "jpeg", "compressionargs": {"level": 85}, "photometric": "rgb", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=level0.size > 2**31) as tif:
        if kind == "striped":
            tif.write(level0, rowsperstrip=64, **opts, **_resolution(0.25))
            return path
        factor, mpp, tile = (2, 0.25, 256) if kind == "2x-pyramid-20x" else (4, 0.243, 512)
        for k, pixels in enumerate(_levels(level0, factor)):
            desc = f"digilut bench|mpp={mpp}" if k == 0 else None
            sub = 0 if k == 0 else 1
            tif.write(
                pixels,
                tile=(tile, tile),
                subfiletype=sub,
                description=desc,
                **opts,
                **_resolution(mpp * factor**k),
            )
    return path


def _base_image(work: Path, size: str) -> np.ndarray:
    from digilut.synth_plan import SynthConfig, plan_slide
    from digilut.synth_render import write_slide

    path = work / f"synth-{size}.tif"
    if not path.is_file():
        write_slide(plan_slide("bench_a.tif", SynthConfig(size=size), seed=7, positive=True), path)  # type: ignore[arg-type]
    return tifffile.imread(path)


def _original(slide: Path, level: int, region: int, dst: Path) -> tuple[int, int, int]:
    """pyFAST tissue segmentation + PatchGenerator, one Pillow JPEG file per patch."""
    import fast

    fast.Reporter.setGlobalReportMethod(fast.Reporter.NONE)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    importer = fast.WholeSlideImageImporter.create(str(slide))
    tissue = fast.TissueSegmentation.create(useColorThresholdingMethod=True).connect(importer)
    gen = (
        fast.PatchGenerator.create(region, region, level=level, maskThreshold=0.5)
        .connect(0, importer)
        .connect(1, tissue)
    )
    n = size = 0
    for patch in fast.DataStream(gen):
        px = np.asarray(patch)[..., :3]
        if region != PATCH_PX:
            px = np.asarray(Image.fromarray(px).resize((PATCH_PX, PATCH_PX), Image.Resampling.BOX))
        path = dst / f"{slide.stem}_{n}.jpg"
        Image.fromarray(px).save(path, quality=QUALITY)
        size += path.stat().st_size
        n += 1
    return n, size, n


def _naive(
    slide: Path, rows: list[tuple[int, int]], level: int, side: int, encode: bool
) -> tuple[int, int, int]:
    """OpenSlide ``read_region`` per patch (+ BOX resize to 256 px + Pillow JPEG q90 with ``encode``)."""
    import openslide

    osl = openslide.OpenSlide(str(slide))
    size = 0
    for x0, y0 in rows:
        im = osl.read_region((x0, y0), level, (side, side)).convert("RGB")
        if encode:
            if side != PATCH_PX:
                im = im.resize((PATCH_PX, PATCH_PX), Image.Resampling.BOX)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=QUALITY)
            size += buf.tell()
    osl.close()
    return len(rows), size, 0


def _profile(fn: Callable[[], object], top: int = 12) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def per_slide_cpu(data: Path, cfg: ExtractConfig, out: Path) -> float:
    """CPU seconds (a) spends on a slide whatever its number of patches: ``digilut prepare`` end to
    end on it with no tissue patch (FAST threshold 441: no pixel is far enough from white) — slide
    info, overview, thumbnail, the garbled check's reference level, the shard, manifest, merge,
    label and report files are all still made, only the patches are not — plus what pyFAST's
    segmentation of the overview costs more with its tissue than without (its dilation and erosion:
    ~4× here), measured on the same overview."""
    from digilut.extract import MAX_WHOLE_LEVEL_PX
    from digilut.patch_reader import MASK_PX, read_overview
    from digilut.slide import read_slide_info
    from digilut.steps.prepare import prepare_step
    from digilut.tissue import shrink, tissue_mask

    none = dataclasses.replace(cfg, tissue_threshold=441)
    shutil.rmtree(out, ignore_errors=True)
    c0 = cpu_seconds()
    rep = prepare_step(data, out, none, workers=0, threads=1)
    c1 = cpu_seconds()
    assert rep.patches == 0, f"{rep.patches} patches at FAST threshold 441"
    info = read_slide_info(next((data / "images").iterdir()))
    small = shrink(read_overview(info, MAX_WHOLE_LEVEL_PX)[0], MASK_PX)
    c2 = cpu_seconds()
    tissue_mask(small, info.width, info.height, threshold=cfg.tissue_threshold)
    c3 = cpu_seconds()
    tissue_mask(small, info.width, info.height, threshold=none.tissue_threshold)
    return (c1 - c0) + (c3 - c2) - (cpu_seconds() - c3)


def scaled_vs_full(slide: Path, out: Path, limit: int) -> dict[str, Any]:
    """The first ``limit`` stored patches of ``out`` against the same regions decoded in full,
    BOX-resized and JPEG-encoded alike: mean |pixel difference| (0-255) over the patches and the
    worst patch, and |p_scaled - p_full| (mean, max) of a ResNet18 ``PatchClassifier`` (seed 0,
    ``weights=auto``: ImageNet where its file is here, else random) on both."""
    import imagecodecs
    import torch

    from digilut.level_reader import LevelReader
    from digilut.manifest import read_manifest, read_patch
    from digilut.model import build_model
    from digilut.slide import choose_level, read_slide_info
    from digilut.train_config import ModelSpec
    from digilut.transforms import to_model_input

    m = read_manifest(out).iloc[:limit]
    info = read_slide_info(slide)
    level = info.levels[choose_level(info, TARGET_MPP).level]
    side = round(int(m.w0.iloc[0]) / level.downsample)
    stored, full = [], []
    with LevelReader(info, level.index) as reader:
        for _, row in m.iterrows():
            x, y = round(row.x0 / level.downsample), round(row.y0 / level.downsample)
            px = Image.fromarray(reader.read(x, y, side, side)).resize(
                (PATCH_PX, PATCH_PX), Image.Resampling.BOX
            )
            full.append(imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(np.asarray(px), level=QUALITY)))
            stored.append(read_patch(out, row))
    a, b = np.stack(stored).astype(np.int16), np.stack(full).astype(np.int16)
    diff = np.abs(a - b).mean(axis=(1, 2, 3))
    torch.manual_seed(0)
    model = build_model(ModelSpec(), weights="auto").eval()
    probs, feats = [], []
    with torch.no_grad():
        for batch in (np.stack(stored), np.stack(full)):
            x = to_model_input(torch.from_numpy(batch), torch.device("cpu"), input_px=ModelSpec().input_px)
            f = torch.cat([model.backbone(c) for c in x.split(32)])
            feats.append(f.numpy())
            probs.append(torch.sigmoid(model.head(f).squeeze(1)).numpy())
    dp = np.abs(probs[0] - probs[1])
    # a random network's probabilities barely vary: its features' distance says more, relative to
    # how far apart the patches' own features are
    spread = np.linalg.norm(feats[1] - feats[1].mean(axis=0), axis=1).mean()
    feat_rel = float(np.linalg.norm(feats[0] - feats[1], axis=1).mean() / max(spread, 1e-12))
    return {
        "patches": float(len(m)),
        "pixel_mean": float(diff.mean()),
        "pixel_max": float(diff.max()),
        "p_mean": float(dp.mean()),
        "p_max": float(dp.max()),
        "p_spread": float(probs[1].std()),
        "feat_rel": feat_rel,
        "init": model.init.kind,
    }


def run_type(
    kind: str, level0: np.ndarray, work: Path, *, profile: bool = False, runs: int = RUNS
) -> dict[str, dict[str, float]]:
    """The four methods on one slide type; rows that cannot run (OpenSlide on strips) are left out."""
    from digilut.manifest import read_manifest
    from digilut.slide import choose_level, read_slide_info
    from digilut.steps.prepare import prepare_step

    data = work / kind
    (data / "images").mkdir(parents=True, exist_ok=True)
    slide = write_slide_type(kind, level0, data / "images" / "bench_a.tif")
    info = read_slide_info(slide)
    choice = choose_level(info, TARGET_MPP)
    region = round(PATCH_PX * choice.scale)
    cfg = ExtractConfig(patch_px=PATCH_PX, target_mpp=TARGET_MPP, stride_px=PATCH_PX, jpeg_quality=QUALITY)
    out = work / f"{kind}-ours"

    def ours() -> tuple[int, int, int]:
        shutil.rmtree(out, ignore_errors=True)
        rep = prepare_step(data, out, cfg, workers=0, threads=1)
        shards = list(out.glob("*.shard"))
        return rep.patches, sum(s.stat().st_size for s in shards), len(shards)

    # Warm-up: a worker extracts many slides, so what a process does once (imports, first use of
    # pyarrow, Pillow's PNG encoder, …) is not per slide: (a) first runs on a crop of the slide.
    warm = work / f"{kind}-warm"
    (warm / "images").mkdir(parents=True, exist_ok=True)
    write_slide_type(kind, np.ascontiguousarray(level0[:2048, :3072]), warm / "images" / "warm_a.tif")
    prepare_step(warm, work / f"{kind}-warm-out", cfg, workers=0, threads=1)
    # (a) and its per-slide cost, in `runs` pairs (RUNS; 1 quick) back to back: per-patch cost = median of
    # the pairs' differences (on ~400 patches it is a small difference of two noisy CPU times)
    timed, fixed = [], []
    for _ in range(runs):
        timed.append(_timed(ours))
        fixed.append(per_slide_cpu(data, cfg, work / f"{kind}-empty"))
    results: dict[str, dict[str, float]] = {OURS: sorted(timed, key=lambda r: r["per_cpu_s"])[runs // 2]}
    a = results[OURS]
    a["slide_s"] = float(np.median(fixed))
    per_patch = np.median([r["patches"] / r["per_cpu_s"] - f for r, f in zip(timed, fixed, strict=True)])
    a["per_patch_cpu_s"] = a["patches"] / max(float(per_patch), 1e-9)
    if choice.scale >= 2:  # read ≥ 2× finer than the target: decoded at 1/2-1/8
        results["scaled vs full decode"] = scaled_vs_full(slide, out, 48 if len(level0) < 8192 else 160)
    if profile:
        print(f"--- cProfile of (a) on {kind} (tottime) ---\n{_profile(ours)}")
    m = read_manifest(out)
    w0 = int(m.w0.iloc[0])
    ds = info.levels[choice.level].downsample
    rows = list(zip(m.x0.tolist(), m.y0.tolist(), strict=True))
    methods: dict[str, Callable[[], tuple[int, int, int]]] = {
        # pyFAST wants an even patch side: 527 → 526 px on the 4× pyramid
        "(b) original: FAST + JPG files": lambda: _original(
            slide, choice.level, region - region % 2, work / f"{kind}-orig"
        ),
        "(c) naive OpenSlide, read only": lambda: _naive(slide, rows, choice.level, round(w0 / ds), False),
        "(d) naive OpenSlide + resize + JPEG": lambda: _naive(
            slide, rows, choice.level, round(w0 / ds), True
        ),
    }
    for name, fn in methods.items():
        try:
            results[name] = _timed(fn)
        except Exception as err:  # OpenSlide cannot open striped TIFFs; pyFAST may refuse a slide
            print(f"{kind}: {name} cannot run: {type(err).__name__}: {err}")
    shutil.rmtree(work / f"{kind}-orig", ignore_errors=True)
    return results


def print_table(kind: str, results: dict[str, dict[str, float]]) -> None:
    cols = ("patches", "/CPU-s", "/s wall", "B/patch", "objects")
    head = f"{kind:18} {'method':38} " + " ".join(f"{c:>8}" for c in cols)
    print(head)
    for name, r in results.items():
        if "per_cpu_s" not in r:
            continue
        print(
            f"{'':18} {name:38} {r['patches']:8.0f} {r['per_cpu_s']:8.0f} {r['per_wall_s']:8.0f} "
            f"{r['bytes']:8.0f} {r['objects']:8.0f}"
        )
    ours = results[OURS]
    a = ours["per_cpu_s"]
    ratios = [
        f"{label} {a / results[key]['per_cpu_s']:.1f}×"
        for label, key in (
            ("vs original", "(b) original: FAST + JPG files"),
            ("vs naive read", "(c) naive OpenSlide, read only"),
            ("vs naive read+resize+JPEG", "(d) naive OpenSlide + resize + JPEG"),
        )
        if key in results
    ]
    print(f"{'':18} (a) per CPU-second: " + ", ".join(ratios))
    rate, fixed = ours["per_patch_cpu_s"], ours["slide_s"]
    real = REAL_PATCHES / (fixed + REAL_PATCHES / rate)
    line = f"{'':18} (a) per-slide cost {fixed:.2f} CPU-s; per patch without it {rate:.0f}/CPU-s"
    print(f"{line}; at {REAL_PATCHES:,} patches a slide {real:.0f}/CPU-s")
    d = results.get("(d) naive OpenSlide + resize + JPEG")
    if d:
        print(
            f"{'':18} (a)/(d) per CPU-second: per patch {rate / d['per_cpu_s']:.1f}×, "
            f"at {REAL_PATCHES:,} a slide {real / d['per_cpu_s']:.1f}×"
        )
    sf = results.get("scaled vs full decode")
    if sf:
        print(
            f"{'':18} scaled vs full decode, {sf['patches']:.0f} patches: |pixel diff| mean "
            f"{sf['pixel_mean']:.2f}, "
            f"worst patch {sf['pixel_max']:.2f}; ResNet18 ({sf['init']}) |p_scaled - p_full| mean "
            f"{sf['p_mean']:.4f}, max {sf['p_max']:.4f} (p std over patches {sf['p_spread']:.4f}); "
            f"feature distance / spread over patches {sf['feat_rel']:.3f}"
        )


def main(
    quick: bool | Path = False, *, profile: bool = False, kinds: tuple[str, ...] = SLIDE_TYPES
) -> dict[str, dict[str, dict[str, float]]]:
    """Run every slide type: ``quick`` on a 4096 × 3072 px base image (seconds, for the tests),
    else on a 24,576 × 18,432 px one (four demo slides' tissue). ``python -m bench`` passes its
    output folder instead: the full run there, or the quick one under ``python -m bench --quick``;
    the tables are then also written to ``<out>/table.txt``."""
    if isinstance(quick, Path):  # python -m bench passes the part's output folder
        import contextlib
        import io

        from bench import quick as quick_mode
        from bench import write_table

        out, buf = quick, io.StringIO()
        with contextlib.redirect_stdout(buf):
            every = main(quick_mode(), profile=profile)
        write_table(out, buf.getvalue().rstrip())
        return every
    else:
        work = Path(tempfile.mkdtemp(prefix="digilut-bench-extract-types-"))
    from digilut.tissue import tissue_mask

    # pyFAST's first use in a process (OpenCL set-up) is not per slide: a worker pays it once.
    blob = np.full((256, 256, 3), 240, np.uint8)
    blob[64:192, 64:192] = (150, 60, 140)
    tissue_mask(blob, 256, 256)
    level0 = _base_image(work, "tiny" if quick else "demo")
    if not quick:  # 2 × 2 demo slides: ~700 tissue patches at 20x, so per-slide costs weigh as on real slides
        level0 = np.tile(level0, (2, 2, 1))
    h, w = level0.shape[:2]
    print(
        f"base image {w}×{h} px; patches {PATCH_PX} px at {TARGET_MPP} µm/px, stride {PATCH_PX}; "
        "CPU = process time incl. children"
    )
    every: dict[str, dict[str, dict[str, float]]] = {}
    for kind in kinds:
        every[kind] = run_type(kind, level0, work, profile=profile, runs=1 if quick else RUNS)
        print_table(kind, every[kind])
    shutil.rmtree(work, ignore_errors=True)
    return every


if __name__ == "__main__":
    import argparse
    import logging

    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile (a) on every slide type")
    ap.add_argument("--types", nargs="+", choices=SLIDE_TYPES, default=SLIDE_TYPES, help="slide types to run")
    args = ap.parse_args()
    main(args.quick, profile=args.profile, kinds=tuple(args.types))
