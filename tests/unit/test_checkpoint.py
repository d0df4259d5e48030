"""A fold's training state: early-stopping bookkeeping, last.pt saved and refused, SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from digilut.checkpoint import (
    MidEpoch,
    Progress,
    TrainState,
    load_state,
    save_state,
    sigterm_saves_state,
)
from digilut.train_config import TrainConfig

CFG = TrainConfig(epochs=10, patience=2)


def _row(epoch: int, auroc: float, loss: float) -> dict[str, float]:
    return {"epoch": epoch, "val_auroc": auroc, "val_loss": loss}


def test_progress_keeps_the_best_auroc_and_stops_after_patience_epochs() -> None:
    p = Progress()
    assert p.record(_row(0, 0.6, 1.0), patience=2, epochs=10)
    assert not p.record(_row(1, 0.5, 0.5), patience=2, epochs=10)  # lower loss, lower AUROC
    assert (p.best_epoch, p.bad_epochs, p.finished) == (0, 1, False)
    assert not p.record(_row(2, 0.6, 0.4), patience=2, epochs=10)  # an equal AUROC is no better
    assert p.finished and p.early_stop(2) and p.epoch == 2 and len(p.history) == 3


def test_progress_selects_on_loss_while_auroc_is_undefined_and_ends_at_the_last_epoch() -> None:
    p = Progress()
    assert p.record(_row(0, math.nan, 1.0), patience=5, epochs=3)
    assert p.record(_row(1, math.nan, 0.9), patience=5, epochs=3)
    assert not p.record(_row(2, math.nan, 0.95), patience=5, epochs=3)
    assert p.best_epoch == 1 and p.best_loss == 0.9 and p.finished and not p.early_stop(5)


def _state(data_sha: str = "rows-a") -> TrainState:
    progress = Progress()
    progress.record(_row(0, 0.7, 0.5), patience=2, epochs=10)
    mid = MidEpoch(1, 3, 1.5, 48, torch.Generator().get_state(), torch.get_rng_state())
    weights = {"w": torch.arange(4.0)}
    return TrainState(
        CFG.fingerprint(),
        data_sha,
        None,
        progress,
        mid,
        weights,
        {},
        {},
        {},
        torch.get_rng_state(),
        None,
        "run-1",
    )


def test_a_saved_state_loads_back_with_its_progress_and_mid_epoch_position(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_state(path, _state())
    raw = torch.load(path, weights_only=True)  # the file stays a flat dict of plain values
    assert raw["epoch"] == 0 and raw["partial"]["step"] == 3 and raw["mlflow_run_id"] == "run-1"
    state = load_state(path, CFG, "rows-a")
    assert state is not None and state.partial is not None
    assert (state.partial.epoch, state.partial.step, state.partial.seen) == (1, 3, 48)
    assert state.progress.best_epoch == 0 and state.progress.history == [_row(0, 0.7, 0.5)]
    assert torch.equal(state.model["w"], torch.arange(4.0)) and state.mlflow_run_id == "run-1"


def test_a_state_for_other_settings_rows_or_no_state_at_all_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "last.pt"
    assert load_state(path, CFG, "rows-a") is None  # absent: training starts, nothing to say
    save_state(path, _state())
    with caplog.at_level(logging.WARNING, logger="digilut.checkpoint"):
        assert load_state(path, dataclasses.replace(CFG, lr=1e-3), "rows-a") is None
        assert load_state(path, CFG, "rows-b") is None
        torch.save({"weights": 1}, path)
        assert load_state(path, CFG, "rows-a") is None
        path.write_bytes(b"not a checkpoint")
        assert load_state(path, CFG, "rows-a") is None
    text = caplog.text
    assert "other settings (lr)" in text and "other rows" in text
    assert "not a digilut training state" in text and "unreadable" in text


def test_sigterm_is_a_request_while_armed_and_the_previous_handler_comes_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_saves_state(True) as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread before kill returns
        assert stop.signal == signal.SIGTERM and stop.at > 0
    assert signal.getsignal(signal.SIGTERM) is before
    with sigterm_saves_state(False):
        assert signal.getsignal(signal.SIGTERM) is before  # off: nothing installed
