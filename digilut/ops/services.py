"""The local services as a set (S3 in :mod:`digilut.ops.s3_server`, MLflow in
:mod:`digilut.ops.mlflow_server`, process groups in :mod:`digilut.ops.process`): the environment
file that points clients at them, and the record of servers left running (``--keep``) that a later
``digilut services down`` stops."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from digilut.ops.process import Service, group_pids, stop_group
from digilut.s3config import S3Config


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
        entries.append(
            {"name": svc.name, "pgid": svc.pid, "program": _program(svc.pid), "address": svc.address}
        )
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
