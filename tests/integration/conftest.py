"""Real local servers for integration tests: SeaweedFS S3 and an MLflow server proxying to it.

``s3_server`` and ``mlflow_server`` start once per session (about 2 s and 10-20 s) and are stopped
(whole process groups) at its end. Tests that kill a server use ``private_s3`` instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from digilut.ops.mlflow_server import MlflowServer, start_mlflow
from digilut.ops.process import group_pids
from digilut.ops.s3_server import S3Server, start_s3
from digilut.s3config import S3Config


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 with bucket ``digilut`` and random keys
    (``s3_server.config()`` holds them), shared by the session."""
    server = start_s3(tmp_path_factory.mktemp("s3"))
    pgid = server.pid
    yield server
    server.stop()
    assert pgid is not None and group_pids(pgid) == [], "stop() left SeaweedFS processes running"


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow server on 127.0.0.1 (SQLite store) whose artifacts go to ``s3://digilut/mlflow``
    on ``s3_server``; clients need only ``mlflow_server.tracking_uri``."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server.config())
    pgid = server.pid
    yield server
    server.stop()
    assert pgid is not None and group_pids(pgid) == [], "stop() left MLflow processes running"


@pytest.fixture
def s3_cfg(s3_server: S3Server) -> S3Config:
    """Client settings for the shared server (production defaults, 10 s retry budget)."""
    return s3_server.config(retry_timeout_s=10.0)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Config:
    """The shared server's settings exported to the environment, so ``S3Config.from_env()``
    (as pipeline components call it) reaches it."""
    cfg = s3_server.config()
    for name, value in cfg.to_env().items():
        monkeypatch.setenv(name, value)
    return cfg


@pytest.fixture
def s3_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix unique to the test, so tests sharing the bucket do not see each other's objects."""
    return "tests/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[S3Server]:
    """An S3 server of the test's own, which it may kill and restart."""
    server = start_s3(tmp_path / "s3")
    yield server
    server.kill()  # a graceful stop takes weed ~3 s; tests of stop() are elsewhere
