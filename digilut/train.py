"""Training of one cross-validation fold: ResNet patch classifier, early stopping on validation AUROC.

:func:`train_fold` trains on the training patients of the other folds (the rows kept by negative
undersampling, ``sampled``) and validates on every patch of fold ``K``'s patients. It writes, in
``out_dir``::

    model.pt        best model (highest validation AUROC), a digilut model file
    last.pt         full training state after the last finished epoch (resume point)
    oof.parquet     out-of-fold predictions: the validation rows + ``prob`` of the best model
    result.json     :class:`FoldResult` (history, best epoch, figures, MLflow run id)
    tensorboard/    event files: loss, AUROC, learning rate, a grid of training patches; copied
                    after every epoch to the tracking config's ``tensorboard_dir`` (e.g.
                    ``s3://bucket/tensorboard/<run>/fold<k>``, where the TensorBoard server reads)

Every file is written atomically. Re-running the same command resumes from ``last.pt`` (the same
MLflow run continues), and returns at once when the fold has already finished. Runs are
deterministic per ``seed`` on the CPU (sampling and augmentation are seeded per epoch, the torch
RNG state is checkpointed). AMP (bf16) and channels-last are used on CUDA.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import pickle
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from digilut.cpus import available_cpus
from digilut.data import PatchDataset, make_loader, make_sampler, to_model_input
from digilut.errors import ConfigError, DigilutError, TrainingInterrupted
from digilut.files import atomic_write, file_sha256
from digilut.manifest import read_manifest, write_manifest
from digilut.model import BackboneInit, PatchClassifier, build_model, save_model
from digilut.predict import amp_dtype, safe_auroc
from digilut.tracking import RunHandle, Tracker, TrackingConfig
from digilut.train_config import FoldResult, TrainConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "digilut-train-state/1"
# Columns that decide what a fold trains on: a changed manifest (other patches, labels, split) means
# the saved state belongs to other data and the fold is retrained.
_DATA_COLUMNS = ("slide", "x0", "y0", "w0", "h0", "shard", "offset", "nbytes", "label", "fold", "sampled")


@dataclass(frozen=True)
class FoldData:
    """The training and validation rows of one fold."""

    train: pd.DataFrame
    val: pd.DataFrame


def fold_rows(manifest: pd.DataFrame, fold: int, cfg: TrainConfig) -> FoldData:
    """Training rows (other folds, ``sampled`` if ``use_sampled``) and validation rows (fold ``fold``)."""
    missing = [c for c in ("split", "fold", "label") if c not in manifest.columns]
    if missing:
        raise ConfigError(
            f"manifest lacks {', '.join(missing)}: run digilut prepare (with boxes) and digilut split"
        )
    train_side = manifest["split"] == "train"
    folds = sorted(int(f) for f in manifest.loc[train_side, "fold"].unique())
    if fold not in folds:
        raise ConfigError(f"fold={fold}: the manifest's training folds are {folds}")
    val = manifest[train_side & (manifest["fold"] == fold)]
    keep = train_side & (manifest["fold"] != fold)
    if cfg.use_sampled and "sampled" in manifest.columns:
        keep &= manifest["sampled"].astype(bool)
    train = manifest[keep]
    if cfg.max_val_patches and len(val) > cfg.max_val_patches:
        rng = np.random.default_rng([cfg.seed, fold, 5])
        val = val.iloc[np.sort(rng.choice(len(val), cfg.max_val_patches, replace=False))]
    if train.empty or train["label"].nunique() < 2:
        raise ConfigError(
            f"fold {fold}: the training rows hold {len(train)} patches and "
            f"{int(train['label'].sum()) if len(train) else 0} positives; training needs both classes"
        )
    return FoldData(train.reset_index(drop=True), val.reset_index(drop=True))


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if cfg.loss == "focal":
        return sigmoid_focal_loss(logits, y, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="mean")
    pw = torch.tensor(cfg.pos_weight, device=logits.device) if cfg.pos_weight != 1.0 else None
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw)


def _cosine(total_steps: int) -> Any:
    warmup = max(1, round(0.05 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _patch_grid(x: torch.Tensor, labels: torch.Tensor, n: int = 32) -> torch.Tensor:
    """De-normalised model inputs with a red (lesion) or green (no lesion) border, as one image."""
    from torchvision.utils import make_grid

    from digilut.data import IMAGENET_MEAN, IMAGENET_STD

    x = x[:n].detach().float().cpu()
    x = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    x = F.pad(x.clamp(0, 1), (3, 3, 3, 3))
    colour = torch.where(labels[:n].view(-1, 1) > 0.5, torch.tensor([1.0, 0, 0]), torch.tensor([0, 0.8, 0]))
    border = torch.ones_like(x[:, :1], dtype=torch.bool)
    border[..., 3:-3, 3:-3] = False
    x = torch.where(border, colour.view(-1, 3, 1, 1), x)
    return make_grid(x, nrow=8, padding=2)


@torch.no_grad()
def _validate(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    cfg: TrainConfig,
    use_amp: bool,
    channels_last: bool,
    n: int,
    stain: torch.Tensor | None = None,
) -> tuple[np.ndarray, float]:
    model.eval()
    probs = np.zeros(n, np.float32)
    loss_sum = 0.0
    for batch in loader:
        x = to_model_input(
            batch.images,
            device,
            input_px=cfg.input_px,
            channels_last=channels_last,
            stain=None if stain is None else stain[batch.index],
        )
        y = batch.labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=use_amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        probs[batch.index.numpy()] = torch.sigmoid(logits).cpu().numpy()
    return probs, loss_sum / max(n, 1)


def fold_data_digest(data: FoldData) -> str:
    """SHA-256 of the rows a fold trains and validates on (the columns that decide the result)."""
    h = hashlib.sha256()
    for part in (data.train, data.val):
        cols = [c for c in _DATA_COLUMNS if c in part.columns]
        h.update(pd.util.hash_pandas_object(part[cols], index=False).to_numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


class _StopRequest:
    """Set by SIGTERM; the training loop checks it at every batch boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.at = 0.0


