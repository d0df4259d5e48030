"""Uploads through an S3 outage: boto3's ``upload_file`` with botocore's retry modes vs
:func:`digilut.storage.upload_file` (the same s3transfer, with :class:`digilut.transfer.Patience`).

A local SeaweedFS server is SIGKILLed 1.5 s into a 512 MiB upload and restarted 1 s later (as a
pod restart of an object store would do), then the object is downloaded and compared. Also the
throughput of each client with no outage. Each run gets a fresh server. Tried: botocore's legacy
mode (boto3's default, 5 attempts, and 10 attempts: no retry quota, uncapped backoff) and standard
mode with 10 attempts (its retry quota is shared by the client's threads).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIZE_MIB = 512
KILL_AT_S = 1.5
DOWN_S = 1.0


def _boto3_upload(cfg, path: Path, key: str, *, retries: dict, concurrency: int = 10) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=Config(retries=retries, s3={"addressing_style": "path"}),
    )
    client.upload_file(str(path), cfg.bucket, key, Config=TransferConfig(max_concurrency=concurrency))


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _run(
    name: str,
    upload: Callable,
    src: Path,
    work: Path,
    outage: bool,
    kill_at_s: float = KILL_AT_S,
    down_s: float = DOWN_S,
) -> tuple[str, str, float, float | None]:
    from digilut.ops.s3_server import start_s3
    from digilut.storage import download_file, s3_client

    server = start_s3(work / re.sub(r"[^a-z0-9]+", "_", name.lower()))
    cfg = server.config()
    back_at: list[float] = []

    def chaos() -> None:
        time.sleep(kill_at_s)
        server.kill()
        time.sleep(down_s)
        server.start()
        back_at.append(time.monotonic() - t0)

    thread = threading.Thread(target=chaos) if outage else None
    t0 = time.monotonic()
    if thread:
        thread.start()
    try:
        upload(cfg, src, "bench.bin")
        seconds = time.monotonic() - t0
        result = "ok"
    except Exception as err:
        seconds = time.monotonic() - t0
        result = f"FAILED ({type(err).__name__})"
    if thread:
        thread.join()
    if result == "ok":
        got = download_file(cfg, "bench.bin", work / "back.bin")
        result = "ok, same SHA-256" if _sha256(got) == _sha256(src) else "CORRUPT"
        got.unlink()
    left = s3_client(cfg).list_multipart_uploads(Bucket=cfg.bucket).get("Uploads", [])
    if left:
        result += f", {len(left)} incomplete upload(s) left"
    server.stop()
    return name, result, seconds, (back_at[0] if back_at else None)


def main(out: Path) -> None:
    from bench import quick, write_table
    from digilut.storage import upload_file

    # quick: 16 MiB, killed 0.3 s in (the upload may finish first: figures are not meaningful)
    size_mib, kill_at_s, down_s = (16, 0.3, 0.5) if quick() else (SIZE_MIB, KILL_AT_S, DOWN_S)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        work = Path(tmp)
        src = work / "src.bin"
        rng = np.random.default_rng(0)
        with open(src, "wb") as fh:
            for _ in range(size_mib // 16):
                fh.write(rng.bytes(16 * 2**20))
        clients: list[tuple[str, Callable]] = [
            ("boto3 defaults", lambda c, p, k: _boto3_upload(c, p, k, retries={"mode": "legacy"})),
            (
                "boto3 legacy, 10 attempts",
                lambda c, p, k: _boto3_upload(c, p, k, retries={"mode": "legacy", "max_attempts": 10}),
            ),
            (
                "boto3 standard, 10 attempts",
                lambda c, p, k: _boto3_upload(c, p, k, retries={"mode": "standard", "max_attempts": 10}),
            ),
            ("digilut upload_file (s3transfer+Patience)", lambda c, p, k: upload_file(c, p, k)),
        ]
        if quick():
            clients = [clients[0], clients[-1]]  # boto3 defaults and ours
        rows = [_run(name, fn, src, work, outage=False) for name, fn in clients]
        rows += [
            _run(f"{name} + outage", fn, src, work, outage=True, kill_at_s=kill_at_s, down_s=down_s)
            for name, fn in clients
        ]

    lines = [
        f"{size_mib} MiB upload to local SeaweedFS; outage: SIGKILL at {kill_at_s} s, back after {down_s} s",
        f"{'client':<40} {'result':<45} {'time s':>7} {'MB/s':>6} {'server back at s':>17}",
    ]
    for name, result, seconds, back in rows:
        rate = size_mib * 2**20 / 1e6 / seconds if result.startswith("ok") else float("nan")
        back_s = f"{back:.1f}" if back is not None else "-"
        lines.append(f"{name:<40} {result:<45} {seconds:>7.1f} {rate:>6.0f} {back_s:>17}")
    write_table(out, "\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    colors = ["tab:green" if r[1].startswith("ok") else "tab:red" for r in rows]
    ax.barh([r[0] for r in rows], [r[2] for r in rows], color=colors)
    ax.set_xlabel("seconds until the upload returned (green: completed, red: raised)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "upload_outage.png", dpi=120)
    print(f"figure: {out / 'upload_outage.png'}")
