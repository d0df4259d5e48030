"""What a fold's training reports as it goes: TensorBoard event files and its MLflow child run.

:class:`FoldLogger` opens (or, with a run id from a checkpoint, resumes) the fold's MLflow run,
writes the TensorBoard events (step loss and learning rate, per-epoch metrics, a grid of training
patches) into ``<fold folder>/tensorboard`` and copies them with :func:`sync_events` to the
tracking config's ``tensorboard_dir`` (a folder or ``s3://`` prefix where the TensorBoard server
reads). Neither may stop training: MLflow calls are queued by :class:`~digilut.tracking.Tracker`
and a failed copy is logged.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from digilut.errors import DigilutError
from digilut.registry import log_model
from digilut.tracking import RunHandle, Tracker
from digilut.transforms import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

EPOCH_SCALARS = ("train_loss", "val_loss", "val_auroc", "lr", "train_images_per_s")


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


def patch_grid(x: torch.Tensor, labels: torch.Tensor, n: int = 32) -> torch.Tensor:
    """De-normalised model inputs with a red (lesion) or green (no lesion) border, as one image."""
    from torchvision.utils import make_grid

    x = x[:n].detach().float().cpu()
    x = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    x = F.pad(x.clamp(0, 1), (3, 3, 3, 3))
    colour = torch.where(labels[:n].view(-1, 1) > 0.5, torch.tensor([1.0, 0, 0]), torch.tensor([0, 0.8, 0]))
    border = torch.ones_like(x[:, :1], dtype=torch.bool)
    border[..., 3:-3, 3:-3] = False
    x = torch.where(border, colour.view(-1, 3, 1, 1), x)
    return make_grid(x, nrow=8, padding=2)


class FoldLogger:
    """One fold's TensorBoard writer and MLflow child run (see the module docstring).

    ``run_id`` (from a checkpoint) resumes that MLflow run; ``purge_step`` (the global step a
    resumed run starts at) makes TensorBoard drop the events written after the checkpoint.
    """

    def __init__(
        self,
        out_dir: Path,
        fold: int,
        tracker: Tracker,
        *,
        parent: RunHandle | None,
        run_id: str | None,
        tags: Mapping[str, str],
        purge_step: int,
    ) -> None:
        self.fold = fold
        self.out_dir = out_dir
        self.tracker = tracker
        self.run = tracker.start_run(f"fold{fold}", parent=parent, run_id=run_id, tags=tags)
        self._resumed_id = run_id
        self._waited = False
        self._parent_id = parent.run_id if parent else None
        self._purge_step = purge_step
        self._writer: Any = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker.log_params(self.run, params)

    def open_events(self) -> None:
        """Create the TensorBoard writer and say where its events are copied."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.events_dir), purge_step=self._purge_step or None)
        self.events_dest = self.tracker.cfg.tensorboard_dir(self.fold, self._parent_id)
        if self.events_dest:
            log.info("fold %d: TensorBoard events go to %s", self.fold, self.events_dest)

    @property
    def events_dir(self) -> Path:
        return self.out_dir / "tensorboard"

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or the resumed one while the tracker has not confirmed it yet."""
        return self.run.run_id or self._resumed_id

    def run_id_for_checkpoint(self) -> str | None:
        """The run id to save in a checkpoint (so that a resume continues the run): waits for the
        run to be created, at most 5 s and once (a server that is down must not slow every epoch)."""
        if self.run.run_id is None and self.tracker.enabled and not self._waited:
            self._waited = True
            self.run.wait(5.0)
        return self.run_id

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self._writer.add_scalar("train/loss_step", loss, global_step)
        self._writer.add_scalar("train/lr", lr, global_step)

    def patches(self, x: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
        self._writer.add_image("patches/train (red border = lesion)", patch_grid(x, labels), epoch)

    def epoch(self, row: Mapping[str, float]) -> None:
        """An epoch's metrics: TensorBoard (finite values) and MLflow, at step ``row["epoch"]``."""
        epoch = int(row["epoch"])
        for key in EPOCH_SCALARS:
            if math.isfinite(row[key]):
                self._writer.add_scalar(f"epoch/{key}", row[key], epoch)
        self._writer.flush()
        self.tracker.log_metrics(self.run, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def publish(self) -> None:
        """Flush the events and copy them to the TensorBoard logdir (after every checkpoint)."""
        self._writer.flush()
        sync_events(self.events_dir, self.events_dest)

    def end(self, status: str) -> None:
        """Training failed or was interrupted: end the MLflow run with ``status``."""
        self.tracker.end_run(self.run, status)
        if self._writer is not None:
            self._writer.close()

    def close(self) -> None:
        """Training stopped (finished or time-sliced): close the events and copy them once more."""
        self._writer.close()
        sync_events(self.events_dir, self.events_dest)

    def finish(self, best_auroc: float, best_epoch: int) -> None:
        """The fold is finished: its best figures, model, OOF predictions and result to MLflow."""
        self.tracker.log_metrics(
            self.run, {"best_val_auroc": best_auroc, "best_epoch": best_epoch}, step=best_epoch
        )
        log_model(self.tracker, self.run, self.out_dir / "model.pt")
        self.tracker.log_artifacts(self.run, self.out_dir / "oof.parquet")
        self.tracker.log_artifacts(self.run, self.out_dir / "result.json")
        self.tracker.end_run(self.run, "FINISHED")
