"""The boxes config a training run tuned travels with its ensemble: results/models → fetch_models →
predictions → submission (and through the MLflow registry: tests/unit/test_tracking.py)."""

import json
from pathlib import Path

import pandas as pd
import pytest
from box_fixtures import oracle_patches

from digilut.boxes import BOXES_CONFIG_NAME, BoxesConfig, load_boxes_config, save_boxes_config
from digilut.errors import ConfigError
from digilut.steps.common import PREDICTIONS_NAME
from digilut.steps.fetch_models import fetch_models_step
from digilut.steps.submission import submission_step

LESION = (2000, 3000, 3000, 3700)
TUNED = BoxesConfig(margin_px=300.0, high=0.6, low=0.3)


def test_boxes_config_round_trips_and_a_bad_file_is_named(tmp_path: Path) -> None:
    path = save_boxes_config(TUNED, tmp_path / BOXES_CONFIG_NAME)
    assert load_boxes_config(path) == TUNED
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()), "threshold": 0.5}))
    with pytest.raises(ConfigError, match=r"bad\.json: unknown boxes config field\(s\) threshold"):
        load_boxes_config(bad)
    bad.write_text(json.dumps({"high": 1.5}))
    with pytest.raises(ConfigError, match=r"bad\.json: high=1.5"):
        load_boxes_config(bad)


def _submission(tmp_path: Path, predictions: Path, cfg: BoxesConfig) -> pd.DataFrame:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    pd.DataFrame([("s_a.tif", 8192, 8192, 1)], columns=["filename", "max_x", "max_y", "trustii_id"]).to_csv(
        data / "test.csv", index=False
    )
    out = tmp_path / f"results-{len(list(tmp_path.iterdir()))}"
    submission_step(str(data), predictions, out, cfg)
    return pd.read_csv(out / "boxes.csv")


def test_the_ensembles_tuned_config_reaches_the_submission(tmp_path: Path) -> None:
    # a training run's results/models: fold models and the tuned config
    trained = tmp_path / "run" / "models"
    trained.mkdir(parents=True)
    (trained / "fold0.pt").write_bytes(b"model")
    save_boxes_config(TUNED, trained / BOXES_CONFIG_NAME)
    models = tmp_path / "models"
    fetch_models_step(str(tmp_path / "run"), models)
    assert load_boxes_config(models / BOXES_CONFIG_NAME) == TUNED
    # predictions made with that ensemble carry it (predict_all_step copies it)
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    oracle_patches([LESION]).to_parquet(predictions / PREDICTIONS_NAME)
    default = _submission(tmp_path, predictions, BoxesConfig())
    (models / BOXES_CONFIG_NAME).replace(predictions / BOXES_CONFIG_NAME)
    tuned = _submission(tmp_path, predictions, BoxesConfig())
    # the tuned margin: 300 px more on every side than the default boxes
    d = tuned[["x1", "x2", "y1", "y2"]].to_numpy() - default[["x1", "x2", "y1", "y2"]].to_numpy()
    assert d.tolist() == [[-300, 300, -300, 300]]


def test_an_ensemble_without_a_tuned_config_uses_the_given_one(tmp_path: Path) -> None:
    trained = tmp_path / "run"
    trained.mkdir()
    (trained / "fold0.pt").write_bytes(b"model")
    models = tmp_path / "models"
    fetch_models_step(str(trained), models)
    assert not (models / BOXES_CONFIG_NAME).exists()


def test_tuning_keeps_the_chosen_boxes_method() -> None:
    from box_fixtures import truth_frame

    from digilut.evaluate import evaluate_predictions

    oof = oracle_patches([LESION], slide="o_a.tif").assign(label=lambda d: (d["prob"] > 0.5).astype(int))
    pred = oracle_patches([LESION]).assign(label=lambda d: (d["prob"] > 0.5).astype(int))
    ev = evaluate_predictions(
        pred,
        truth_frame("s_a.tif", [LESION]),
        oof=oof,
        oof_truth=truth_frame("o_a.tif", [LESION]),
        tune_base=BoxesConfig(method="dbscan", fit="grid"),
    )
    assert ev.boxes_config.method == "dbscan" and ev.boxes_config.fit == "grid"
    assert ev.tuned_f2 is not None  # tuned (dbscan + grid: union of patch extents, a poor fit here)
