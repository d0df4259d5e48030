"""Injected faults with real processes and real signals (issue 7): a fold killed with SIGKILL or
stopped with SIGTERM resumes to the weights of an uninterrupted seeded run, on the same MLflow run;
a full disk (RLIMIT_FSIZE) while writing a shard or a checkpoint names the file and leaves no
truncated file at its final path; a re-run reuses finished work by content hash."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from patch_fixtures import make_patch_manifest

from digilut.checkpoint import SIGTERM_ARMED
from digilut.model import load_model
from digilut.synth_plan import SynthConfig, plan_slide
from digilut.synth_render import write_slide
from digilut.tracking import Tracker, TrackingConfig
from digilut.train import FoldResult, TrainConfig, train_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU models: one thread is faster

CPU = torch.device("cpu")
CFG = TrainConfig(
    input_px=64,
    epochs=2,
    train_batch_size=16,
    num_workers=0,
    weights="none",
    hidden_units=32,
    lr=1e-3,
    patches_per_epoch=320,  # 20 batches an epoch: room for a signal to land mid-epoch
)
CLI_OPTIONS = [
    "--device=cpu",
    "--input-px=64",
    "--epochs=2",
    "--train-batch-size=16",
    "--num-workers=0",
    "--weights=none",
    "--hidden-units=32",
    "--lr=0.001",
    "--patches-per-epoch=320",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as the in-process baseline


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patch_manifest(tmp_path_factory.mktemp("data"), patients=5, grid=5, px=64, folds=2)


@pytest.fixture(scope="module")
def straight(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FoldResult]:
    """The uninterrupted seeded run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("straight")
    return out, train_fold(manifest, 0, out, CFG, CPU)


def _cli_train(manifest: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    """``digilut train`` in a child process (its own session, so a signal reaches only it)."""
    cmd = [
        str(Path(sys.executable).parent / "digilut"),
        "train",
        str(manifest),
        str(out),
        "--fold=0",
        *CLI_OPTIONS,
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **ONE_THREAD},
        start_new_session=True,
    )


