"""Shard-backed patch dataset, samplers and device-side transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from patch_fixtures import make_patch_manifest

from digilut.data import PatchDataset, class_balanced_weights, dihedral, make_loader, make_sampler
from digilut.errors import ConfigError, ShardError
from digilut.manifest import read_manifest, read_patch, write_manifest
from digilut.shards import encode_jpeg, write_shard
from digilut.train_config import ColourAugment
from digilut.transforms import IMAGENET_MEAN, IMAGENET_STD, colour_augment, to_model_input


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patch_manifest(tmp_path_factory.mktemp("patches"), patients=3, grid=4, px=32)


@pytest.mark.parametrize("k", range(8))
def test_dihedral_matches_numpy_rotations_and_flips(k: int) -> None:
    img = np.random.default_rng(k).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.rot90(img, k % 4, axes=(0, 1))
    if k >= 4:
        expected = expected[:, ::-1]
    np.testing.assert_array_equal(dihedral(img, k), expected)


def test_dataset_reads_the_manifest_pixels_in_batches(manifest: Path) -> None:
    df = read_manifest(manifest)
    ds = PatchDataset(manifest.parent, df, augment=False)
    batch = ds.__getitems__([5, 0, 11])
    assert batch.images.shape == (3, 32, 32, 3) and batch.images.dtype == torch.uint8
    for j, i in enumerate([5, 0, 11]):
        np.testing.assert_array_equal(batch.images[j].numpy(), read_patch(manifest.parent, df.iloc[i]))
    assert batch.labels.tolist() == df["label"].iloc[[5, 0, 11]].astype(float).tolist()
    assert batch.index.tolist() == [5, 0, 11]


def test_unlabelled_rows_get_label_minus_one(manifest: Path) -> None:
    df = read_manifest(manifest).drop(columns=["label"])
    assert PatchDataset(manifest.parent, df)[0].labels.item() == -1.0


def test_augmented_patch_is_a_symmetry_of_the_original(manifest: Path) -> None:
    df = read_manifest(manifest)
    plain = PatchDataset(manifest.parent, df, augment=False).__getitems__(list(range(16))).images.numpy()
    aug = PatchDataset(manifest.parent, df, augment=True, seed=3).__getitems__(list(range(16))).images.numpy()
    for p, a in zip(plain, aug, strict=True):
        assert any(np.array_equal(dihedral(p, k), a) for k in range(8))
    assert not np.array_equal(plain, aug)  # 16 patches all drawing the identity: p = 8⁻¹⁶


def test_augmentation_is_seeded_by_epoch_not_by_worker(manifest: Path) -> None:
    df = read_manifest(manifest)
    ds = PatchDataset(manifest.parent, df, augment=True, seed=1)

    def run(workers: int, epoch: int) -> list[np.ndarray]:
        ds.set_epoch(epoch)
        loader = make_loader(ds, make_sampler(ds.labels, "sequential"), batch_size=8, num_workers=workers)
        return [b.images.numpy() for b in loader]

    a, b = run(0, 0), run(2, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = run(0, 1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_patch_of_another_size_names_the_shard(tmp_path: Path) -> None:
    pixels = [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)]
    idx = write_shard(tmp_path / "s.shard", [encode_jpeg(p) for p in pixels])
    rows = pd.DataFrame({"shard": ["s.shard"] * 2, "offset": idx.offset, "nbytes": idx.nbytes})
    with pytest.raises(ShardError, match=r"s\.shard patch at offset"):
        PatchDataset(tmp_path, rows).__getitems__([0, 1])


def test_missing_columns_and_missing_shard_are_shard_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="nbytes"):
        PatchDataset(tmp_path, pd.DataFrame({"shard": ["a"], "offset": [0]}))
    rows = pd.DataFrame({"shard": ["gone.shard"], "offset": [0], "nbytes": [10]})
    with pytest.raises(ShardError, match=r"gone\.shard"):
        PatchDataset(tmp_path, rows)[0]


def test_weighted_sampler_balances_the_classes() -> None:
    labels = np.r_[np.ones(10), np.zeros(990)].astype(np.float32)
    drawn = np.array(list(make_sampler(labels, "weighted", num_samples=4000, seed=0)))
    assert 0.45 < labels[drawn].mean() < 0.55
    again = np.array(list(make_sampler(labels, "weighted", num_samples=4000, seed=0)))
    np.testing.assert_array_equal(drawn, again)
    other_epoch = np.array(list(make_sampler(labels, "weighted", num_samples=4000, seed=0, epoch=1)))
    assert not np.array_equal(drawn, other_epoch)


def test_shuffle_sampler_draws_each_row_once_and_rejects_unknown_kinds() -> None:
    labels = np.zeros(50, np.float32)
    assert sorted(make_sampler(labels, "shuffle", seed=2)) == list(range(50))
    assert len(list(make_sampler(labels, "shuffle", num_samples=20))) == 20
    with pytest.raises(ConfigError, match="sampler='balanced'"):
        make_sampler(labels, "balanced")


def test_class_balanced_weights_sum_to_one_per_class() -> None:
    labels = np.array([0, 0, 0, 1])
    w = class_balanced_weights(labels)
    assert w[labels == 0].sum() == pytest.approx(1.0) and w[labels == 1].sum() == pytest.approx(1.0)


def test_model_input_is_normalised_resized_and_channels_last() -> None:
    images = torch.full((2, 32, 32, 3), 128, dtype=torch.uint8)
    x = to_model_input(images, torch.device("cpu"), input_px=16, channels_last=True)
    assert x.shape == (2, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[0, :, 5, 5].numpy(), expected, rtol=1e-5)


def test_colour_augment_stays_in_range_and_is_identity_at_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    none = ColourAugment(0, 0, 0, 0, 0)
    torch.testing.assert_close(colour_augment(x, none, gen), x)
    y = colour_augment(x, ColourAugment(0.3, 0.3, 0.3, 0.2, 0.05), gen)
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    white = torch.ones(2, 3, 4, 4)  # glass: no stain to scale
    torch.testing.assert_close(colour_augment(white, ColourAugment(0, 0, 0, 0.3, 0), gen), white)


def test_stain_augmentation_changes_each_patch_differently() -> None:
    gen = torch.Generator().manual_seed(0)
    pink = torch.tensor([236, 160, 196]).float().div(255).view(1, 3, 1, 1).expand(3, 3, 4, 4)
    y = colour_augment(pink.contiguous(), ColourAugment(0, 0, 0, 0.2, 0.02), gen)
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2])


@pytest.mark.parametrize(
    ("field", "value"), [("brightness", 1.0), ("contrast", -0.1), ("stain_scale", 1.5), ("stain_shift", 0.5)]
)
def test_colour_augment_rejects_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        ColourAugment(**{field: value})


def test_augment_without_generator_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="generator"):
        to_model_input(
            torch.zeros(1, 8, 8, 3, dtype=torch.uint8),
            torch.device("cpu"),
            input_px=8,
            augment=ColourAugment(),
        )


def test_manifest_roundtrip_keeps_rows_readable(manifest: Path) -> None:
    # A manifest rewritten elsewhere still reads its shards relative to its own folder.
    df = read_manifest(manifest)
    copy = write_manifest(df.iloc[:3], manifest.parent / "subset.parquet")
    ds = PatchDataset(copy.parent, read_manifest(copy))
    assert len(ds) == 3 and ds[2].images.shape == (32, 32, 3)
