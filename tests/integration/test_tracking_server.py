"""Tracking against a real MLflow server (artifacts proxied to SeaweedFS S3): a fold's runs and model,
and an outage — metrics logged while the server is down arrive once it is up, with their times."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from digilut.model import ModelSpec, build_model, load_model, save_model
from digilut.ops.mlflow_server import MlflowServer, start_mlflow
from digilut.ops.process import free_ports
from digilut.ops.s3_server import S3Server
from digilut.registry import log_model
from digilut.tracking import PARENT_TAG, Tracker, TrackingConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def _client(uri: str):  # MlflowClient, imported lazily
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_fold_run_and_model_through_the_server(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_file = save_model(
        tmp_path / "model.pt", build_model(ModelSpec(hidden_units=8, input_px=32), "none")
    )
    with Tracker(TrackingConfig(mlflow_server.tracking_uri, experiment="digilut-it")) as tracker:
        parent = tracker.start_run("pipeline")
        child = tracker.start_run("fold0", parent=parent)
        for epoch in range(3):
            tracker.log_metrics(child, {"val_auroc": 0.5 + 0.1 * epoch}, step=epoch)
        log_model(tracker, child, model_file)
        tracker.end_run(child)
        tracker.end_run(parent)
        assert tracker.close(120)
    client = _client(mlflow_server.tracking_uri)
    run = client.get_run(child.run_id)
    assert run.data.tags[PARENT_TAG] == parent.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.run_id, "val_auroc")] == [0, 1, 2]
    import mlflow.pytorch

    # through the environment, as a pod gets it: set_tracking_uri would outlive the test in this
    # process ("" is not "unset": it means ./mlruns to every later test)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    logged = mlflow.pytorch.load_model(f"runs:/{child.run_id}/model").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(logged(x), load_model(model_file, torch.device("cpu")).model(x))


def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_up(
    s3_server: S3Server, tmp_path: Path
) -> None:
    port = free_ports(1)[0]
    cfg = TrackingConfig(
        f"http://127.0.0.1:{port}", experiment="outage", request_timeout_s=2, retry_interval_s=1
    )
    tracker = Tracker(cfg)
    run = tracker.start_run("fold0")
    logged_at = time.time()
    for step in range(5):
        tracker.log_metrics(run, {"train_loss": 1.0 / (step + 1)}, step=step)
    assert not tracker.flush(timeout_s=3)  # nobody listening yet: everything is buffered
    assert run.run_id is None and tracker.pending >= 6
    server = start_mlflow(tmp_path / "mlflow", s3_server.config(), port=port)
    try:
        assert tracker.close(timeout_s=120)
        history = _client(server.tracking_uri).get_metric_history(run.run_id, "train_loss")
        assert [m.step for m in history] == list(range(5))
        assert all(m.timestamp <= logged_at * 1000 + 1000 for m in history)  # measured, not delivered, times
    finally:
        server.stop()
