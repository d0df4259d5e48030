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
RNG state is checkpointed).

This module is the orchestration; the parts live in :mod:`digilut.fold_data` (the fold's rows),
:mod:`digilut.checkpoint` (the state, SIGTERM), :mod:`digilut.epoch` (one epoch of training and
validation) and :mod:`digilut.fold_log` (TensorBoard and MLflow).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from digilut.checkpoint import (
    STATE_NAME,
    MidEpoch,
    Progress,
    StopRequest,
    TrainState,
    cuda_rng_state,
    load_state,
    save_state,
    sigterm_saves_state,
)
from digilut.epoch import EpochRunner
from digilut.errors import DigilutError, TrainingInterrupted
from digilut.files import file_sha256
from digilut.fold_data import FoldData, fold_data_digest, fold_rows
from digilut.fold_log import FoldLogger
from digilut.manifest import read_manifest, write_manifest
from digilut.model import save_model
from digilut.tracking import RunHandle, Tracker, TrackingConfig
from digilut.train_config import FoldResult, TrainConfig

log = logging.getLogger(__name__)


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
    :func:`digilut.steps.train.train_step`). The event files are copied at the same points to
    ``tracker.cfg.tensorboard_dir(fold, parent run id)`` when the tracking config names a logdir.
    A finished fold is reused only when ``model.pt`` still has the content recorded in
    ``result.json`` and the fold's rows are the same (content hashes).
    """
    t_start = time.perf_counter()
    manifest, out_dir = Path(manifest), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = read_manifest(manifest)
    if root is None:
        root = manifest.parent if manifest.suffix else manifest
    data = fold_rows(df, fold, cfg)
    data_sha = fold_data_digest(data)
    state = load_state(out_dir / STATE_NAME, cfg, data_sha)
    if state is not None and state.progress.finished and (out_dir / "result.json").is_file():
        done = _already_trained(out_dir, fold, state)
        if done is not None:
            return done
        state = None
    runner = EpochRunner(cfg, device, data, root, df, state)
    log.info("fold %d: backbone %s: %s", fold, cfg.arch, runner.init.words)
    progress = state.progress if state is not None else Progress()
    partial = state.partial if state is not None else None
    start_epoch = progress.epoch + 1
    if state is not None:
        at = f", batch {partial.step}" if partial else ""
        log.info("fold %d: resuming at epoch %d%s from %s", fold, start_epoch, at, out_dir / STATE_NAME)
    tags = {"digilut.fold": str(fold), "digilut.manifest": str(manifest)}
    tags |= {"digilut.init": runner.init.label, "digilut.init_words": runner.init.words}
    fold_log = FoldLogger(
        out_dir,
        fold,
        tracker or Tracker(TrackingConfig()),
        parent=parent,
        run_id=state.mlflow_run_id if state is not None else None,
        tags=tags,
        purge_step=start_epoch * runner.steps_per_epoch + (partial.step if partial else 0),
    )
    fold_log.log_params(_params(cfg, fold, data, device, runner))
    fold_log.open_events()
    _log_plan(fold, cfg, data, device, runner)
    run = _FoldRun(fold, out_dir, cfg, data_sha, runner, progress, fold_log, on_checkpoint)
    try:
        with sigterm_saves_state(handle_sigterm) as stop:
            run.epochs(start_epoch, partial, stop, max_epochs_this_run)
    except TrainingInterrupted:
        fold_log.end("KILLED")
        raise
    except BaseException:
        fold_log.end("FAILED")
        raise
    fold_log.close()
    if progress.best_epoch < 0:
        raise DigilutError(f"fold {fold}: no epoch finished (max_epochs_this_run={max_epochs_this_run})")
    result = run.result(device, time.perf_counter() - t_start)
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
    if progress.finished:
        fold_log.finish(progress.best_auroc, progress.best_epoch)
    return result


def _already_trained(out_dir: Path, fold: int, state: TrainState) -> FoldResult | None:
    """The finished fold's result when ``model.pt`` still has the content it recorded, else None."""
    done = FoldResult.load(out_dir / "result.json")
    model = out_dir / done.model_file
    if model.is_file() and done.model_sha256 in ("", file_sha256(model)):
        log.info("fold %d: already trained in %s (best epoch %d)", fold, out_dir, state.progress.best_epoch)
        return done
    log.warning("fold %d: %s is missing or changed since training (hash differs): retraining", fold, model)
    return None


def _params(
    cfg: TrainConfig, fold: int, data: FoldData, device: torch.device, runner: EpochRunner
) -> dict[str, object]:
    return {
        **cfg.fingerprint(),
        "fold": fold,
        "train_patches": len(data.train),
        "val_patches": len(data.val),
        "val_positives": int(data.val["label"].sum()),
        "device": str(device),
        **runner.init.tracking_params(),
    }


def _log_plan(fold: int, cfg: TrainConfig, data: FoldData, device: torch.device, runner: EpochRunner) -> None:
    n_val_pos = int(data.val["label"].sum())
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
        runner.steps_per_epoch,
        device,
        runner.use_amp,
        runner.channels_last,
    )
    if n_val_pos in (0, len(data.val)):
        log.warning(
            "fold %d: validation has a single class: AUROC undefined, selecting on validation loss", fold
        )


