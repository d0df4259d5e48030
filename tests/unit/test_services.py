"""Process-group handling of local servers (the servers themselves are in tests/integration)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from digilut.errors import ServiceError
from digilut.ops.process import Service, free_ports, group_pids
from digilut.ops.s3_server import find_weed

# A leader that forks a child which ignores SIGTERM, as server workers sometimes do.
_FAMILY = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); "
    "time.sleep(300)"])
print("leader up", child.pid, flush=True)
time.sleep(300)
"""


def _start_family(tmp_path: Path, name: str = "family") -> Service:
    svc = Service(tmp_path / f"{name}.log")
    svc.stop_timeout_s = 0.5
    svc.launch([sys.executable, "-c", _FAMILY], dict(os.environ))
    deadline = time.monotonic() + 30
    while "child up" not in svc.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "child up" in svc.log_tail()
    return svc


def test_stop_kills_the_whole_group_even_a_child_ignoring_sigterm(tmp_path: Path):
    svc = _start_family(tmp_path)
    pgid = svc.pid
    assert pgid is not None and len(group_pids(pgid)) == 2
    svc.stop(timeout_s=0.5)
    assert group_pids(pgid) == []
    assert not svc.running()


def test_context_manager_stops_unless_keep(tmp_path: Path):
    with _start_family(tmp_path) as svc:
        pgid = svc.pid
    assert pgid is not None and group_pids(pgid) == []
    kept = _start_family(tmp_path, "kept")
    kept.keep = True
    with kept:
        pass
    try:
        assert kept.pid is not None and len(group_pids(kept.pid)) == 2
    finally:
        kept.stop(timeout_s=0.5)


def test_kill_reaps_the_group(tmp_path: Path):
    svc = _start_family(tmp_path)
    pgid = svc.pid
    svc.kill()
    assert pgid is not None and group_pids(pgid) == []


def test_wait_ready_reports_an_early_exit_with_the_log_tail(tmp_path: Path):
    svc = Service(tmp_path / "bad.log")
    svc.launch(
        [sys.executable, "-c", "import sys; print('cannot bind port 1'); sys.exit(3)"], dict(os.environ)
    )
    with pytest.raises(ServiceError, match=r"exited with code 3[\s\S]*cannot bind port 1"):
        svc._wait_ready(lambda: False, 30, "nowhere")


def test_free_ports_are_distinct_and_free():
    import socket

    ports = free_ports(12)
    assert len(set(ports)) == 12 and all(1024 <= p < 65536 for p in ports)
    held = []
    try:
        for port in ports:  # each can be bound on loopback, all at once
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()


def test_weed_binary_is_found_and_runs():
    import subprocess

    weed = find_weed()
    assert os.access(weed, os.X_OK)
    proc = subprocess.run([str(weed), "version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "version" in (proc.stdout + proc.stderr).lower()


def test_env_file_round_trip_is_private_and_quoted(tmp_path: Path):
    from digilut.ops.services import read_env_file, write_env_file
    from digilut.s3config import S3Config

    cfg = S3Config("http://127.0.0.1:9000", "digilut", access_key_id="id", secret_access_key="s'e c$r\"et")
    path = write_env_file(tmp_path / "s3.env", cfg, "http://127.0.0.1:5000")
    assert path.stat().st_mode & 0o777 == 0o600
    env = read_env_file(path)
    assert (
        env["AWS_SECRET_ACCESS_KEY"] == "s'e c$r\"et"
        and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    )
    assert S3Config.from_env(env) == cfg
    assert read_env_file(tmp_path / "none.env") == {}


def test_saved_state_stops_a_group_left_running_but_not_a_reused_pid(tmp_path: Path):
    import json

    from digilut.ops.services import running_saved, save_state, stop_saved

    svc = _start_family(tmp_path)
    state = save_state(tmp_path / "services.json", [svc])
    assert [e["pgid"] for e in running_saved(state)] == [svc.pid]
    recorded = json.loads(state.read_text())
    recorded["services"][0]["program"] = "/usr/bin/some-other-program"  # the pid was reused
    state.write_text(json.dumps(recorded))
    assert stop_saved(state) == []
    assert svc.pid is not None and len(group_pids(svc.pid)) == 2
    save_state(state, [svc])
    assert stop_saved(state, timeout_s=0.5) == ["service"]
    assert group_pids(svc.pid) == [] and not state.exists()


def test_each_server_records_the_address_clients_use(tmp_path: Path):
    from digilut.ops.mlflow_server import MlflowServer
    from digilut.ops.s3_server import S3Server
    from digilut.s3config import S3Config

    s3 = S3Server(tmp_path, {"s3": 9001}, "digilut", "key", "secret-key")
    mlflow = MlflowServer(tmp_path, S3Config(None, "digilut"), "s3://digilut/mlflow", 9002)
    assert (s3.address, mlflow.address) == ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    assert Service(tmp_path / "log").address == ""
