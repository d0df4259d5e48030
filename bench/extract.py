"""Extraction benchmark on one generated full-size 40x slide (82,944 × 197,632 px; quick mode: a
tiny 4,096 × 3,072 px one).

(a) digilut prepare end to end (FAST tissue mask, read, tissue filter, JPEG encode, one shard,
    labels), (b) the original method (pyFAST PatchGenerator + one JPEG file per patch with Pillow),
(c) a naive single-thread OpenSlide ``read_region`` loop over the same tissue grid (read only).
Prints patches/s, patches/s per core used (CPU seconds / wall seconds), bytes per patch and
objects written per slide.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench import cpu_seconds
from digilut.cpus import available_cpus


def _timed(fn: Callable[[], tuple[int, int, int]]) -> dict[str, float]:
    t0, c0 = time.perf_counter(), cpu_seconds()
    patches, nbytes, objects = fn()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    cores = max(cpu / wall, 1e-9)
    return {
        "patches": patches,
        "wall_s": wall,
        "cores": cores,
        "rate": patches / wall,
        "per_core": patches / wall / cores,
        "bytes": nbytes / max(patches, 1),
        "objects": objects,
    }


def make_slide(data: Path, size: str = "full") -> Path:
    """One synthetic slide of ``size`` and its train.csv (made once, then reused)."""
    import pandas as pd

    from digilut.synth_plan import SynthConfig, patient_names, plan_slide
    from digilut.synth_render import write_slide

    name = f"{patient_names(1, 42)[0]}_a.tif"
    path = data / "images" / name
    if not (data / "train.csv").is_file():
        t0 = time.perf_counter()
        plan = plan_slide(name, SynthConfig(size=size), seed=42, positive=True)  # type: ignore[arg-type]
        write_slide(plan, path)
        rows = [(name, *b, plan.width, plan.height) for b in plan.boxes]
        pd.DataFrame(rows, columns=["filename", "x1", "x2", "y1", "y2", "max_x", "max_y"]).to_csv(
            data / "train.csv", index=False
        )
        print(f"generated a {size}-size slide in {time.perf_counter() - t0:.0f}s")
    return path


def main(out: Path) -> None:
    from bench import quick, write_table
    from digilut.extract import ExtractConfig
    from digilut.manifest import read_manifest
    from digilut.slide import read_slide_info
    from digilut.steps.prepare import prepare_step

    data = out / "data"
    slide = make_slide(data, "tiny" if quick() else "full")
    single = out / "single"
    (single / "images").mkdir(parents=True, exist_ok=True)
    link = single / "images" / slide.name
    if not link.exists():
        os.link(slide, link)
    shutil.copy(data / "train.csv", single / "train.csv")
    cfg = ExtractConfig()

    def ours() -> tuple[int, int, int]:
        shutil.rmtree(out / "ours", ignore_errors=True)
        rep = prepare_step(single, out / "ours", cfg, workers=0, threads=available_cpus())
        if rep.failed:  # a benchmark of a refused slide measures nothing
            raise RuntimeError(f"extraction refused the benchmark slide: {rep.slides[slide.name].error}")
        shard = next((out / "ours").glob("*.shard"))
        return rep.patches, shard.stat().st_size, len(list((out / "ours").glob("*.shard")))

    def original() -> tuple[int, int, int]:
        import fast
        from PIL import Image

        fast.Reporter.setGlobalReportMethod(fast.Reporter.NONE)
        dst = out / "original"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        importer = fast.WholeSlideImageImporter.create(str(slide))
        tissue = fast.TissueSegmentation.create(useColorThresholdingMethod=True).connect(importer)
        gen = (
            fast.PatchGenerator.create(256, 256, level=1, maskThreshold=0.5)
            .connect(0, importer)
            .connect(1, tissue)
        )
        n = size = 0
        for patch in fast.DataStream(gen):
            x = int(patch.getFrameData("patchid-x"))
            y = int(patch.getFrameData("patchid-y"))
            path = dst / f"{slide.stem}_{x}_{y}.jpg"
            Image.fromarray(np.asarray(patch)[..., :3]).save(path, quality=90)
            size += path.stat().st_size
            n += 1
        return n, size, n

    manifest_rows: list[tuple[int, int]] = []

    def naive() -> tuple[int, int, int]:
        import openslide

        osl = openslide.OpenSlide(str(slide))
        for x0, y0 in manifest_rows:
            osl.read_region((x0, y0), 1, (256, 256))
        return len(manifest_rows), 0, 0

    results = {"(a) digilut prepare": _timed(ours)}
    m = read_manifest(out / "ours")
    manifest_rows.extend(zip(m.x0.tolist(), m.y0.tolist(), strict=True))
    results["(b) original: FAST + JPG files"] = _timed(original)
    results["(c) naive OpenSlide loop (read only)"] = _timed(naive)
    info = read_slide_info(slide)
    lines = [
        f"slide {slide.name}: {info.width}×{info.height} px at {info.mpp:g} µm/px; "
        "patches 256 px at 0.5 µm/px, stride 256"
    ]
    cols = ("patches", "wall s", "cores", "patch/s", "/core", "B/patch", "objects")
    head = f"{'method':38} " + " ".join(f"{c:>8}" for c in cols)
    lines += [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(
            f"{name:38} {r['patches']:8.0f} {r['wall_s']:8.1f} {r['cores']:8.2f} {r['rate']:8.0f} "
            f"{r['per_core']:8.0f} {r['bytes']:8.0f} {r['objects']:8.0f}"
        )
    a, b, c = (results[k] for k in results)
    lines.append(
        f"(a)/(b) = {a['rate'] / b['rate']:.1f}× (goal ≥ 3×); "
        f"(a)/(c) per core = {a['per_core'] / c['per_core']:.1f}× (goal ≥ 1×)"
    )
    write_table(out, "\n".join(lines))
    shutil.rmtree(out / "original", ignore_errors=True)
