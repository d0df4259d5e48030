"""The GPU paths: bf16 autocast, channels-last, pinned-memory loading, CUDA vs CPU, resume on CUDA,
and the fail-fast of a GPU task that finds no CUDA.

Tests marked ``gpu`` skip without CUDA (tests/conftest.py). The fail-fast tests run everywhere:
they hide the GPUs from a child process (``CUDA_VISIBLE_DEVICES=""``), so they check the real thing
on a GPU machine too.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from patch_fixtures import TINY_TRAIN, tiny_training_manifest

from digilut import k8s
from digilut.epoch import training_loss
from digilut.manifest import read_manifest
from digilut.model import build_model, gpu_required, load_model, select_device
from digilut.predict import PredictConfig, amp_dtype, predict_patches, safe_auroc
from digilut.train import train_fold
from digilut.transforms import to_model_input

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_training_manifest(tmp_path_factory)


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != k8s.REQUIRE_GPU_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return {**env, **extra}


# --- fail-fast: a GPU task without CUDA --------------------------------------------------------

_TRAIN_STEP = """
import sys
from pathlib import Path
from digilut.steps.train import train_step
from digilut.tracking import TrackingConfig
from digilut.train_config import TrainConfig
out = Path(sys.argv[1])
train_step(out / "patches", out / "split", 0, out / "model", TrainConfig(), TrackingConfig())
"""


def test_gpu_task_without_cuda_fails_at_once_naming_the_flag_and_what_to_check(tmp_path: Path) -> None:
    # The train step of a pod scheduled on a GPU node whose CUDA is broken: no input exists, so the
    # error must come from the device check, before any data is read or any file written.
    env = _child_env(**{k8s.REQUIRE_GPU_ENV: "gpu-node-7", "CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_STEP, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("digilut.errors.GpuUnavailableError: DIGILUT_REQUIRE_GPU='gpu-node-7'"), last
    for words in ("NVIDIA driver", "device plugin", "nvidia.com/gpu", "CUDA_VISIBLE_DEVICES=''"):
        assert words in last
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written


def test_gpu_flag_unset_or_off_trains_on_the_cpu(manifest: Path, tmp_path: Path) -> None:
    # The same step as a local (kfp.local / CLI) run: no flag, or the flag switched off.
    for value in ("", "0", "false"):
        assert not gpu_required({k8s.REQUIRE_GPU_ENV: value}) if value else not gpu_required({})
    assert gpu_required({k8s.REQUIRE_GPU_ENV: "node-a"}) and gpu_required({k8s.REQUIRE_GPU_ENV: "1"})
    code = (
        "import sys, dataclasses\n"
        "from pathlib import Path\n"
        "from digilut.steps.train import train_step\n"
        "from digilut.tracking import TrackingConfig\n"
        "from digilut.train_config import TrainConfig\n"
        "m = Path(sys.argv[1])\n"
        "cfg = TrainConfig(input_px=64, epochs=1, train_batch_size=16, num_workers=0, weights='none',\n"
        "                  hidden_units=32, patches_per_epoch=32, cpu_threads=1)\n"
        "r = train_step(m.parent, m.parent, 0, Path(sys.argv[2]), cfg, TrackingConfig())\n"
        "print('device', r.device, 'epochs', r.epochs_run)\n"
    )
    env = _child_env(**{k8s.REQUIRE_GPU_ENV: "0", "CUDA_VISIBLE_DEVICES": ""})
    proc = subprocess.run(
        [sys.executable, "-c", code, str(manifest), str(tmp_path / "model")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device cpu epochs 1" in proc.stdout
    assert (tmp_path / "model" / "model.pt").is_file()


@pytest.mark.parametrize("name", ["training", "inference"])
def test_the_pipeline_sets_the_flag_on_exactly_its_gpu_tasks(name: str) -> None:
    docs = list(yaml.safe_load_all((REPO / "pipelines" / "compiled" / f"{name}.yaml").read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu = {k for k, v in executors.items() if "accelerator" in v["container"].get("resources", {})}
    assert gpu, "no task requests a GPU"
    flagged = {
        k
        for k, v in platform.items()
        if {"name": k8s.REQUIRE_GPU_ENV, "fieldPath": k8s.REQUIRE_GPU_FIELD} in v.get("fieldPathAsEnv", [])
    }
    assert flagged == gpu
    # a constant env value would reach kfp.local's CPU runs too: the flag lives in the platform spec
    assert all(
        e["name"] != k8s.REQUIRE_GPU_ENV for v in executors.values() for e in v["container"].get("env", [])
    )


@pytest.mark.gpu
def test_gpu_flag_on_a_gpu_machine_picks_cuda() -> None:
    assert select_device("auto", {k8s.REQUIRE_GPU_ENV: "this-node"}).type == "cuda"


# --- GPU paths (skipped without CUDA) ----------------------------------------------------------


@pytest.mark.gpu
def test_one_training_step_under_amp_matches_fp32(manifest: Path) -> None:
    """bf16 autocast + channels-last: the loss before and after one AdamW step within 3 % of fp32."""
    dev = torch.device("cuda")
    rows = read_manifest(manifest).iloc[:32]
    from digilut.data import PatchDataset

    ds = PatchDataset(manifest.parent, rows)
    batch = ds.__getitems__(list(range(len(rows))))
    y = batch.labels.to(dev)
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY.model_spec(), "none").to(dev)
        if amp:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x = to_model_input(batch.images.pin_memory(), dev, input_px=64, channels_last=amp)
        model.train()
        seen = []
        for _ in range(2):  # loss, step, loss again
            with torch.autocast("cuda", dtype=amp_dtype(dev), enabled=amp):
                logits = model(x)
            loss = training_loss(logits.float(), y, TINY)
            seen.append(float(loss))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses[amp] = seen
    assert losses[True] == pytest.approx(losses[False], rel=0.03), losses


@pytest.mark.gpu
def test_ensemble_on_cuda_matches_the_cpu(manifest: Path, tmp_path: Path) -> None:
    """Two trained fold models: the ensemble on CUDA (pinned-memory loading) in fp32 within 1e-3 of
    the CPU's probabilities, and with bf16 autocast + channels-last within 0.01, same AUROC ± 0.02."""
    dev = torch.device("cuda")
    results = [train_fold(manifest, k, tmp_path / f"fold{k}", TINY, dev) for k in (0, 1)]
    files = [tmp_path / f"fold{r.fold}" / r.model_file for r in results]
    rows = read_manifest(manifest)
    pcfg = PredictConfig(predict_batch_size=64, num_workers=0)
    cpu = predict_patches(rows, manifest.parent, files, pcfg, CPU)
    for amp, tol in ((False, 1e-3), (True, 0.01)):
        cfg = PredictConfig(predict_batch_size=64, num_workers=1, amp=amp, channels_last=amp)
        cuda = predict_patches(rows, manifest.parent, files, cfg, dev)
        assert list(cuda["offset"]) == list(cpu["offset"])
        diff = (cuda["prob"] - cpu["prob"]).abs()
        assert diff.max() < tol, (amp, diff.describe())
        labels = rows["label"].to_numpy()
        auroc_cpu, auroc_cuda = (
            safe_auroc(labels, cpu["prob"].to_numpy()),
            safe_auroc(labels, cuda["prob"].to_numpy()),
        )
        assert auroc_cuda == pytest.approx(auroc_cpu, abs=0.02)