SIGTERM_ARMED = "SIGTERM now saves a checkpoint at the next batch boundary"


@contextmanager
def _sigterm_saves_state(enabled: bool) -> Iterator[_StopRequest]:
    """While training, SIGTERM (Kubernetes deleting the pod, ``kill``) requests a checkpoint at the
    next batch boundary instead of killing the process; the previous handler is restored after.
    Only the main thread can install handlers: elsewhere this is a no-op."""
    stop = _StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_term(signum: int, _frame: object) -> None:
        stop.signal, stop.at = signum, time.monotonic()
        log.warning("SIGTERM: saving a checkpoint at the next batch boundary, then stopping")

    previous = signal.signal(signal.SIGTERM, on_term)
    log.info(SIGTERM_ARMED)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def sync_events(tensorboard_dir: Path, dest: str) -> None:
    """Copy a fold's event files to ``dest`` (a folder or ``s3://`` prefix; unchanged files are
    skipped). A failure is logged, not raised: TensorBoard must not stop training."""
    if not dest or not tensorboard_dir.is_dir():
        return
    try:
        if dest.startswith("s3://"):
            from digilut.locations import s3_target
            from digilut.storage import upload_dir

            cfg, prefix = s3_target(dest)
            upload_dir(cfg, tensorboard_dir, prefix)
        else:
            shutil.copytree(tensorboard_dir, dest, dirs_exist_ok=True)
    except (OSError, DigilutError) as err:
        log.warning("tensorboard: copying %s to %s failed (%s); training goes on", tensorboard_dir, dest, err)


def _cuda_rng(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator's state (dropout draws on the GPU from it), or None on the CPU."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_cuda_rng(saved: dict[str, Any], device: torch.device) -> None:
    """Restore the CUDA generator saved by :func:`_cuda_rng`, so that a fold resumed on a GPU
    draws the same dropout masks as an uninterrupted run."""
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, [buf.getvalue()])


