"""Training of one fold on a tiny patch set, on the CPU: outputs, determinism, resume, early stopping."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from patch_fixtures import TINY_TRAIN, tiny_training_manifest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digilut.epoch import training_loss
from digilut.errors import ConfigError
from digilut.fold_data import fold_rows
from digilut.manifest import read_manifest
from digilut.model import load_model
from digilut.predict import PredictConfig, patch_metrics, predict_patches
from digilut.train import FoldResult, TrainConfig, train_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU models: one thread is faster

CPU = torch.device("cpu")
TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_training_manifest(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FoldResult]:
    out = tmp_path_factory.mktemp("fold0")
    return out, train_fold(manifest, 0, out, TINY, CPU)


def test_fold_writes_model_oof_result_and_tensorboard(
    trained: tuple[Path, FoldResult], manifest: Path
) -> None:
    out, result = trained
    assert {"model.pt", "last.pt", "oof.parquet", "result.json"} <= {p.name for p in out.iterdir()}
    assert result.epochs_run == 2 and result.finished and len(result.history) == 2
    assert FoldResult.load(out) == result
    assert result.init["label"] == "random" and result.init["words"].startswith("random initialisation")
    oof = read_manifest(out / "oof.parquet")
    df = read_manifest(manifest)
    val = df[(df["split"] == "train") & (df["fold"] == 0)]
    assert len(oof) == len(val) == result.val_patches
    assert set(oof["patient"]) == set(val["patient"]) and oof["prob"].between(0, 1).all()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"epoch/train_loss", "epoch/val_auroc", "epoch/lr", "train/loss_step"} <= set(tags["scalars"])
    assert any(t.startswith("patches/train") for t in tags["images"])
    assert [e.step for e in events.Scalars("epoch/val_auroc")] == [0, 1]


def test_tiny_model_learns_the_lesions(trained: tuple[Path, FoldResult]) -> None:
    out, result = trained
    assert result.best_val_auroc > 0.9
    oof = read_manifest(out / "oof.parquet")
    assert patch_metrics(oof["label"].to_numpy(), oof["prob"].to_numpy()).auroc == pytest.approx(
        result.best_val_auroc
    )


def test_best_model_predicts_held_out_patients(trained: tuple[Path, FoldResult], manifest: Path) -> None:
    out, _ = trained
    df = read_manifest(manifest)
    test = df[df["split"] == "test"].sample(frac=1.0, random_state=0)  # order must be kept, not assumed
    pred = predict_patches(test, manifest.parent, [out / "model.pt"], PredictConfig(num_workers=0), CPU)
    assert list(pred["offset"]) == list(test["offset"]) and pred["prob"].notna().all()
    assert patch_metrics(pred["label"].to_numpy(), pred["prob"].to_numpy()).auroc > 0.9


def test_interrupted_run_resumes_to_the_same_weights(
    trained: tuple[Path, FoldResult], manifest: Path, tmp_path: Path
) -> None:
    out, straight = trained
    first = train_fold(manifest, 0, tmp_path, TINY, CPU, max_epochs_this_run=1)
    assert first.epochs_run == 1 and not first.finished
    resumed = train_fold(manifest, 0, tmp_path, TINY, CPU)
    assert resumed.finished and [h["epoch"] for h in resumed.history] == [0, 1]
    for key in ("train_loss", "val_loss", "val_auroc"):
        assert [h[key] for h in resumed.history] == [h[key] for h in straight.history]
    a = load_model(out / "model.pt", CPU).model.state_dict()
    b = load_model(tmp_path / "model.pt", CPU).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic per seed, across the resume


def test_finished_fold_is_not_retrained(trained: tuple[Path, FoldResult], manifest: Path) -> None:
    out, result = trained
    stamp = (out / "model.pt").stat().st_mtime_ns
    again = train_fold(manifest, 0, out, dataclasses.replace(TINY, num_workers=1), CPU)
    assert again == result and (out / "model.pt").stat().st_mtime_ns == stamp


def test_changed_settings_restart_from_scratch(
    manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = dataclasses.replace(TINY, epochs=1, patches_per_epoch=16)
    train_fold(manifest, 1, tmp_path, cfg, CPU)
    with caplog.at_level(logging.WARNING, logger="digilut.checkpoint"):
        result = train_fold(manifest, 1, tmp_path, dataclasses.replace(cfg, lr=5e-4), CPU)
    assert "other settings (lr)" in caplog.text
    assert result.config["lr"] == 5e-4 and result.epochs_run == 1


def test_fold_rows_keep_patients_apart_and_use_sampled_rows(manifest: Path) -> None:
    df = read_manifest(manifest)
    df.loc[df.index[::3], "sampled"] = False
    data = fold_rows(df, 1, TINY)
    assert not set(data.train["patient"]) & set(data.val["patient"])
    assert data.train["sampled"].all() and (data.train["fold"] == 0).all()
    assert (data.val["fold"] == 1).all() and not data.val["sampled"].all()  # validation keeps every patch
    assert "test" not in set(data.train["split"]) | set(data.val["split"])
    capped = fold_rows(df, 1, dataclasses.replace(TINY, max_val_patches=7))
    assert len(capped.val) == 7


def test_train_min_overlap_leaves_the_box_margin_out_of_training_but_not_of_validation(
    manifest: Path,
) -> None:
    df = read_manifest(manifest)
    df["overlap"] = np.where(df["label"] == 1, np.linspace(0.1, 1.0, len(df)), 0.0)
    base = fold_rows(df, 1, TINY)
    core = fold_rows(df, 1, dataclasses.replace(TINY, train_min_overlap=0.5))
    kept = core.train[core.train["label"] == 1]
    assert len(kept) and (kept["overlap"] >= 0.5).all()
    dropped = base.train[(base.train["label"] == 1) & (base.train["overlap"] < 0.5)]
    assert len(dropped) and len(core.train) == len(base.train) - len(dropped)
    assert core.train["label"].eq(0).sum() == base.train["label"].eq(0).sum()  # negatives all stay
    assert core.val.equals(base.val)  # validation keeps the margin patches
    with pytest.raises(ConfigError, match="needs the manifest's overlap column"):
        fold_rows(df.drop(columns=["overlap"]), 1, dataclasses.replace(TINY, train_min_overlap=0.5))
    with pytest.raises(ConfigError, match=r"train_min_overlap=1\.5"):
        dataclasses.replace(TINY, train_min_overlap=1.5)


def test_fold_rows_errors_name_what_is_wrong(manifest: Path) -> None:
    df = read_manifest(manifest)
    with pytest.raises(ConfigError, match=r"fold=5: the manifest's training folds are \[0, 1\]"):
        fold_rows(df, 5, TINY)
    with pytest.raises(ConfigError, match="digilut split"):
        fold_rows(df.drop(columns=["fold"]), 0, TINY)
    with pytest.raises(ConfigError, match="both classes"):
        fold_rows(df.assign(label=0), 0, TINY)


def test_losses_weight_positives_and_focus_on_hard_examples() -> None:
    logits = torch.tensor([2.0, -2.0, 0.1])
    y = torch.tensor([1.0, 0.0, 1.0])
    bce = training_loss(logits, y, TINY)
    assert training_loss(logits, y, dataclasses.replace(TINY, pos_weight=5.0)) > bce
    focal = training_loss(logits, y, dataclasses.replace(TINY, loss="focal", focal_alpha=-1))
    assert 0 < focal < bce  # focal down-weights the two easy examples


def test_focal_plateau_run_finishes(manifest: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, loss="focal", schedule="plateau", epochs=1, patches_per_epoch=32)
    result = train_fold(manifest, 1, tmp_path, cfg, CPU)
    assert result.finished and np.isfinite(result.history[0]["train_loss"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "mse"}, "loss='mse'"),
        ({"schedule": "step"}, "schedule='step'"),
        ({"sampler": "sequential"}, "sampler='sequential'"),
        ({"epochs": 0}, "epochs=0"),
        ({"lr": 2.0}, "lr=2.0"),
        ({"arch": "resnet101"}, "arch='resnet101'"),
        ({"input_px": 8}, "input_px=8"),
        ({"stain_scale": 2.0}, "stain_scale=2.0"),
        ({"stain_norm": "vahadane"}, "stain_norm=.vahadane.: choose one of none, reinhard, macenko"),
        ({"focal_alpha": 0.0}, "focal_alpha=0.0"),
    ],
)
def test_train_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_single_class_validation_selects_on_loss(manifest: Path, tmp_path: Path) -> None:
    df = read_manifest(manifest)
    df.loc[(df["fold"] == 1), "label"] = 0  # fold 1's validation patients have no lesion
    path = tmp_path / "data" / "manifest.parquet"
    path.parent.mkdir()
    (path.parent / "shards").symlink_to(manifest.parent / "shards")
    pd.DataFrame(df).to_parquet(path)
    result = train_fold(
        path, 1, tmp_path / "out", dataclasses.replace(TINY, epochs=1, patches_per_epoch=16), CPU
    )
    assert np.isnan(result.best_val_auroc) and result.best_epoch == 0


def test_fold_resumes_on_a_new_machine_from_its_checkpoint_folder(
    trained: tuple[Path, FoldResult], manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What a new pod sees: an empty model folder, the checkpoints copied where the run points
    (``checkpoint_uri``; a folder here, an ``s3://`` prefix in the end-to-end test)."""
    from digilut.locations import publish_results
    from digilut.steps.train import checkpoint_location, train_step
    from digilut.tracking import TrackingConfig

    out, straight = trained
    ckpt = tmp_path / "checkpoints"
    where = checkpoint_location(str(ckpt), manifest, 0, TINY)
    assert where.startswith(f"{ckpt}/fold0-")
    assert checkpoint_location(str(ckpt), manifest, 1, TINY).startswith(f"{ckpt}/fold1-")
    assert checkpoint_location(str(ckpt), manifest, 0, dataclasses.replace(TINY, lr=2e-3)) != where
    first = train_fold(
        manifest, 0, tmp_path / "pod1", TINY, CPU, max_epochs_this_run=1,
        on_checkpoint=lambda folder: publish_results(folder, where),
    )  # fmt: skip
    assert not first.finished and (Path(where) / "last.pt").is_file()

    caplog.set_level(logging.INFO)
    pod2 = tmp_path / "pod2"
    resumed = train_step(
        manifest.parent, manifest.parent, 0, pod2, TINY, TrackingConfig(), checkpoint_uri=str(ckpt)
    )
    assert "checkpoint restored" in caplog.text and "resuming at epoch 1" in caplog.text
    assert resumed.finished and [h["val_loss"] for h in resumed.history] == [
        h["val_loss"] for h in straight.history
    ]
    a = load_model(out / "model.pt", CPU).model.state_dict()
    b = load_model(pod2 / "model.pt", CPU).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    caplog.clear()
    again = train_step(
        manifest.parent,
        manifest.parent,
        0,
        tmp_path / "pod3",
        TINY,
        TrackingConfig(),
        checkpoint_uri=str(ckpt),
    )
    assert "already trained" in caplog.text and again.model_sha256 == resumed.model_sha256