def _wait_for(path_glob: Path, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(path_glob.parent.glob(path_glob.name)):
        if proc.poll() is not None:
            pytest.fail(
                f"training exited early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path_glob} did not appear within {timeout_s}s")
        time.sleep(0.02)


def _same_weights(a: Path, b: Path) -> bool:
    sa = load_model(a, CPU).model.state_dict()
    sb = load_model(b, CPU).model.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _state(path: Path) -> dict[str, object]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_fold_killed_after_an_epoch_resumes_on_the_same_mlflow_run_to_the_same_weights(
    manifest: Path, straight: tuple[Path, FoldResult], store: str, tmp_path: Path
) -> None:
    proc = _cli_train(manifest, tmp_path, f"--tracking-uri={store}")
    fold_dir = tmp_path / "fold0"
    _wait_for(fold_dir / "last.pt", proc)  # epoch 0 is checkpointed
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    state = _state(fold_dir / "last.pt")
    k = int(state["epoch"])  # type: ignore[call-overload]
    assert k == 0 and not state["finished"] and state["partial"] is None
    assert state["mlflow_run_id"], "the checkpoint carries the MLflow run id"
    assert not (fold_dir / "result.json").exists()

    with Tracker(TrackingConfig(store)) as tracker:
        resumed = train_fold(manifest, 0, fold_dir, CFG, CPU, tracker=tracker)
        assert tracker.flush(120)
    out, baseline = straight
    assert resumed.mlflow_run_id == state["mlflow_run_id"]  # the same MLflow run continued
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    for key in ("train_loss", "val_loss", "val_auroc"):
        assert [h[key] for h in resumed.history] == [h[key] for h in baseline.history]
    assert _same_weights(out / "model.pt", fold_dir / "model.pt")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert steps <= {0, 1} and 1 in steps  # epoch 1 logged by the resumed process, on that run


def _read_until(
    proc: subprocess.Popen[str], marker: str, timeout_s: float = 120
) -> tuple[list[str], threading.Thread]:
    """Lines of ``proc``'s output, read in a thread; returns once a line holds ``marker`` (the list
    goes on filling until the process ends: join the thread)."""
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not seen.wait(timeout_s):
        proc.kill()
        pytest.fail(f"no {marker!r} within {timeout_s}s: {''.join(lines)[-2000:]}")
    return lines, reader


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_within_the_grace_period_and_the_rerun_matches(
    manifest: Path, straight: tuple[Path, FoldResult], tmp_path: Path
) -> None:
    proc = _cli_train(manifest, tmp_path)
    fold_dir = tmp_path / "fold0"
    # The training loop installs its SIGTERM handler just before epoch 0's first batch and says so
    # (the CLI's own handler, which stops servers, is there from the start: waiting for any handler
    # is not enough): signalled then, it is certain to stop mid-epoch 0 (20 batches take seconds).
    lines, reader = _read_until(proc, SIGTERM_ARMED)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    grace = time.monotonic() - t0
    reader.join(30)  # the pipe is drained
    output = "".join(lines)
    assert proc.returncode == 143, output  # 128 + SIGTERM, after saving
    assert grace < 15, f"took {grace:.1f}s to stop (Kubernetes' default grace period is 30 s)"
    assert "SIGTERM" in output and "state saved to" in output and "last.pt" in output
    state = _state(fold_dir / "last.pt")
    assert not state["finished"] and state["epoch"] == -1  # no epoch finished
    partial = state["partial"]
    assert partial is not None, "the state was not saved mid-epoch"
    assert partial["epoch"] == 0 and 0 < partial["step"] < 20  # type: ignore[index]
    assert partial["seen"] == 16 * partial["step"]  # type: ignore[index]
    assert f"SIGTERM at epoch 0, batch {partial['step']}; state saved to" in output  # type: ignore[index]
    resumed = train_fold(manifest, 0, fold_dir, CFG, CPU)
    out, baseline = straight
    assert resumed.finished and [h["epoch"] for h in resumed.history] == [0, 1]
    for key in ("train_loss", "val_loss", "val_auroc"):
        assert [h[key] for h in resumed.history] == pytest.approx(
            [h[key] for h in baseline.history], rel=1e-6
        )
    assert _same_weights(out / "model.pt", fold_dir / "model.pt")


def test_finished_fold_is_reused_by_content_hash(
    manifest: Path, straight: tuple[Path, FoldResult], tmp_path: Path
) -> None:
    out, baseline = straight
    fold_dir = tmp_path / "fold0"
    shutil.copytree(out, fold_dir)
    assert train_fold(manifest, 0, fold_dir, CFG, CPU) == baseline  # same content: reused as is
    assert baseline.model_sha256 and baseline.data_sha256
    model = fold_dir / "model.pt"
    model.write_bytes(model.read_bytes()[:-10] + bytes(10))  # same name, other content
    quick = dataclasses.replace(CFG, epochs=1, patches_per_epoch=16)
    again = train_fold(manifest, 0, fold_dir, quick, CPU)  # other settings: also retrained
    assert again.epochs_run == 1 and again.model_sha256 != baseline.model_sha256
    # the same settings on changed rows (one label flipped) are retrained, not reused
    import pandas as pd

    df = pd.read_parquet(manifest)
    df.loc[df.index[0], "label"] = 1 - df.loc[df.index[0], "label"]
    changed = tmp_path / "data" / "manifest.parquet"
    changed.parent.mkdir()
    (changed.parent / "shards").symlink_to(manifest.parent / "shards")
    df.to_parquet(changed)
    redone = train_fold(changed, 0, fold_dir, quick, CPU)
    assert redone.data_sha256 != again.data_sha256 and redone.seconds > 0


# --- a full disk -----------------------------------------------------------------------------------------


def _with_file_size_limit(limit_bytes: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child whose files may not grow past ``limit_bytes`` (a full disk, as seen by
    ``write``: EFBIG; Python ignores SIGXFSZ, so the write raises instead of killing the process)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=limit,  # only sets a resource limit: safe before exec
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **ONE_THREAD},
    )


