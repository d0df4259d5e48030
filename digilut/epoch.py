"""One epoch of a fold's training: the model, optimiser and schedule, a training pass that can stop
and resume at any batch boundary, and the validation pass.

:class:`EpochRunner` is built from the fold's rows and, when resuming, a
:class:`~digilut.checkpoint.TrainState` (weights, optimiser, scheduler, scaler and RNG states are
restored). :meth:`EpochRunner.train_epoch` draws the epoch's samples and augmentations from
generators seeded by ``(seed, epoch)``, so an epoch resumed mid-way sees the same batches as an
uninterrupted one; on a SIGTERM request it returns the :class:`~digilut.checkpoint.MidEpoch`
position instead of finishing. AMP (bf16) and channels-last are used on CUDA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from digilut.checkpoint import MidEpoch, StopRequest, TrainState, cuda_rng_state, restore_cuda_rng
from digilut.cpus import available_cpus
from digilut.data import PatchDataset, make_loader, make_sampler
from digilut.fold_data import FoldData
from digilut.fold_log import FoldLogger
from digilut.model import PatchClassifier, build_model
from digilut.predict import amp_dtype, safe_auroc
from digilut.train_config import TrainConfig
from digilut.transforms import to_model_input
from digilut.weights import BackboneInit


def training_loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The training loss: focal, or BCE with ``pos_weight``, as ``cfg.loss`` says."""
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


def _prepare_torch(cfg: TrainConfig, device: torch.device) -> None:
    """Seed torch and size its CPU thread pool for this fold."""
    torch.manual_seed(cfg.seed)
    if device.type == "cpu" and cfg.cpu_threads:
        # Folds that share a machine's cores (kfp.local runs them side by side) must not each
        # start one OpenMP thread per core: oversubscribed, they ran 10× slower here.
        torch.set_num_threads(cfg.cpu_threads)
    elif device.type == "cpu" and torch.get_num_threads() > (cpus := available_cpus()):
        torch.set_num_threads(cpus)  # torch's default is the node's cores, not the pod's CPU limit
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _model(
    cfg: TrainConfig, device: torch.device, state: TrainState | None
) -> tuple[PatchClassifier, BackboneInit]:
    """A new model, or (resumed) one whose weights the state will fill and the record of what its
    first epoch started from."""
    if state is not None and state.init is not None:
        return PatchClassifier(cfg.model_spec()).to(device), BackboneInit.from_dict(state.init)
    model = build_model(cfg.model_spec(), cfg.weights).to(device)
    return model, model.init


@dataclass(frozen=True)
class EpochDone:
    """A finished epoch: its history ``row`` and the validation probabilities (row order)."""

    row: dict[str, float]
    probs: np.ndarray