@pytest.mark.parametrize("stain_norm", ["reinhard", "macenko"])
def test_stain_normalised_fold_predicts_as_it_validated(
    manifest: Path, tmp_path: Path, stain_norm: str
) -> None:
    cfg = dataclasses.replace(TINY, epochs=1, stain_norm=stain_norm, patches_per_epoch=32)
    result = train_fold(manifest, 1, tmp_path, cfg, CPU)
    oof = read_manifest(tmp_path / "oof.parquet")
    assert load_model(tmp_path / "model.pt", CPU).spec.stain_norm == stain_norm
    rows = oof.drop(columns=["prob"])
    again = predict_patches(rows, manifest.parent, [tmp_path / "model.pt"], PredictConfig(num_workers=0), CPU)
    # prediction fits each slide's stain on the same patches and normalises as validation did
    np.testing.assert_allclose(again["prob"], oof["prob"], atol=1e-5)
    assert result.val_patches == len(oof)
    plain = dataclasses.replace(cfg, stain_norm="none")
    other = train_fold(manifest, 1, tmp_path / "plain", plain, CPU)
    assert other.history[0]["val_loss"] != result.history[0]["val_loss"]  # the normalisation is applied


def test_resumed_fold_keeps_the_record_of_its_pretrained_weights(manifest: Path, tmp_path: Path) -> None:
    import torchvision

    from digilut.files import file_sha256

    weights = tmp_path / "backbone.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    label = f"file:{file_sha256(weights)[:12]}"
    cfg = dataclasses.replace(TINY, weights=str(weights), patches_per_epoch=32)
    first = train_fold(manifest, 0, tmp_path / "fold", cfg, CPU, max_epochs_this_run=1)
    assert first.init["label"] == label
    weights.unlink()  # e.g. a downloaded s3:// file, gone on the new pod: the state has the weights
    resumed = train_fold(manifest, 0, tmp_path / "fold", cfg, CPU)
    assert resumed.finished and resumed.init["label"] == label
    assert load_model(tmp_path / "fold" / "model.pt", CPU).meta["init"] == label