class _FoldRun:
    """The epochs of one :func:`train_fold` call: each one's checkpoint, best model and OOF."""

    def __init__(
        self,
        fold: int,
        out_dir: Path,
        cfg: TrainConfig,
        data_sha: str,
        runner: EpochRunner,
        progress: Progress,
        fold_log: FoldLogger,
        on_checkpoint: Callable[[Path], None] | None,
    ) -> None:
        self.fold, self.out_dir, self.cfg, self.data_sha = fold, out_dir, cfg, data_sha
        self.runner, self.progress, self.fold_log = runner, progress, fold_log
        self.on_checkpoint = on_checkpoint
        self.state_path = out_dir / STATE_NAME

    def epochs(self, start: int, partial: MidEpoch | None, stop: StopRequest, max_epochs: int | None) -> None:
        """Train from epoch ``start`` (mid-epoch from ``partial``) until the last epoch, an early
        stop, ``max_epochs`` epochs or SIGTERM (:class:`TrainingInterrupted`, after saving)."""
        cfg, fold, progress = self.cfg, self.fold, self.progress
        for epoch in range(start, cfg.epochs):
            if progress.finished or (max_epochs is not None and epoch - start >= max_epochs):
                break
            outcome = self.runner.run_epoch(epoch, partial, stop, self.fold_log, first=epoch == start)
            partial = None
            if isinstance(outcome, MidEpoch):
                self.checkpoint(outcome)
                raise TrainingInterrupted(
                    f"fold {fold}: SIGTERM at epoch {epoch}, batch {outcome.step}; state saved to "
                    f"{self.state_path} {time.monotonic() - stop.at:.1f}s after the signal; "
                    "run again to resume"
                )
            self.finish_epoch(outcome.row, outcome.probs)
            if stop.signal is not None and not progress.finished:  # signalled during validation
                raise TrainingInterrupted(
                    f"fold {fold}: SIGTERM during epoch {epoch}; state saved to {self.state_path} after it; "
                    "run again to resume"
                )
            if progress.early_stop(cfg.patience):
                log.info(
                    "fold %d: no better AUROC for %d epochs: early stop at epoch %d",
                    fold,
                    cfg.patience,
                    epoch,
                )
                break

    def finish_epoch(self, row: dict[str, float], probs: np.ndarray) -> None:
        """Record a finished epoch: metrics, the model and OOF when best, the checkpoint."""
        epoch, fold = int(row["epoch"]), self.fold
        self.fold_log.epoch(row)
        improved = self.progress.record(row, self.cfg.patience, self.cfg.epochs)
        if improved:
            init = self.runner.init
            meta = {"fold": fold, "epoch": epoch, "val_auroc": row["val_auroc"], "val_loss": row["val_loss"]}
            meta |= {
                "config": json.dumps(self.cfg.fingerprint()),
                "init": init.label,
                "init_words": init.words,
            }
            save_model(self.out_dir / "model.pt", self.runner.model, meta)
            val = self.runner.data.val
            write_manifest(val.assign(prob=probs, oof_fold=fold), self.out_dir / "oof.parquet")
        log.info(
            "fold %d epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f%s; %.0f img/s, %.0fs",
            fold,
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_auroc"],
            " (best)" if improved else "",
            row["train_images_per_s"],
            row["epoch_s"],
        )
        self.checkpoint(None)

    def checkpoint(self, partial: MidEpoch | None) -> None:
        """Save the full state (after the last finished epoch, or mid-epoch at ``partial``), copy the
        events, and call ``on_checkpoint``."""
        state = TrainState(
            config=self.cfg.fingerprint(),
            data_sha256=self.data_sha,
            init=self.runner.init.to_dict(),
            progress=self.progress,
            partial=partial,
            **self.runner.state_dicts(),
            rng=torch.get_rng_state(),
            cuda_rng=cuda_rng_state(self.runner.device),
            mlflow_run_id=self.fold_log.run_id_for_checkpoint(),
        )
        save_state(self.state_path, state)
        self.fold_log.publish()
        if self.on_checkpoint:
            self.on_checkpoint(self.out_dir)

    def result(self, device: torch.device, seconds: float) -> FoldResult:
        p, data, readers = (
            self.progress,
            self.runner.data,
            (self.runner.train_set.reader, self.runner.val_set.reader),
        )
        return FoldResult(
            fold=self.fold,
            best_epoch=p.best_epoch,
            best_val_auroc=p.best_auroc,
            best_val_loss=p.best_loss,
            epochs_run=len(p.history),
            finished=p.finished,
            stopped_early=p.finished and p.epoch < self.cfg.epochs - 1,
            train_patches=len(data.train),
            val_patches=len(data.val),
            val_positives=int(data.val["label"].sum()),
            seconds=seconds,
            device=str(device),
            mlflow_run_id=self.fold_log.run_id,
            config=self.cfg.fingerprint(),
            history=p.history,
            model_sha256=file_sha256(self.out_dir / "model.pt"),
            data_sha256=self.data_sha,
            patch_bytes_fetched=sum(r.stats.bytes for r in readers),
            patch_requests=sum(r.stats.requests for r in readers),
            patch_local_hits=sum(r.stats.hits for r in readers),
            init=self.runner.init.to_dict(),
        )
