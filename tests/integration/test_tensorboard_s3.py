"""TensorBoard over S3: a fold trained against the local S3 server copies its event files to
``<logdir>/<run>/fold<k>`` after every epoch, and a real ``tensorboard --logdir s3://…`` (reading
through boto3, as the TensorBoard Deployment does) serves the run and its scalars over HTTP."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from digilut.ops.process import HOST, Service, free_ports
from digilut.ops.s3_server import S3Server
from digilut.s3config import S3Config
from digilut.storage import list_objects
from digilut.tracking import Tracker, TrackingConfig
from digilut.train import TrainConfig, train_fold
from tests.unit.patch_fixtures import make_patch_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY = TrainConfig(
    input_px=64, epochs=2, train_batch_size=16, num_workers=0, weights="none", hidden_units=32, lr=1e-3
)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _tensorboard(logdir: str, s3: S3Config, log_path: Path) -> tuple[Service, str]:
    """``tensorboard --logdir s3://…`` on loopback, in its own process group."""
    port = free_ports(1)[0]
    env = {
        **os.environ,
        "S3_ENDPOINT": s3.endpoint_url or "",
        "AWS_ACCESS_KEY_ID": s3.access_key_id or "",
        "AWS_SECRET_ACCESS_KEY": s3.secret_access_key or "",
        "AWS_REGION": s3.region,
        "AWS_DEFAULT_REGION": s3.region,
    }
    tb = Service(log_path)
    tb.name = "tensorboard"
    argv = [str(Path(sys.executable).parent / "tensorboard"), "--logdir", logdir, "--host", HOST]
    tb.launch([*argv, "--port", str(port), "--load_fast=false", "--reload_interval=1"], env)
    return tb, f"http://{HOST}:{port}"


def test_fold_events_reach_s3_after_each_epoch_and_tensorboard_serves_them(
    s3_server: S3Server, s3_env: S3Config, s3_prefix: str, tmp_path: Path
) -> None:
    manifest = make_patch_manifest(tmp_path / "data", patients=5, grid=5, px=64, folds=2)
    logdir = f"s3://{s3_env.bucket}/{s3_prefix}/tensorboard"
    tracking = TrackingConfig(tensorboard_logdir=logdir, tensorboard_run="run-a")
    events_prefix = f"{s3_prefix}/tensorboard/run-a/fold1/"
    cpu = torch.device("cpu")

    seen: list[dict[str, int]] = []  # the event objects in S3 each time an epoch's state is saved

    def at_checkpoint(_: Path) -> None:
        seen.append({o.key: o.size for o in list_objects(s3_env, events_prefix)})

    with Tracker(tracking) as tracker:  # MLflow off: the logdir is all that is configured
        first = train_fold(
            manifest, 1, tmp_path / "fold1", TINY, cpu, tracker=tracker, max_epochs_this_run=1,
            on_checkpoint=at_checkpoint,
        )  # fmt: skip
    assert not first.finished and len(seen) == 2  # after epoch 0, after result.json
    ((key, size),) = seen[0].items()  # already there after epoch 0, while the fold is still running
    assert key.split("/")[-1].startswith("events.out.tfevents.") and size > 0
    with Tracker(tracking) as tracker:  # a new pod resumes the fold: a second event file
        result = train_fold(
            manifest, 1, tmp_path / "fold1", TINY, cpu, tracker=tracker, on_checkpoint=at_checkpoint
        )
    assert result.finished and len(seen[2]) == 2 and key in seen[2]  # seen[2]: after epoch 1

    tb, url = _tensorboard(logdir, s3_env, tmp_path / "tensorboard.log")
    try:
        # TensorBoard loads the two event files one after the other: wait until it has read both
        # epochs' points (the first file alone already shows the tag).
        q = urllib.parse.urlencode({"run": "run-a/fold1", "tag": "epoch/val_auroc"})
        deadline, tags, points = time.monotonic() + 120, {}, []
        while time.monotonic() < deadline:
            assert tb.running(), tb.log_tail()
            try:
                tags = _get(f"{url}/data/plugin/scalars/tags")
                if "epoch/val_auroc" in tags.get("run-a/fold1", {}):
                    points = _get(f"{url}/data/plugin/scalars/scalars?{q}")
            except (urllib.error.URLError, ConnectionError):
                tags = {}
            if len(points) >= 2:
                break
            time.sleep(1)
        assert "run-a/fold1" in _get(f"{url}/data/runs"), tb.log_tail()
        assert {"epoch/val_auroc", "epoch/train_loss", "train/loss_step"} <= set(tags["run-a/fold1"])
        assert [p[1] for p in points] == [0, 1]
        assert [p[2] for p in points] == pytest.approx([h["val_auroc"] for h in result.history])
    finally:
        tb.stop()
    assert tb.pids() == []
