"""Server processes in their own process group: start, readiness, stop (the whole group), free
ports — the part of the local services (:mod:`digilut.ops.s3_server`, :mod:`digilut.ops.mlflow_server`)
that is no particular server.

Each server runs in its own process group (``start_new_session=True``) and :meth:`Service.stop`
signals the whole group: ``mlflow server`` forks uvicorn workers and SeaweedFS's ``weed`` runs
several servers, and killing only the leader leaves them running. Ports are free ones chosen at
start (every port the server opens, not only the public one), everything binds 127.0.0.1, and
servers are context managers (``keep=True`` leaves them up after the ``with`` block).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from digilut.errors import ServiceError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


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

    @property
    def address(self) -> str:
        """Where clients reach the server (its URL)."""
        return ""

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