def _load_state(path: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        log.warning("%s unreadable (%s): training from scratch", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        log.warning("%s is not a digilut training state: training from scratch", path)
        return None
    if state["config"] != cfg.fingerprint():
        changed = sorted(k for k, v in cfg.fingerprint().items() if state["config"].get(k) != v)
        log.warning(
            "%s was trained with other settings (%s): training from scratch", path, ", ".join(changed)
        )
        return None
    return state


def train_fold(
    manifest: str | Path,
    fold: int,
    out_dir: str | Path,
    cfg: TrainConfig,
    device: torch.device,
    *,
    tracker: Tracker | None = None,
    parent: RunHandle | None = None,
    max_epochs_this_run: int | None = None,
    root: str | Path | None = None,
    handle_sigterm: bool = True,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> FoldResult:
    """Train fold ``fold`` of the split ``manifest`` into ``out_dir`` (see the module docstring).

    ``root``: the folder the manifest's shard paths are relative to (default: the manifest's own
    folder; the pipeline keeps shards and split tables in separate artifacts).

    ``tracker``/``parent``: MLflow child run of ``parent`` (params, per-epoch metrics, the model).
    ``max_epochs_this_run`` stops after that many epochs (time-sliced jobs); a later call resumes.

    ``handle_sigterm``: SIGTERM (a pod being deleted) saves the full state at the next batch
    boundary — mid-epoch, sampler position and RNG states included — into ``last.pt`` and raises
    :class:`~digilut.errors.TrainingInterrupted`; a re-run resumes at that batch and ends with the
    same weights as an uninterrupted run. ``on_checkpoint(out_dir)`` is called after every saved
    state and after ``result.json`` (e.g. to copy the folder where a new pod finds it: see
    :func:`digilut.steps.train_step`). The event files are copied at the same points to
    ``tracker.cfg.tensorboard_dir(fold, parent run id)`` when the tracking config names a logdir.
    A finished fold is reused only when ``model.pt`` still has the content recorded in
    ``result.json`` and the fold's rows are the same (content hashes).
    """
    t_start = time.perf_counter()
    manifest = Path(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = read_manifest(manifest)
    if root is None:
        root = manifest.parent if manifest.suffix else manifest
    data = fold_rows(df, fold, cfg)
    data_sha = fold_data_digest(data)
    state_path = out_dir / "last.pt"
    state = _load_state(state_path, cfg) if state_path.is_file() else None
    if state is not None and state.get("data_sha256", data_sha) != data_sha:
        log.warning("%s was trained on other rows (the manifest changed): training from scratch", state_path)
        state = None
    if state is not None and state["finished"] and (out_dir / "result.json").is_file():
        done = FoldResult.load(out_dir / "result.json")
        model = out_dir / done.model_file
        if model.is_file() and done.model_sha256 in ("", file_sha256(model)):
            log.info("fold %d: already trained in %s (best epoch %d)", fold, out_dir, state["best_epoch"])
            return done
        log.warning(
            "fold %d: %s is missing or changed since training (hash differs): retraining", fold, model
        )
        state = None

    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.cpu_threads:
        # Folds that share a machine's cores (kfp.local runs them side by side) must not each
        # start one OpenMP thread per core: oversubscribed, they ran 10× slower here.
        torch.set_num_threads(cfg.cpu_threads)
    elif device.type == "cpu" and torch.get_num_threads() > (cpus := available_cpus()):
        torch.set_num_threads(cpus)  # torch's default is the node's cores, not the pod's CPU limit
    use_cuda = device.type == "cuda"
    use_amp = cfg.amp and use_cuda
    channels_last = cfg.channels_last and use_cuda
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    if state is not None and "init" in state:  # resumed: the weights come from the state, and the
        init = BackboneInit.from_dict(state["init"])  # record of what the first epoch started from
        model = PatchClassifier(cfg.model_spec()).to(device)
    else:
        model = build_model(cfg.model_spec(), cfg.weights).to(device)
        init = model.init
    log.info("fold %d: backbone %s: %s", fold, cfg.arch, init.words)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile and use_cuda else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    per_epoch = cfg.patches_per_epoch or len(data.train)
    drop_last = per_epoch > cfg.batch_size
    steps_per_epoch = per_epoch // cfg.batch_size if drop_last else 1
    sched: Any
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.epochs * steps_per_epoch))
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=1)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype(device) == torch.float16)

    history: list[dict[str, float]] = []
    best_auroc, best_loss, best_epoch, bad_epochs, start_epoch = -math.inf, math.inf, -1, 0, 0
    run_id: str | None = None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        _set_cuda_rng(state, device)
        history = list(state["history"])
        best_auroc, best_loss, best_epoch = state["best_auroc"], state["best_loss"], state["best_epoch"]
        bad_epochs, start_epoch, run_id = state["bad_epochs"], state["epoch"] + 1, state["mlflow_run_id"]
        partial = state.get("partial")
        if partial:
            start_epoch = partial["epoch"]
            log.info(
                "fold %d: resuming at epoch %d, batch %d from %s",
                fold,
                start_epoch,
                partial["step"],
                state_path,
            )
        else:
            log.info("fold %d: resuming at epoch %d from %s", fold, start_epoch, state_path)
    partial = state.get("partial") if state is not None else None

    tracker = tracker or Tracker(TrackingConfig())
    run = tracker.start_run(
        f"fold{fold}",
        parent=parent,
        run_id=run_id,
        tags={
            "digilut.fold": str(fold),
            "digilut.manifest": str(manifest),
            "digilut.init": init.label,
            "digilut.init_words": init.words,
        },
    )
    train_set = PatchDataset(root, data.train, augment=True, seed=cfg.seed)
    val_set = PatchDataset(root, data.val, augment=False)
    stain_train = stain_val = None
    if cfg.stain_norm == "reinhard":  # fitted on every patch row of the fold's slides, as predict does
        from digilut.data import slide_stain_stats
        from digilut.stain import row_stain_stats

        slides = set(data.train["slide"]) | set(data.val["slide"])
        fitted = slide_stain_stats(root, df[df["slide"].isin(slides)])
        stain_train, stain_val = row_stain_stats(data.train, fitted), row_stain_stats(data.val, fitted)
    n_val_pos = int(data.val["label"].sum())
    tracker.log_params(
        run,
        {
            **cfg.fingerprint(),
            "fold": fold,
            "train_patches": len(data.train),
            "val_patches": len(data.val),
            "val_positives": n_val_pos,
            "device": str(device),
            **init.tracking_params(),
        },
    )
    augment = cfg.colour_augment()
    from torch.utils.tensorboard import SummaryWriter

    first_step = partial["step"] if partial is not None else 0
    purge = start_epoch * steps_per_epoch + first_step
    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge or None)
    events_dest = tracker.cfg.tensorboard_dir(fold, parent.run_id if parent else None)
    if events_dest:
        log.info("fold %d: TensorBoard events go to %s", fold, events_dest)

    def publish_events() -> None:
        writer.flush()
        sync_events(out_dir / "tensorboard", events_dest)

    log.info(
        "fold %d: %d training patches (%d positive), %d validation patches (%d positive), %s × %d epochs, "
        "%d steps/epoch on %s (amp=%s, channels_last=%s)",
        fold,
        len(data.train),
        int(data.train["label"].sum()),
        len(data.val),
        n_val_pos,
        cfg.arch,
        cfg.epochs,
        steps_per_epoch,
        device,
        use_amp,
        channels_last,
    )
    if n_val_pos in (0, len(data.val)):
        log.warning(
            "fold %d: validation has a single class: AUROC undefined, selecting on validation loss", fold
        )
    epoch = start_epoch - 1
    finished = bool(state and state["finished"])  # finished, but result.json was not written

    waited: list[bool] = []

    def snapshot(epoch_done: int, partial_state: dict[str, Any] | None) -> dict[str, Any]:
        """The full training state: after epoch ``epoch_done``, or mid-epoch with ``partial_state``."""
        if run.run_id is None and tracker.enabled and not waited:
            waited.append(True)  # once: a server that is down must not slow every epoch
            run.wait(5.0)  # the checkpoint should carry the MLflow run id, so a resume continues it
        return {
            "format": STATE_FORMAT,
            "config": cfg.fingerprint(),
            "data_sha256": data_sha,
            "init": init.to_dict(),
            "epoch": epoch_done,
            "finished": finished,
            "partial": partial_state,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": _cuda_rng(device),
            "history": history,
            "best_auroc": best_auroc,
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "mlflow_run_id": run.run_id or run_id,
        }

    try:
        with _sigterm_saves_state(handle_sigterm) as sigterm:
            for epoch in range(start_epoch, cfg.epochs):
                if finished or (
                    max_epochs_this_run is not None and epoch - start_epoch >= max_epochs_this_run
                ):
                    epoch -= 1
                    break
                t0 = time.perf_counter()
                model.train()
                train_set.set_epoch(epoch)
                sampler: Any = make_sampler(
                    train_set.labels, cfg.sampler, num_samples=per_epoch, seed=cfg.seed, epoch=epoch
                )
                gen = torch.Generator(device).manual_seed(_seed_for(cfg.seed, epoch, 17))
                loss_sum, seen, first_step = 0.0, 0, 0
                if partial is not None:  # resume mid-epoch: the same rows, minus the batches done
                    first_step, loss_sum, seen = partial["step"], partial["loss_sum"], partial["seen"]
                    sampler = list(sampler)[first_step * cfg.batch_size :]
                    gen.set_state(partial["generator"])
                loader = make_loader(
                    train_set,
                    sampler,
                    batch_size=cfg.batch_size,
                    num_workers=cfg.num_workers,
                    pin_memory=use_cuda,
                    drop_last=drop_last,
                )
                batches = iter(loader)  # draws the loader's base seed from the global RNG
                if partial is not None:
                    torch.set_rng_state(partial["rng"])  # as it was after the last batch done
                    _set_cuda_rng(partial, device)
                    partial = None
                for step, batch in enumerate(batches, start=first_step):
                    x = to_model_input(
                        batch.images,
                        device,
                        input_px=cfg.input_px,
                        channels_last=channels_last,
                        augment=augment,
                        generator=gen,
                        stain=None if stain_train is None else stain_train[batch.index],
                    )
                    y = batch.labels.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=use_amp):
                        logits = forward(x)
                    loss = _loss(logits.float(), y, cfg)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    if cfg.schedule == "cosine":
                        sched.step()
                    loss_sum += float(loss.detach()) * len(y)
                    seen += len(y)
                    global_step = epoch * steps_per_epoch + step
                    if step % cfg.log_every_steps == 0:
                        writer.add_scalar("train/loss_step", float(loss.detach()), global_step)
                        writer.add_scalar("train/lr", opt.param_groups[0]["lr"], global_step)
                    if step == 0 and epoch == start_epoch:
                        writer.add_image(
                            "patches/train (red border = lesion)", _patch_grid(x, batch.labels), epoch
                        )
                    if sigterm.signal is not None:
                        mid = {
                            "epoch": epoch,
                            "step": step + 1,
                            "loss_sum": loss_sum,
                            "seen": seen,
                            "generator": gen.get_state(),
                            "rng": torch.get_rng_state(),
                            "cuda_rng": _cuda_rng(device),
                        }
                        _save_state(state_path, snapshot(epoch - 1, mid))
                        publish_events()
                        if on_checkpoint:
                            on_checkpoint(out_dir)
                        raise TrainingInterrupted(
                            f"fold {fold}: SIGTERM at epoch {epoch}, batch {step + 1}; state saved to "
                            f"{state_path} {time.monotonic() - sigterm.at:.1f}s after the signal; "
                            "run again to resume"
                        )
                train_s = time.perf_counter() - t0
                probs, val_loss = _validate(
                    forward,
                    make_loader(
                        val_set,
                        make_sampler(val_set.labels, "sequential"),
                        batch_size=cfg.batch_size * 2,
                        num_workers=cfg.num_workers,
                        pin_memory=use_cuda,
                    ),
                    device,
                    cfg,
                    use_amp,
                    channels_last,
                    len(val_set),
                    stain_val,
                )
                auroc = safe_auroc(data.val["label"].to_numpy(), probs)
                if cfg.schedule == "plateau":
                    sched.step(auroc if math.isfinite(auroc) else -val_loss)
                row = {
                    "epoch": epoch,
                    "train_loss": loss_sum / max(seen, 1),
                    "val_loss": val_loss,
                    "val_auroc": auroc,
                    "lr": opt.param_groups[0]["lr"],
                    "train_images_per_s": seen / max(train_s, 1e-9),
                    "epoch_s": time.perf_counter() - t0,
                }
                history.append(row)
                for key in ("train_loss", "val_loss", "val_auroc", "lr", "train_images_per_s"):
                    if math.isfinite(row[key]):
                        writer.add_scalar(f"epoch/{key}", row[key], epoch)
                writer.flush()
                tracker.log_metrics(run, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                improved = (
                    auroc > best_auroc if math.isfinite(auroc) else (best_epoch < 0 or val_loss < best_loss)
                )
                if improved:
                    best_auroc, best_loss, best_epoch, bad_epochs = auroc, val_loss, epoch, 0
                    save_model(
                        out_dir / "model.pt",
                        model,
                        {
                            "fold": fold,
                            "epoch": epoch,
                            "val_auroc": auroc,
                            "val_loss": val_loss,
                            "config": json.dumps(cfg.fingerprint()),
                            "init": init.label,
                            "init_words": init.words,
                        },
                    )
                    write_manifest(data.val.assign(prob=probs, oof_fold=fold), out_dir / "oof.parquet")
                else:
                    bad_epochs += 1
                stop = bad_epochs >= cfg.patience
                finished = stop or epoch == cfg.epochs - 1
                log.info(
                    "fold %d epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f%s; %.0f img/s, %.0fs",
                    fold,
                    epoch,
                    row["train_loss"],
                    val_loss,
                    auroc,
                    " (best)" if improved else "",
                    row["train_images_per_s"],
                    row["epoch_s"],
                )
                _save_state(state_path, snapshot(epoch, None))
                publish_events()
                if on_checkpoint:
                    on_checkpoint(out_dir)
                if sigterm.signal is not None and not finished:  # signalled during validation
                    raise TrainingInterrupted(
                        f"fold {fold}: SIGTERM during epoch {epoch}; state saved to {state_path} after it; "
                        "run again to resume"
                    )
                if stop:
                    log.info(
                        "fold %d: no better AUROC for %d epochs: early stop at epoch %d",
                        fold,
                        cfg.patience,
                        epoch,
                    )
                    break
    except TrainingInterrupted:
        tracker.end_run(run, "KILLED")
        writer.close()
        raise
    except BaseException:
        tracker.end_run(run, "FAILED")
        writer.close()
        raise
    writer.close()
    sync_events(out_dir / "tensorboard", events_dest)
    if best_epoch < 0:
        raise DigilutError(f"fold {fold}: no epoch finished (max_epochs_this_run={max_epochs_this_run})")
    result = FoldResult(
        fold=fold,
        best_epoch=best_epoch,
        best_val_auroc=best_auroc,
        best_val_loss=best_loss,
        epochs_run=len(history),
        finished=finished,
        stopped_early=finished and epoch < cfg.epochs - 1,
        train_patches=len(data.train),
        val_patches=len(data.val),
        val_positives=n_val_pos,
        seconds=time.perf_counter() - t_start,
        device=str(device),
        mlflow_run_id=run.run_id or run_id,
        config=cfg.fingerprint(),
        history=history,
        model_sha256=file_sha256(out_dir / "model.pt"),
        data_sha256=data_sha,
        patch_bytes_fetched=train_set.reader.stats.bytes + val_set.reader.stats.bytes,
        patch_requests=train_set.reader.stats.requests + val_set.reader.stats.requests,
        patch_local_hits=train_set.reader.stats.hits + val_set.reader.stats.hits,
        init=init.to_dict(),
    )
    log.info(
        "fold %d: %.1f MB of patches fetched from %s in %d reads, %d patches read again locally",
        fold,
        result.patch_bytes_fetched / 1e6,
        root,
        result.patch_requests,
        result.patch_local_hits,
    )
    result.save(out_dir / "result.json")
    if on_checkpoint:
        on_checkpoint(out_dir)
    if finished:
        tracker.log_metrics(run, {"best_val_auroc": best_auroc, "best_epoch": best_epoch}, step=best_epoch)
        tracker.log_model(run, out_dir / "model.pt")
        tracker.log_artifacts(run, out_dir / "oof.parquet")
        tracker.log_artifacts(run, out_dir / "result.json")
        tracker.end_run(run, "FINISHED")
    return result
