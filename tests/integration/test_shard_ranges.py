"""Only the bytes a task needs cross the network: shards in the local S3 server, read by ranged GET.

The steps run as the pipeline's pods run them (extract → merge → label → split → train one fold), with
the shard store in S3: the artifacts hold no shard, and the bytes one fold fetched are those of the
patches it sampled, not the dataset's.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from digilut.data import make_sampler
from digilut.errors import ShardError
from digilut.extract import ExtractConfig
from digilut.fold_data import fold_rows
from digilut.ingest import SourceObject
from digilut.labels import LabelConfig
from digilut.manifest import MANIFEST_NAME, read_manifest, read_patch, shard_store
from digilut.shards import DEFAULT_MAX_GAP_BYTES, ShardReader
from digilut.split import SplitConfig
from digilut.steps.extract import extract_step
from digilut.steps.ingest import ingest_step, list_source_step
from digilut.steps.label import label_step
from digilut.steps.merge import merge_step
from digilut.steps.split import split_step
from digilut.steps.train import train_step
from digilut.storage import list_objects, upload_file
from digilut.synth import synth_dataset
from digilut.synth_plan import SynthConfig
from digilut.tracking import TrackingConfig
from digilut.train_config import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FOLD = TrainConfig(
    input_px=32,
    epochs=2,
    train_batch_size=8,
    patches_per_epoch=32,
    max_val_patches=24,
    num_workers=2,  # reads happen in DataLoader worker processes, each with its own S3 client
    weights="none",
    hidden_units=16,
    cpu_threads=1,
)


@pytest.fixture(scope="module")
def patch_set(s3_server, tmp_path_factory):
    """5 tiny patients (3 with lesions) extracted at stride 128, shards in S3; labelled and split."""
    tmp = tmp_path_factory.mktemp("ranges")
    mp = pytest.MonkeyPatch()
    for k, v in s3_server.config().to_env().items():
        mp.setenv(k, v)
    data = tmp / "data"
    synth_dataset(data, SynthConfig(patients=5, seed=3, size="tiny", positive_fraction=0.6))
    store = f"s3://{s3_server.config().bucket}/tests/shard-ranges/shards"
    art = {name: tmp / name for name in ("annotations", "patches", "thumbs", "labels", "split")}
    batches = ingest_step(str(data), list_source_step(str(data)), art["annotations"], slides_per_batch=4)
    extracted = [tmp / f"extracted{k}" for k in range(len(batches))]
    for batch, out in zip(batches, extracted, strict=True):
        slides = [SourceObject.from_dict(s) for s in batch]
        extract_step(str(data), slides, out, ExtractConfig(stride_px=128), workers=0, shards_uri=store)
    art.update({f"extracted{k}": out for k, out in enumerate(extracted)})
    merge_step(extracted, art["patches"], art["thumbs"])
    label_step(art["patches"], art["annotations"], art["labels"], LabelConfig())
    split_step(art["labels"], art["split"], SplitConfig(test_fraction=0.25, folds=2))
    yield art, store, s3_server.config()
    mp.undo()


def test_artifacts_hold_no_shard_and_the_store_holds_each_slide_once(patch_set):
    art, store, cfg = patch_set
    artifacts = [p for d in art.values() for p in d.rglob("*") if p.is_file()]
    assert artifacts and not [p for p in artifacts if p.suffix == ".shard"]
    assert shard_store(art["patches"]) == store
    m = read_manifest(art["patches"])
    objects = {o.key.rsplit("/", 1)[1]: o.size for o in list_objects(cfg, "tests/shard-ranges/shards/")}
    assert set(m["shard"]) == set(objects)
    # What train_fold and predict download whole (patches, split) is small beside the shards.
    consumed = sum(p.stat().st_size for d in ("patches", "split") for p in art[d].rglob("*") if p.is_file())
    assert consumed < sum(objects.values()) / 20
    row = m.iloc[len(m) // 2]
    assert read_patch(store, row).shape == (256, 256, 3)  # one ranged GET


def test_a_fold_fetches_the_bytes_of_the_patches_it_samples_not_the_dataset(patch_set, tmp_path):
    art, _, cfg = patch_set
    torch.set_num_threads(1)
    result = train_step(art["patches"], art["split"], 0, tmp_path / "fold0", FOLD, TrackingConfig())
    assert result.finished and result.epochs_run == 2

    objects = list_objects(cfg, "tests/shard-ranges/shards/")
    dataset_bytes = sum(o.size for o in objects)
    data = fold_rows(read_manifest(art["split"] / MANIFEST_NAME), 0, FOLD)
    steps = FOLD.patches_per_epoch // FOLD.train_batch_size
    drawn: list[int] = []  # the training rows the sampler drew, as train_fold draws them
    labels = data.train["label"].to_numpy(np.float32)
    for epoch in range(FOLD.epochs):
        sampler = make_sampler(
            labels, FOLD.sampler, num_samples=FOLD.patches_per_epoch, seed=FOLD.seed, epoch=epoch
        )
        drawn += list(sampler)[: steps * FOLD.train_batch_size]
    nbytes = data.train["nbytes"].to_numpy()
    sampled = int(nbytes[sorted(set(drawn))].sum()) + int(data.val["nbytes"].sum())
    every_draw = int(nbytes[drawn].sum()) + int(data.val["nbytes"].sum())
    fetched = result.patch_bytes_fetched
    print(
        f"dataset {dataset_bytes} B in {len(objects)} shards; fold 0 sampled {sampled} B "
        f"({len(set(drawn))} training + {len(data.val)} validation patches); fetched {fetched} B "
        f"in {result.patch_requests} GETs, {result.patch_local_hits} patches read again locally"
    )
    # Each sampled patch crossed the network at least once; beyond that only the gaps of joined
    # ranges (≤ 32 KiB each) and patches two workers fetched at once.
    assert sampled <= fetched <= every_draw + result.patch_requests * DEFAULT_MAX_GAP_BYTES
    assert fetched < dataset_bytes / 4
    # Epoch 2's validation patches and the training patches drawn again came from the local copy.
    assert result.patch_local_hits >= len(data.val)


def test_a_missing_shard_is_named_at_once(patch_set):
    _, store, _ = patch_set
    reader = ShardReader(store)
    with pytest.raises(ShardError, match=r"shards/nope\.shard.*no object"):
        reader.read_bytes("nope.shard", 0, 100)
    assert reader.stats.requests == 0


def test_a_ranged_get_is_retried_through_a_server_restart(private_s3, tmp_path, monkeypatch):
    """A patch read while the S3 server is down (SIGKILLed, back 1 s later) arrives, not an error."""
    cfg = private_s3.config(retry_timeout_s=30.0)
    blob = np.random.default_rng(0).bytes(100_000)
    (tmp_path / "x.shard").write_bytes(blob)
    upload_file(cfg, tmp_path / "x.shard", "r/x.shard")
    for k, v in cfg.to_env().items():
        monkeypatch.setenv(k, v)
    reader = ShardReader(f"s3://{cfg.bucket}/r")
    private_s3.kill()
    back = threading.Timer(1.0, private_s3.start)
    back.start()
    try:
        assert reader.read_bytes("x.shard", 40_000, 25_000) == blob[40_000:65_000]
    finally:
        back.join()
    assert reader.stats.requests == 1 and reader.stats.bytes == 25_000