@pytest.mark.gpu
def test_resume_on_cuda_matches_an_uninterrupted_run(manifest: Path, tmp_path: Path) -> None:
    """Stopped after epoch 0 and resumed: the same history and weights as a straight run, within
    the tolerance of cuDNN's non-deterministic kernels (pinned-memory loading, AMP, channels-last)."""
    dev = torch.device("cuda")
    cfg = dataclasses.replace(TINY, num_workers=1)
    straight = train_fold(manifest, 0, tmp_path / "straight", cfg, dev)
    first = train_fold(manifest, 0, tmp_path / "resumed", cfg, dev, max_epochs_this_run=1)
    assert first.epochs_run == 1 and not first.finished
    resumed = train_fold(manifest, 0, tmp_path / "resumed", cfg, dev)
    assert resumed.finished and resumed.device.startswith("cuda")
    for key in ("train_loss", "val_loss"):
        a, b = [h[key] for h in straight.history], [h[key] for h in resumed.history]
        assert b == pytest.approx(a, rel=0.05), (key, a, b)
    wa = load_model(tmp_path / "straight" / "model.pt", CPU).model.state_dict()
    wb = load_model(tmp_path / "resumed" / "model.pt", CPU).model.state_dict()
    for k in wa:
        if wa[k].is_floating_point() and wa[k].numel() > 1:
            rel = float((wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-8))
            assert rel < 0.05, (k, rel)