class EpochRunner:
    """A fold's model, optimiser, schedule and datasets (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        data: FoldData,
        root: str | Path,
        manifest: pd.DataFrame,
        state: TrainState | None,
    ) -> None:
        self.cfg, self.device, self.data = cfg, device, data
        _prepare_torch(cfg, device)
        self.use_cuda = device.type == "cuda"
        self.use_amp = cfg.amp and self.use_cuda
        self.channels_last = cfg.channels_last and self.use_cuda
        self.model, self.init = _model(cfg, device, state)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.compile and self.use_cuda else self.model
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
        )
        self.per_epoch = cfg.patches_per_epoch or len(data.train)
        self.drop_last = self.per_epoch > cfg.train_batch_size
        self.steps_per_epoch = self.per_epoch // cfg.train_batch_size if self.drop_last else 1
        self.sched: Any
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.LambdaLR(
                self.opt, _cosine(cfg.epochs * self.steps_per_epoch)
            )
        else:
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.opt, mode="max", factor=0.5, patience=1
            )
        fp16 = self.use_amp and amp_dtype(device) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        if state is not None:
            self._restore(state)
        self.train_set = PatchDataset(root, data.train, augment=True, seed=cfg.seed)
        self.val_set = PatchDataset(root, data.val, augment=False)
        self.stain_train: torch.Tensor | None = None
        self.stain_val: torch.Tensor | None = None
        if cfg.stain_norm != "none":  # fitted on every patch row of the fold's slides, as predict does
            from digilut.data import slide_stain_stats
            from digilut.stain import row_stain_stats

            slides = set(data.train["slide"]) | set(data.val["slide"])
            fitted = slide_stain_stats(root, manifest[manifest["slide"].isin(slides)], cfg.stain_norm)
            self.stain_train = row_stain_stats(data.train, fitted, cfg.stain_norm)
            self.stain_val = row_stain_stats(data.val, fitted, cfg.stain_norm)

    def _restore(self, state: TrainState) -> None:
        self.model.load_state_dict(state.model)
        self.opt.load_state_dict(state.optimizer)
        self.sched.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        torch.set_rng_state(state.rng)
        restore_cuda_rng(state.cuda_rng, self.device)

    def state_dicts(self) -> dict[str, Any]:
        """The model, optimizer, scheduler and scaler states (a :class:`TrainState`'s fields)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def run_epoch(
        self, epoch: int, partial: MidEpoch | None, stop: StopRequest, fold_log: FoldLogger, first: bool
    ) -> EpochDone | MidEpoch:
        """Train epoch ``epoch`` (from ``partial``'s batch when given) and validate, or where SIGTERM
        stopped it; ``first``: the first epoch of this call (its first batch goes to TensorBoard)."""
        t0 = time.perf_counter()
        done = self._train(epoch, partial, stop, fold_log, first)
        if isinstance(done, MidEpoch):
            return done
        loss_sum, seen = done
        train_s = time.perf_counter() - t0
        probs, val_loss = self._validate()
        auroc = safe_auroc(self.data.val["label"].to_numpy(), probs)
        if self.cfg.schedule == "plateau":
            self.sched.step(auroc if math.isfinite(auroc) else -val_loss)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "val_loss": val_loss,
            "val_auroc": auroc,
            "lr": self.lr,
            "train_images_per_s": seen / max(train_s, 1e-9),
            "epoch_s": time.perf_counter() - t0,
        }
        return EpochDone(row, probs)

    def _train(
        self, epoch: int, partial: MidEpoch | None, stop: StopRequest, fold_log: FoldLogger, first: bool
    ) -> tuple[float, int] | MidEpoch:
        """The training pass: (loss sum, patches seen), or the position where SIGTERM stopped it."""
        cfg = self.cfg
        self.model.train()
        self.train_set.set_epoch(epoch)
        sampler: Any = make_sampler(
            self.train_set.labels, cfg.sampler, num_samples=self.per_epoch, seed=cfg.seed, epoch=epoch
        )
        gen = torch.Generator(self.device).manual_seed(_seed_for(cfg.seed, epoch, 17))
        loss_sum, seen, first_step = 0.0, 0, 0
        if partial is not None:  # resume mid-epoch: the same rows, minus the batches done
            first_step, loss_sum, seen = partial.step, partial.loss_sum, partial.seen
            sampler = list(sampler)[first_step * cfg.train_batch_size :]
            gen.set_state(partial.generator)
        loader = make_loader(
            self.train_set,
            sampler,
            batch_size=cfg.train_batch_size,
            num_workers=cfg.num_workers,
            pin_memory=self.use_cuda,
            drop_last=self.drop_last,
        )
        batches = iter(loader)  # draws the loader's base seed from the global RNG
        if partial is not None:
            torch.set_rng_state(partial.rng)  # as it was after the last batch done
            restore_cuda_rng(partial.cuda_rng, self.device)
        augment = cfg.colour_augment()
        for step, batch in enumerate(batches, start=first_step):
            x = to_model_input(
                batch.images,
                self.device,
                input_px=cfg.input_px,
                channels_last=self.channels_last,
                augment=augment,
                generator=gen,
                stain=None if self.stain_train is None else self.stain_train[batch.index],
                stain_norm=cfg.stain_norm,
            )
            loss = self._step(x, batch.labels.to(self.device, non_blocking=True))
            loss_sum += loss * len(batch.labels)
            seen += len(batch.labels)
            if step % cfg.log_every_steps == 0:
                fold_log.step(epoch * self.steps_per_epoch + step, loss, self.lr)
            if step == 0 and first:
                fold_log.patches(x, batch.labels, epoch)
            if stop.signal is not None:
                rng, cuda_rng = torch.get_rng_state(), cuda_rng_state(self.device)
                return MidEpoch(epoch, step + 1, loss_sum, seen, gen.get_state(), rng, cuda_rng)
        return loss_sum, seen

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step on a batch; its loss."""
        with torch.autocast(self.device.type, dtype=amp_dtype(self.device), enabled=self.use_amp):
            logits = self.forward(x)
        loss = training_loss(logits.float(), y, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.cfg.schedule == "cosine":
            self.sched.step()
        return float(loss.detach())

    @torch.no_grad()
    def _validate(self) -> tuple[np.ndarray, float]:
        """Validation probabilities (row order) and mean BCE loss."""
        self.forward.eval()
        n = len(self.val_set)
        loader = make_loader(
            self.val_set,
            make_sampler(self.val_set.labels, "sequential"),
            batch_size=self.cfg.train_batch_size * 2,
            num_workers=self.cfg.num_workers,
            pin_memory=self.use_cuda,
        )
        probs = np.zeros(n, np.float32)
        loss_sum = 0.0
        for batch in loader:
            x = to_model_input(
                batch.images,
                self.device,
                input_px=self.cfg.input_px,
                channels_last=self.channels_last,
                stain=None if self.stain_val is None else self.stain_val[batch.index],
                stain_norm=self.cfg.stain_norm,
            )
            y = batch.labels.to(self.device)
            with torch.autocast(self.device.type, dtype=amp_dtype(self.device), enabled=self.use_amp):
                logits = self.forward(x)
            logits = logits.float()
            loss_sum += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
            probs[batch.index.numpy()] = torch.sigmoid(logits).cpu().numpy()
        return probs, loss_sum / max(n, 1)
