"""A fold's training state (``last.pt``): what it holds, saving and loading it, and SIGTERM.

:class:`TrainState` is everything a fold needs to continue exactly where it stopped: weights,
optimiser, scheduler and scaler states, the CPU and CUDA RNG states, the :class:`Progress`
(history, best epoch, early-stopping count), the MLflow run id and, for a state saved mid-epoch
on SIGTERM, the :class:`MidEpoch` position (batch, running loss, augmentation generator). On disk
it is one ``torch.save`` dict of plain values and tensors (loadable with ``weights_only=True``),
written atomically.

:func:`load_state` returns ``None`` (training starts from scratch, said in the log) for a file
that is unreadable, not a training state, made with other settings or on other rows.
:func:`sigterm_saves_state` turns SIGTERM into a request the training loop answers at the next
batch boundary.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from digilut.files import atomic_write
from digilut.train_config import TrainConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "digilut-train-state/1"
STATE_NAME = "last.pt"
SIGTERM_ARMED = "SIGTERM now saves a checkpoint at the next batch boundary"


@dataclass
class Progress:
    """Where a fold's training stands: the finished epochs and the early-stopping bookkeeping."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_auroc: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch: int = -1  # the last finished epoch
    finished: bool = False

    def record(self, row: Mapping[str, float], patience: int, epochs: int) -> bool:
        """Add a finished epoch's ``row`` (epoch, val_auroc, val_loss…); whether it is the best so
        far (higher AUROC; lower loss while AUROC is undefined). Sets ``finished`` when this was
        the last epoch or ``patience`` epochs passed without improvement."""
        auroc, val_loss, epoch = row["val_auroc"], row["val_loss"], int(row["epoch"])
        self.history.append(dict(row))
        if math.isfinite(auroc):
            improved = auroc > self.best_auroc
        else:
            improved = self.best_epoch < 0 or val_loss < self.best_loss
        if improved:
            self.best_auroc, self.best_loss, self.best_epoch, self.bad_epochs = auroc, val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch
        self.finished = self.early_stop(patience) or epoch == epochs - 1
        return improved

    def early_stop(self, patience: int) -> bool:
        return self.bad_epochs >= patience


@dataclass
class MidEpoch:
    """The position inside an epoch a SIGTERM interrupted: the batches done and the RNG states
    after the last of them, so that a resumed run draws what an uninterrupted one would."""

    epoch: int
    step: int  # batches done
    loss_sum: float
    seen: int
    generator: torch.Tensor  # the augmentation generator's state
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None = None


@dataclass
class TrainState:
    """The full state of a fold's training (see the module docstring)."""

    config: dict[str, Any]  # TrainConfig.fingerprint()
    data_sha256: str | None  # fold_data_digest of the rows (None: a state from before it was kept)
    init: dict[str, Any] | None  # BackboneInit.to_dict() of what the first epoch started from
    progress: Progress
    partial: MidEpoch | None
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    mlflow_run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """The file's dict (flat, as it has always been written)."""
        d: dict[str, Any] = {"format": STATE_FORMAT}
        for f in fields(self):
            if f.name != "progress":
                d[f.name] = getattr(self, f.name)
        d["partial"] = (
            None
            if self.partial is None
            else {f.name: getattr(self.partial, f.name) for f in fields(MidEpoch)}
        )
        p = self.progress
        d.update(
            epoch=p.epoch,
            finished=p.finished,
            history=p.history,
            best_auroc=p.best_auroc,
            best_loss=p.best_loss,
            best_epoch=p.best_epoch,
            bad_epochs=p.bad_epochs,
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        progress = Progress(
            list(d["history"]),
            d["best_auroc"],
            d["best_loss"],
            d["best_epoch"],
            d["bad_epochs"],
            d["epoch"],
            d["finished"],
        )
        partial = d.get("partial")
        return cls(
            config=d["config"],
            data_sha256=d.get("data_sha256"),
            init=d.get("init"),
            progress=progress,
            partial=MidEpoch(**{k: partial.get(k) for k in (f.name for f in fields(MidEpoch))})
            if partial
            else None,
            model=d["model"],
            optimizer=d["optimizer"],
            scheduler=d["scheduler"],
            scaler=d["scaler"],
            rng=d["rng"],
            cuda_rng=d.get("cuda_rng"),
            mlflow_run_id=d.get("mlflow_run_id"),
        )


def save_state(path: Path, state: TrainState) -> None:
    """Write ``state`` to ``path`` atomically (a reader sees the old file or the new one)."""
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    atomic_write(path, [buf.getvalue()])


def load_state(path: Path, cfg: TrainConfig, data_sha256: str) -> TrainState | None:
    """The state in ``path`` if it was saved with ``cfg``'s settings on the rows ``data_sha256``;
    ``None`` (with the reason in the log) when absent, unreadable or made for other settings/rows."""
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        log.warning("%s unreadable (%s): training from scratch", path, err)
        return None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        log.warning("%s is not a digilut training state: training from scratch", path)
        return None
    if raw["config"] != cfg.fingerprint():
        changed = sorted(k for k, v in cfg.fingerprint().items() if raw["config"].get(k) != v)
        log.warning(
            "%s was trained with other settings (%s): training from scratch", path, ", ".join(changed)
        )
        return None
    state = TrainState.from_dict(raw)
    if state.data_sha256 not in (None, data_sha256):
        log.warning("%s was trained on other rows (the manifest changed): training from scratch", path)
        return None
    return state


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator's state (dropout draws on the GPU from it), or None on the CPU."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng(saved: torch.Tensor | None, device: torch.device) -> None:
    """Restore a state from :func:`cuda_rng_state`, so that a fold resumed on a GPU draws the same
    dropout masks as an uninterrupted run."""
    if device.type == "cuda" and saved is not None:
        torch.cuda.set_rng_state(saved, device)


class StopRequest:
    """Set by SIGTERM; the training loop checks it at every batch boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.at = 0.0


@contextmanager
def sigterm_saves_state(enabled: bool) -> Iterator[StopRequest]:
    """While training, SIGTERM (Kubernetes deleting the pod, ``kill``) requests a checkpoint at the
    next batch boundary instead of killing the process; the previous handler is restored after.
    Only the main thread can install handlers: elsewhere this is a no-op."""
    stop = StopRequest()
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
