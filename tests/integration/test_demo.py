"""`digilut demo` (what `make demo` runs) end to end, small: tiny slides, the tiny profile, KEEP.

It starts its own SeaweedFS and MLflow servers, runs the pipeline through kfp.local from S3,
prints the summary, and with ``--keep`` leaves the servers up with ``s3.env``/``services.json``
so that ``digilut services down --dir WORK`` stops them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

from digilut.ops.services import read_env_file, running_saved
from digilut.synth import synth_dataset
from digilut.synth_plan import SynthConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLI = [str(Path(sys.executable).parent / "digilut")]


def _listening(url: str) -> bool:
    u = urlparse(url)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((u.hostname, u.port)) == 0


def test_demo_keep_then_services_down(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    # Slides made beforehand (the demo reuses WORK/data): most patients with lesions, so that each
    # fold trains on both classes.
    synth_dataset(work / "data", SynthConfig(patients=4, seed=2, size="tiny", positive_fraction=0.85))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "DIGILUT_S3"))}
    cmd = [*CLI, "demo", str(work), "--size", "tiny", "--profile", "tiny"]
    done = subprocess.run([*cmd, "--keep"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    try:
        f2 = re.search(r"mean F2 \(held-out patients\): ([0-9.]+)\s+patch AUROC: ([0-9.]+|nan)", out)
        assert f2 and 0.0 <= float(f2.group(1)) <= 1.0, out
        assert re.search(r"\[\s*\d+s\] step train-fold\s+SUCCESS", out), out  # a progress line per step
        boxes = pd.read_csv(work / "run" / "boxes.csv")
        assert {"filename", "x1", "x2", "y1", "y2", "score"} <= set(boxes.columns) and len(boxes) > 0
        assert re.search(r"results in S3: s3://digilut/runs/\d{8}-\d{6}", out)

        env_file = work / "s3.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it holds the S3 keys
        exported = read_env_file(env_file)
        assert f"source {env_file}" in out
        alive = running_saved(work / "services.json")
        assert {e["name"] for e in alive} == {"S3 (SeaweedFS)", "MLflow"}, alive
        assert _listening(exported["DIGILUT_S3_ENDPOINT"]) and _listening(exported["MLFLOW_TRACKING_URI"])

        again = subprocess.run([*cmd], capture_output=True, text=True, env=env, timeout=120)
        assert again.returncode == 1 and "digilut services down --dir" in again.stderr, again.stderr
    finally:
        down = subprocess.run(
            [*CLI, "services", "down", "--dir", str(work)], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0 and "stopped:" in down.stdout, down.stdout + down.stderr
    assert running_saved(work / "services.json") == []
    assert not _listening(exported["DIGILUT_S3_ENDPOINT"]) and not _listening(exported["MLFLOW_TRACKING_URI"])


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text.encode() in cmdline and state != "Z":
                pids.append(int(proc.name))
    return pids


def test_sigterm_during_the_pipeline_stops_servers_and_tasks(tmp_path: Path) -> None:
    """A demo stopped mid-run (Ctrl-C, SIGTERM, a CI timeout) leaves no server or task behind."""
    work = tmp_path / "stopped"
    synth_dataset(work / "data", SynthConfig(patients=2, seed=1, size="tiny"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "DIGILUT_S3"))}
    cmd = [*CLI, "demo", str(work), "--profile", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait until the pipeline runs its first task
        seen.append(line)
        if "step ingest" in line:
            break
    else:
        pytest.fail("".join(seen[-30:]))
    assert _processes_mentioning(str(work))  # servers and pipeline tasks run from the work folder
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, rest
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_mentioning(str(work)) == [], rest
