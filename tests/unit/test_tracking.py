"""MLflow tracking: parent/child runs with a local store, resume, registration, and a dead server."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from patch_fixtures import make_patch_manifest

from digilut.boxes import BOXES_CONFIG_NAME, BoxesConfig, load_boxes_config, save_boxes_config
from digilut.errors import ConfigError
from digilut.model import ModelSpec, build_model, load_model, save_model
from digilut.predict import Ensemble
from digilut.registry import register_ensemble
from digilut.steps.fetch_models import fetch_models_step
from digilut.tracking import PARENT_TAG, Tracker, TrackingConfig, kfp_run_tags, parse_pipeline_params
from digilut.train import TrainConfig, train_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU models: one thread is faster

CPU = torch.device("cpu")
QUICK = TrainConfig(
    input_px=64,
    epochs=2,
    train_batch_size=16,
    num_workers=0,
    weights="none",
    hidden_units=16,
    patches_per_epoch=16,
    max_val_patches=16,
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patch_manifest(tmp_path_factory.mktemp("data"), patients=4, grid=4, px=64, folds=2)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_pipeline_parent_and_fold_child_runs(store: str, manifest: Path, tmp_path: Path) -> None:
    import torchvision

    from digilut.files import file_sha256

    weights = tmp_path / "ssl.pt"  # a self-supervised checkpoint: prefixed keys and a projector
    state = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save({"state_dict": state | {"module.projector.weight": torch.zeros(4, 512)}}, weights)
    cfg = dataclasses.replace(QUICK, weights=str(weights))
    with Tracker(TrackingConfig(store)) as tracker:
        parent = tracker.start_run("pipeline")
        tracker.log_params(parent, {"folds": 2})
        result = train_fold(manifest, 0, tmp_path / "fold0", cfg, CPU, tracker=tracker, parent=parent)
        tracker.end_run(parent)
        assert tracker.flush(120)
    client = _client(store)
    child = client.get_run(result.mlflow_run_id)
    assert child.data.tags[PARENT_TAG] == parent.run_id and child.info.status == "FINISHED"
    assert child.data.params["lr"] == str(QUICK.lr) and child.data.params["fold"] == "0"
    label = f"file:{file_sha256(weights)[:12]}"  # the initialisation really used, not weights=…
    assert child.data.params["init"] == label == child.data.tags["digilut.init"] == result.init["label"]
    assert child.data.params["init_missing_keys"] == "0" and child.data.params["init_unexpected_keys"] == "1"
    assert "pretrained weights from" in child.data.tags["digilut.init_words"]
    history = client.get_metric_history(child.info.run_id, "val_auroc")
    assert [m.step for m in history] == [0, 1]
    assert [m.value for m in history] == pytest.approx([h["val_auroc"] for h in result.history])
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"model", "checkpoint", "oof.parquet", "result.json"} <= artifacts
    import mlflow.pytorch

    logged = mlflow.pytorch.load_model(f"{child.info.artifact_uri}/model").eval()
    mine = load_model(tmp_path / "fold0" / "model.pt", CPU).model
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(logged(x), mine(x))
    assert client.get_run(parent.run_id).data.params == {"folds": "2"}


def test_resumed_fold_continues_its_mlflow_run(store: str, manifest: Path, tmp_path: Path) -> None:
    with Tracker(TrackingConfig(store)) as tracker:
        first = train_fold(manifest, 1, tmp_path, QUICK, CPU, tracker=tracker, max_epochs_this_run=1)
    with Tracker(TrackingConfig(store)) as tracker:
        second = train_fold(manifest, 1, tmp_path, QUICK, CPU, tracker=tracker)
    assert first.mlflow_run_id and second.mlflow_run_id == first.mlflow_run_id
    client = _client(store)
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "val_loss")] == [0, 1]
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"


def test_unknown_run_id_starts_a_new_run(store: str) -> None:
    with Tracker(TrackingConfig(store)) as tracker:
        run = tracker.start_run("fold9", run_id="0123456789abcdef0123456789abcdef")
        tracker.end_run(run)
        assert tracker.flush(60)
    assert run.run_id and run.run_id != "0123456789abcdef0123456789abcdef"


def test_ensemble_is_registered_and_predicts_like_the_folds(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(
            save_model(tmp_path / f"m{i}.pt", build_model(ModelSpec(hidden_units=8, input_px=32), "none"))
        )
    tuned = save_boxes_config(BoxesConfig(margin_px=123.0), tmp_path / BOXES_CONFIG_NAME)
    with Tracker(TrackingConfig(store)) as tracker:
        parent = tracker.start_run("pipeline")
        register_ensemble(tracker, parent, paths, "digilut-test-ensemble", extra_files=[tuned])
        tracker.end_run(parent)
        assert tracker.close(120)
    import mlflow.pyfunc

    (version,) = _client(store).search_model_versions("name='digilut-test-ensemble'")
    assert version.run_id == parent.run_id
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pyfunc = mlflow.pyfunc.load_model(version.source)
    expected = Ensemble.load(paths, CPU).predict_batch(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(pyfunc.predict(images), expected, rtol=1e-5)
    # the inference pipeline's fetch_models gets the tuned boxes config from the registry too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    fetch_models_step(f"models:/digilut-test-ensemble/{version.version}", tmp_path / "fetched")
    assert load_boxes_config(tmp_path / "fetched" / BOXES_CONFIG_NAME).margin_px == 123.0


def test_a_refused_call_is_dropped_and_reported(store: str) -> None:
    with Tracker(TrackingConfig(store)) as tracker:
        run = tracker.start_run("dup")
        tracker.log_params(run, {"a": 1})
        tracker.log_params(run, {"a": 2})  # MLflow params are immutable: refused for good
        tracker.end_run(run)
        assert tracker.flush(60)
        assert not tracker.close()
    assert _client(store).get_run(run.run_id).data.params == {"a": "1"}


def test_disabled_tracker_is_a_no_op() -> None:
    tracker = Tracker(TrackingConfig())
    run = tracker.start_run("x")
    tracker.log_metrics(run, {"a": 1.0}, step=0)
    assert run.run_id is None and tracker.pending == 0 and tracker.close()


@pytest.fixture
def hung_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung MLflow server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_training_does_not_wait_for_a_hung_server(hung_server: str, manifest: Path, tmp_path: Path) -> None:
    cfg = TrackingConfig(hung_server, request_timeout_s=30, retry_interval_s=30)
    tracker = Tracker(cfg)
    result = train_fold(manifest, 0, tmp_path, dataclasses.replace(QUICK, epochs=1), CPU, tracker=tracker)
    # Training finished while the very first call (creating the run) was still waiting for the server.
    assert result.finished and result.mlflow_run_id is None
    assert tracker.pending > 5
    assert not tracker.close(timeout_s=0)


def test_tracking_config_validation() -> None:
    with pytest.raises(ConfigError, match="request_timeout_s=0"):
        TrackingConfig("http://x", request_timeout_s=0)
    with pytest.raises(ConfigError, match="experiment"):
        TrackingConfig("http://x", experiment="")


def test_pipeline_params_text_is_parsed_like_the_fold_runs_log_them() -> None:
    text = "data_uri=s3://b/p\nepochs=3.0\nlr=0.001\nrun_name=two\nlines\ntune_boxes=true\nresults_uri="
    assert parse_pipeline_params(text) == {
        "data_uri": "s3://b/p",
        "epochs": "3",  # kfp.local writes integers as 3.0
        "lr": "0.001",
        "run_name": "two\nlines",  # a line without name= continues the value before it
        "tune_boxes": "true",
        "results_uri": "",
    }
    assert parse_pipeline_params("") == {}
    assert kfp_run_tags("", "") == {}
    assert kfp_run_tags("abc", "run-1", "https://kf.example/pipeline/")["kfp.run_url"] == (
        "https://kf.example/pipeline/#/runs/details/abc"
    )


def test_start_tracking_component_logs_the_pipeline_params_on_the_parent_run(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kfp.dsl import Artifact

    from components.training import start_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("KFP_HOST", raising=False)
    out = Artifact(name="tracking", uri=str(tmp_path / "tracking"))
    out.path = str(tmp_path / "tracking")
    start_tracking.python_func(
        run_name="parent",
        experiment="digilut",
        tracking=out,
        params="epochs=3.0\nfolds=2.0\nlr=0.0003\narch=resnet18",
        kfp_run_id="7f3c",
        kfp_run_name="digilut-training-20261129",
    )
    run = _client(store).get_run((tmp_path / "tracking").read_text())
    assert run.data.params == {"epochs": "3", "folds": "2", "lr": "0.0003", "arch": "resnet18"}
    assert run.data.tags["kfp.run_id"] == "7f3c" and run.data.tags["kfp.run_name"].startswith("digilut-")
    assert "kfp.run_url" not in run.data.tags and out.metadata["mlflow_run_id"] == run.info.run_id


def test_tracking_and_registry_import_no_torch_mlflow_or_model_code() -> None:
    """The ensemble is registered from the CPU image's evaluate step (no torch there): tracking
    builds no models, and the registry imports torch and MLflow only when it builds one."""
    code = (
        "import sys, digilut.tracking, digilut.registry\n"
        "bad = [m for m in ('torch', 'mlflow', 'digilut.model', 'digilut.predict') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