def test_full_disk_while_writing_a_shard_names_it_and_leaves_no_partial_file(tmp_path: Path) -> None:
    plan = plan_slide("good_a.tif", SynthConfig(), seed=3, positive=True)
    slide = write_slide(plan, tmp_path / "images" / "good_a.tif")
    out = tmp_path / "out"
    code = f"""
import json
from pathlib import Path
from digilut.extract import ExtractConfig, extract_slides
r = extract_slides([Path({str(slide)!r})], Path({str(out)!r}), ExtractConfig(stride_px=64), workers=0)
print(json.dumps(r["good_a.tif"].to_dict()))
"""
    proc = _with_file_size_limit(40_000, code)  # the shard holds ~50 patches of ~10 kB
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "failed"
    assert f"cannot write {out / 'shards' / 'good_a.shard'}: File too large" in result["error"]
    assert list((out / "shards").iterdir()) == []  # neither a truncated shard nor a temp file


def test_full_disk_while_writing_a_checkpoint_names_it_and_keeps_the_previous_one(
    manifest: Path, tmp_path: Path
) -> None:
    quick = dataclasses.replace(CFG, epochs=2, patches_per_epoch=16)
    first = train_fold(manifest, 1, tmp_path, quick, CPU, max_epochs_this_run=1)
    before = (tmp_path / "last.pt").read_bytes()
    limit = len(before) - 1_000_000  # model.pt (smaller) fits, the next last.pt does not
    assert (tmp_path / "model.pt").stat().st_size < limit
    code = f"""
import json, torch
from pathlib import Path
from digilut.train import TrainConfig, train_fold
torch.set_num_threads(1)
cfg = TrainConfig(**json.loads({json.dumps(dataclasses.asdict(quick))!r}))
train_fold(Path({str(manifest)!r}), 1, Path({str(tmp_path)!r}), cfg, torch.device("cpu"))
"""
    proc = _with_file_size_limit(limit, code)
    assert proc.returncode == 1
    assert f"ShardError: cannot write {tmp_path / 'last.pt'}: File too large" in proc.stderr
    assert (tmp_path / "last.pt").read_bytes() == before  # the epoch-0 checkpoint, intact
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    resumed = train_fold(manifest, 1, tmp_path, quick, CPU)  # disk space back: resumes at epoch 1
    assert resumed.finished and resumed.history[0] == first.history[0]


# --- a worker process dying ------------------------------------------------------------------------------


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has the file ``path`` open (its /proc/PID/fd links)."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False  # the process or the descriptor went away meanwhile


@pytest.mark.slow
def test_slide_whose_worker_is_killed_is_reported_and_the_batch_goes_on(tmp_path: Path) -> None:
    """Three slides in a pool of two workers. The worker that opens ``victim_a.tif`` is SIGKILLed
    (what the OOM killer sends) each time — in the shared pool, then in the pool of its own the
    slide is retried in. The victim is reported ``worker killed``; the two others finish with the
    same patches as an undisturbed run, including the one whose pool the victim broke."""
    import multiprocessing
    import threading

    from digilut.extract import ExtractConfig, extract_slides

    images = tmp_path / "images"
    names = ("victim_a.tif", "other_a.tif", "third_a.tif")
    for seed, name in enumerate(names, start=3):
        write_slide(plan_slide(name, SynthConfig(), seed=seed, positive=True), images / name)
    slides = [images / n for n in names]
    calm = extract_slides(slides[1:], tmp_path / "calm", ExtractConfig(), workers=0)
    victim = slides[0].resolve()
    results: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: results.update(extract_slides(slides, tmp_path / "out", ExtractConfig(), workers=2))
    )
    runner.start()
    killed: set[int] = set()
    deadline = time.monotonic() + 300
    while runner.is_alive() and time.monotonic() < deadline:
        for child in multiprocessing.active_children():
            if child.pid and child.pid not in killed and _has_open(child.pid, victim):
                os.kill(child.pid, signal.SIGKILL)
                killed.add(child.pid)
        time.sleep(0.002)
    runner.join(60)
    assert not runner.is_alive() and len(killed) == 2  # the shared pool's worker, then its own pool's
    r = results["victim_a.tif"]
    assert r.status == "failed" and r.error.startswith("worker killed")  # type: ignore[attr-defined]
    for name in names[1:]:
        done, undisturbed = results[name], calm[name]
        assert done.status == "ok" and done.patches == undisturbed.patches > 0  # type: ignore[attr-defined]
        assert done.shard_sha256 == undisturbed.shard_sha256  # type: ignore[attr-defined]
    assert not (tmp_path / "out" / "shards" / "victim_a.shard").exists()
