"""Step ``train_fold``: one cross-validation fold, checkpointed where a new pod finds it (S3)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from digilut.locations import publish_results
from digilut.manifest import (
    MANIFEST_NAME,
    read_manifest,
    shard_store,
)
from digilut.tracking import Tracker, TrackingConfig
from digilut.train_config import FoldResult, TrainConfig

log = logging.getLogger(__name__)


def checkpoint_location(checkpoint_uri: str, manifest: Path, fold: int, cfg: TrainConfig) -> str:
    """Where fold ``fold`` keeps its checkpoints under ``checkpoint_uri`` (a folder or ``s3://``
    prefix): ``fold<k>-<key>``, the key hashing the fold's rows and the training settings — so a
    re-run of the same pipeline (a new pod, a new run) finds it, and another dataset or config does not."""
    from digilut.fold_data import fold_data_digest, fold_rows

    data = fold_rows(read_manifest(manifest), fold, cfg)
    key = hashlib.sha256(
        (fold_data_digest(data) + json.dumps(cfg.fingerprint(), sort_keys=True)).encode()
    ).hexdigest()[:16]
    return f"{checkpoint_uri.rstrip('/')}/fold{fold}-{key}"


def _restore_checkpoint(where: str, model_dir: Path) -> bool:
    """Copy a fold's checkpoint folder ``where`` (folder or ``s3://``) into ``model_dir``; False if none."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if where.startswith("s3://"):
        from digilut.locations import s3_target
        from digilut.storage import download_prefix

        s3, prefix = s3_target(where)
        done = download_prefix(s3, prefix, model_dir)
        return bool(done.transferred or done.skipped)
    if Path(where).is_dir():
        shutil.copytree(where, model_dir, dirs_exist_ok=True)
        return True
    return False


def train_step(
    patches: Path,
    split: Path,
    fold: int,
    model_dir: Path,
    cfg: TrainConfig,
    tracking: TrackingConfig,
    *,
    parent_run_id: str = "",
    checkpoint_uri: str = "",
    device: str = "auto",
    max_epochs_this_run: int | None = None,
) -> FoldResult:
    """Train one fold on ``device`` (``auto``: CUDA when present); resumes from ``model_dir``.

    ``split`` is the split artifact (a folder holding ``manifest.parquet``) or a split manifest
    file; ``patches`` the folder whose ``shards.json`` names the shard store (without one: the
    folder itself holds the shards). ``max_epochs_this_run`` stops early; a later call resumes.

    With ``checkpoint_uri`` (a folder or ``s3://`` prefix that outlives the run), the fold's folder
    is copied there after every epoch and restored from there first: a fold killed on one pod
    resumes on the next run's pod, and a finished fold is reused (Argo ignores ``set_retry``
    inside a ``ParallelFor``, so recovery comes from here, not from retries).
    """
    from digilut.model import select_device
    from digilut.train import train_fold

    dev = select_device(device)
    manifest = split / MANIFEST_NAME if split.is_dir() else split
    on_checkpoint = None
    if checkpoint_uri:
        where = checkpoint_location(checkpoint_uri, manifest, fold, cfg)
        if _restore_checkpoint(where, model_dir):
            log.info("fold %d: checkpoint restored from %s", fold, where)

        def on_checkpoint(folder: Path) -> None:
            publish_results(folder, where)

    with Tracker(tracking) as tracker:
        parent = tracker.attach(parent_run_id) if parent_run_id else None
        return train_fold(
            manifest,
            fold,
            model_dir,
            cfg,
            dev,
            tracker=tracker,
            parent=parent,
            root=shard_store(patches),
            on_checkpoint=on_checkpoint,
            max_epochs_this_run=max_epochs_this_run,
        )
