"""The local MLflow server: runs, artifacts proxied into the S3 bucket, loopback, process group."""

from __future__ import annotations

import http.client
import os
from pathlib import Path

import pytest
from listening import listening_addresses

from digilut.ops.mlflow_server import MlflowServer
from digilut.ops.process import group_pids
from digilut.ops.s3_server import S3Server
from digilut.storage import list_keys

pytestmark = pytest.mark.integration


def test_run_artifact_is_stored_in_the_s3_bucket(
    mlflow_server: MlflowServer, s3_server: S3Server, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    # the client has no S3 keys: the server proxies artifacts to the bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    exp_id = client.create_experiment(f"test-artifacts-{os.getpid()}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "f2", 0.5, step=1)
    report = tmp_path / "report.json"
    report.write_text('{"f2": 0.5}')
    client.log_artifact(run.info.run_id, str(report), artifact_path="eval")
    client.set_terminated(run.info.run_id)

    key = f"mlflow/{exp_id}/{run.info.run_id}/artifacts/eval/report.json"
    assert key in list_keys(s3_server.config(), "mlflow/")
    back = client.download_artifacts(run.info.run_id, "eval/report.json", str(tmp_path / "back"))
    assert Path(back).read_text() == '{"f2": 0.5}'
    assert client.get_metric_history(run.info.run_id, "f2")[0].value == 0.5


def test_mlflow_listens_on_loopback_only(mlflow_server: MlflowServer):
    addresses = listening_addresses(mlflow_server.pids())
    assert ("127.0.0.1", mlflow_server.port) in addresses
    assert {ip for ip, _ in addresses} == {"127.0.0.1"}


def test_mlflow_refuses_a_foreign_host_header(mlflow_server: MlflowServer):
    """--allowed-hosts: a page on another origin that rebinds its DNS name to 127.0.0.1 is refused."""
    conn = http.client.HTTPConnection("127.0.0.1", mlflow_server.port, timeout=10)
    conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": "evil.example"})
    assert conn.getresponse().status in {400, 403}
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", mlflow_server.port, timeout=10)
    conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1")
    assert conn.getresponse().status == 200
    conn.close()


def test_mlflow_runs_as_a_process_group(mlflow_server: MlflowServer):
    """``mlflow server`` runs uvicorn in a child process: killing only the leader would leave it
    serving. The ``mlflow_server`` fixture's teardown checks that stop() ends the whole group."""
    assert len(mlflow_server.pids()) >= 2
    assert group_pids(mlflow_server.pid or -1) == mlflow_server.pids()
