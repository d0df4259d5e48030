"""A local MLflow tracking server (SQLite store, artifacts proxied to the local S3) for the demo
and the integration tests."""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from digilut.errors import ConfigError, ServiceError
from digilut.ops.process import HOST, Service, free_ports
from digilut.s3config import S3Config

log = logging.getLogger(__name__)


class MlflowServer(Service):
    """An ``mlflow server`` on 127.0.0.1 with a SQLite store and artifacts proxied to S3."""

    name = "MLflow"

    def __init__(
        self,
        backend_dir: Path,
        s3: S3Config,
        artifacts_uri: str,
        port: int,
        *,
        workers: int = 1,
        keep: bool = False,
    ) -> None:
        super().__init__(backend_dir / "mlflow.log", keep=keep)
        self.backend_dir = backend_dir
        self.s3 = s3
        self.artifacts_uri = artifacts_uri
        self.port = port
        self.workers = workers

    def __repr__(self) -> str:
        return f"MlflowServer({self.tracking_uri}, artifacts={self.artifacts_uri!r}, pid={self.pid})"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return self.tracking_uri

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.backend_dir / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts_uri,
            "--serve-artifacts",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            # Host headers accepted (DNS-rebinding protection): this server's loopback names only
            "--allowed-hosts",
            f"{HOST}:{self.port},localhost:{self.port},{HOST},localhost",
        ]

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start (or restart, same port and store) and wait until ``/health`` answers."""
        if self.running():
            raise ServiceError(f"{self.name} already running (pid {self.pid})")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_TRACKING_URI"}
        env |= self.s3.to_env()
        # MLflow 3's job runner (huey consumers for GenAI evaluation jobs) is unused here and adds
        # processes and seconds to the start
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self.launch(self.argv(), env, cwd=self.backend_dir)
        self._wait_ready(self._healthy, timeout_s, self.tracking_uri)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False


def start_mlflow(
    backend_dir: str | Path,
    s3: S3Config,
    artifacts_uri: str | None = None,
    port: int | None = None,
    *,
    workers: int = 1,
    keep: bool = False,
    timeout_s: float = 120.0,
) -> MlflowServer:
    """Start ``mlflow server`` on 127.0.0.1 (``port``, a free one if None).

    Runs and metrics go to ``backend_dir/mlflow.db`` (SQLite); artifacts are proxied by the server
    (``--serve-artifacts``) to ``artifacts_uri`` (default ``s3://<s3.bucket>/mlflow``) with the keys
    of ``s3``, so clients need only the tracking URI, not S3 keys.
    """
    backend_dir = Path(backend_dir).resolve()
    backend_dir.mkdir(parents=True, exist_ok=True)
    artifacts_uri = artifacts_uri or f"s3://{s3.bucket}/mlflow"
    if not artifacts_uri.startswith("s3://"):
        raise ConfigError(f"artifacts_uri={artifacts_uri!r}: expected s3://bucket/prefix")
    if workers < 1:
        raise ConfigError(f"workers={workers} must be ≥ 1")
    port = port or free_ports(1)[0]
    server = MlflowServer(backend_dir, s3, artifacts_uri, port, workers=workers, keep=keep)
    return server.start(timeout_s)
