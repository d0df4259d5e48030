"""Ensemble prediction and patch-level metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from patch_fixtures import make_patch_manifest

from digilut.errors import ConfigError
from digilut.manifest import read_manifest
from digilut.model import ModelSpec, build_model, load_model, save_model
from digilut.predict import (
    ORIGINAL_METHOD,
    Ensemble,
    PredictConfig,
    patch_metrics,
    predict_patches,
    safe_auroc,
    tune_threshold,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU models: one thread is faster


CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("predict")
    manifest = make_patch_manifest(tmp / "data", patients=2, grid=4, px=32)
    paths = []
    for i, px in enumerate((32, 48)):  # models trained at different input sizes still ensemble
        torch.manual_seed(i)
        model = build_model(ModelSpec(hidden_units=8, input_px=px), "none").eval()
        paths.append(save_model(tmp / f"m{i}.pt", model))
    return manifest, paths


def test_ensemble_is_the_mean_of_its_models(setup: tuple[Path, list[Path]]) -> None:
    manifest, paths = setup
    rows = read_manifest(manifest)
    pcfg = PredictConfig(predict_batch_size=5, num_workers=0)
    both = predict_patches(rows, manifest.parent, paths, pcfg, CPU)
    singles = [predict_patches(rows, manifest.parent, [p], PredictConfig(num_workers=0), CPU) for p in paths]
    np.testing.assert_allclose(both["prob"], (singles[0]["prob"] + singles[1]["prob"]) / 2, rtol=1e-5)
    assert list(both.columns) == [*rows.columns, "prob"] and len(both) == len(rows)


def test_predict_batch_matches_a_manual_forward(setup: tuple[Path, list[Path]]) -> None:
    _, paths = setup
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    m = load_model(paths[0], CPU)
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / (
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        expected = torch.sigmoid(m.model(x))
    torch.testing.assert_close(Ensemble([m], CPU).predict_batch(images), expected)


def test_workers_do_not_change_predictions(setup: tuple[Path, list[Path]]) -> None:
    manifest, paths = setup
    rows = read_manifest(manifest)
    one, two = (PredictConfig(predict_batch_size=4, num_workers=n) for n in (0, 2))
    a = predict_patches(rows, manifest.parent, paths[:1], one, CPU)
    b = predict_patches(rows, manifest.parent, paths[:1], two, CPU)
    np.testing.assert_array_equal(a["prob"], b["prob"])


def test_no_rows_give_an_empty_prob_column(setup: tuple[Path, list[Path]]) -> None:
    manifest, paths = setup
    out = predict_patches(read_manifest(manifest).iloc[:0], manifest.parent, paths, PredictConfig(), CPU)
    assert "prob" in out.columns and out.empty


def test_an_ensemble_needs_models() -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        Ensemble([], CPU)
    with pytest.raises(ConfigError, match="predict_batch_size=0"):
        PredictConfig(predict_batch_size=0)


def test_patch_metrics_by_hand() -> None:
    labels = np.array([1, 1, 0, 0, 0, 1])
    probs = np.array([0.9, 0.4, 0.6, 0.1, 0.2, 0.7])
    m = patch_metrics(labels, probs, threshold=0.5)
    # predicted positive: 0.9 (tp), 0.6 (fp), 0.7 (tp); missed 0.4
    assert (m.precision, m.recall) == pytest.approx((2 / 3, 2 / 3))
    assert m.f1 == pytest.approx(2 / 3) and m.auroc == pytest.approx(8 / 9)
    assert (m.patches, m.positives) == (6, 3)
    assert set(ORIGINAL_METHOD) <= set(m.to_dict())


def test_metrics_without_positives_or_predictions_are_zero_not_errors() -> None:
    m = patch_metrics(np.zeros(4), np.full(4, 0.1))
    assert np.isnan(m.auroc) and m.precision == m.recall == m.f1 == 0.0
    assert np.isnan(safe_auroc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_tuned_threshold_maximises_f_beta_over_all_cuts() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.2
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1).round(2)  # ties included
    for beta in (1.0, 2.0):
        t = tune_threshold(labels, probs, beta)

        def fb(cut: float, beta: float = beta) -> float:
            m = patch_metrics(labels, probs, cut)
            b2 = beta * beta
            return (
                0.0
                if m.precision + m.recall == 0
                else (1 + b2) * m.precision * m.recall / (b2 * m.precision + m.recall)
            )

        assert fb(t) == pytest.approx(max(fb(c) for c in np.unique(probs)))
    assert tune_threshold(np.zeros(3), np.array([0.2, 0.5, 0.9])) == 0.5
    with pytest.raises(ConfigError, match="beta"):
        tune_threshold(labels, probs, beta=0)
