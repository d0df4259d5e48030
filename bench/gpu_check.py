"""``make gpu-check``: the GPU tests and the GPU benchmarks in one run, for a machine with one NVIDIA
GPU that is lent rarely and briefly (goal: under 8 minutes after ``make install``).

    python -m bench.gpu_check [OUT]        # default OUT = bench-out/gpu-check

1. CPU side (runs anywhere): a synthetic patch set of 256-px JPEG patches in shards (the real
   loader's input) and a manifest, in ``OUT/patches``; about half a minute.
2. Without CUDA it stops there, says so and writes ``OUT/figures.json`` with ``"cuda": false``.
3. With CUDA: ``pytest -m gpu tests`` (bf16 AMP vs fp32, CUDA vs CPU ensemble, resume on CUDA, the
   flag on a GPU machine) and the GPU-task fail-fast tests of ``tests/unit/test_gpu.py``; then
   :func:`bench.train.bench_gpu`: ResNet18 training img/s at 256 px, fp32 vs bf16 autocast +
   channels-last (+ ``torch.compile``) on synthetic device tensors and with the real shard loader
   (pinned memory), and a 5-model ensemble over a 10,000-patch slide.
4. Writes every figure to ``OUT/figures.json`` and prints them; exits 1 when a test failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
PX, SLIDES, PER_SLIDE = 256, 12, 256  # 3,072 patches: the loader's rows and the 10k slide's source
NORMAL_RGB, LESION_RGB = (236, 160, 196), (190, 115, 175)


def _render(rng: np.random.Generator, lesion: bool) -> np.ndarray:
    """An H&E-like patch: pink (or dense purple for a lesion) with 3×3 dark nuclei."""
    img = np.empty((PX, PX, 3), np.float32)
    img[:] = LESION_RGB if lesion else NORMAL_RGB
    img += rng.normal(0, 6, (PX, PX, 1)).astype(np.float32)
    n = rng.poisson((0.006 if lesion else 0.001) * PX * PX)
    ys, xs = rng.integers(0, PX - 3, n), rng.integers(0, PX - 3, n)
    d = np.arange(3)
    img[(ys[:, None, None] + d[None, :, None]), (xs[:, None, None] + d[None, None, :])] = (52, 25, 100)
    return np.clip(img, 0, 255).astype(np.uint8)


def prepare_patches(out: Path) -> Path:
    """``OUT/patches/manifest.parquet`` + shards (made once, reused); returns the manifest path."""
    from digilut.manifest import write_manifest
    from digilut.shards import encode_jpeg, write_shard

    path = out / "patches" / "manifest.parquet"
    if path.is_file():
        return path
    rng = np.random.default_rng(0)
    rows = []
    for s in range(SLIDES):
        patient, shard = f"G{s:03d}", f"shards/G{s:03d}_a.shard"
        labels = rng.random(PER_SLIDE) < 0.35
        index = write_shard(path.parent / shard, [encode_jpeg(_render(rng, bool(x))) for x in labels])
        for i, (lab, off, nb) in enumerate(zip(labels, index.offset, index.nbytes, strict=True)):
            r, c = divmod(i, 16)
            rows.append(
                {"slide": f"{patient}_a.tif", "patient": patient, "x0": c * 2 * PX, "y0": r * 2 * PX,
                 "w0": 2 * PX, "h0": 2 * PX, "level": 1, "tissue": 1.0, "shard": shard,
                 "offset": int(off), "nbytes": int(nb), "overlap": float(lab), "label": int(lab),
                 "split": "train", "fold": s % 3, "sampled": True}
            )  # fmt: skip
    return write_manifest(pd.DataFrame(rows), path)


def run_tests(out: Path, name: str, args: list[str]) -> dict[str, Any]:
    """Run pytest with ``args``; its counts (from the JUnit XML), seconds and exit code."""
    xml = out / f"{name}.xml"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    code = subprocess.run(cmd, cwd=REPO).returncode
    res: dict[str, Any] = {"exit_code": code, "seconds": round(time.perf_counter() - t0, 1)}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    return res


def main(out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = prepare_patches(out)
    figures: dict[str, Any] = {
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "patches": len(pd.read_parquet(manifest, columns=["label"])),
        "prepare_s": round(time.perf_counter() - t0, 1),
    }
    print(f"CPU side ready: {figures['patches']} patches of {PX} px in {manifest.parent} "
          f"({figures['prepare_s']} s)", flush=True)  # fmt: skip
    if figures["cuda"]:
        figures["gpu"] = torch.cuda.get_device_name()
        figures["tests_gpu"] = run_tests(out, "tests-gpu", ["-m", "gpu", "tests"])
        figures["tests_fail_fast"] = run_tests(
            out, "tests-fail-fast", ["-m", "not gpu", "tests/unit/test_gpu.py"]
        )
        from bench.train import bench_gpu

        t1 = time.perf_counter()
        figures.update(bench_gpu(out, manifest, manifest))
        figures["bench_s"] = round(time.perf_counter() - t1, 1)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=float))
    print(format_figures(figures))
    print(f"figures: {out / 'figures.json'}")
    failed = [k for k in ("tests_gpu", "tests_fail_fast") if figures.get(k, {}).get("exit_code", 0) != 0]
    return 1 if failed else 0


def format_figures(f: dict[str, Any]) -> str:
    if not f["cuda"]:
        return (
            f"no CUDA device (torch {f['torch']}, built for CUDA {f['torch_cuda']}): the CPU side is "
            "prepared, no GPU test or figure was run or measured"
        )
    lines = [f"{f['gpu']} — torch {f['torch']} (CUDA {f['torch_cuda']}), {f['total_s']:.0f} s in all"]
    for key in ("tests_gpu", "tests_fail_fast"):
        t = f[key]
        lines.append(
            f"  {key}: {t.get('tests', '?')} tests, {t.get('failures', '?')} failed, "
            f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped in {t['seconds']} s "
            f"(exit {t['exit_code']})"
        )
    for key in sorted(k for k in f if k.startswith("gpu_train")):
        lines.append(f"  ResNet18 256 px {key[10:]}: {f[key]:,.0f} img/s")
    if "gpu_train_fp32_synthetic" in f and "gpu_train_amp_cl_synthetic" in f:
        amp = f["gpu_train_amp_cl_synthetic"] / f["gpu_train_fp32_synthetic"]
        lines.append(f"  AMP (bf16) + channels-last vs fp32, synthetic: {amp:.2f}×")
    if "gpu_ensemble5_10k_s" in f:
        lines.append(f"  5-model ensemble, 10,000-patch slide: {f['gpu_ensemble5_10k_s']:.2f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "bench-out" / "gpu-check"))
