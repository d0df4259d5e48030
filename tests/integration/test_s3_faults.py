"""Transfers through S3 server outages: a server SIGKILLed mid-transfer, back after 1 s or never.

The kill is triggered by the transfer's own progress (first part or first MB done), not by a
timer, so the outage always falls inside the transfer whatever the machine's speed; parts still in
flight are cut mid-request and the ones after it meet a refused connection.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from digilut.errors import StorageError
from digilut.ops.s3_server import S3Server
from digilut.storage import abort_incomplete_uploads, download_file, s3_client, upload_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 2**20


def _write_random(path: Path, nbytes: int) -> Path:
    rng = np.random.default_rng(7)
    with open(path, "wb") as fh:
        for _ in range(nbytes // (16 * MiB)):
            fh.write(rng.bytes(16 * MiB))
        fh.write(rng.bytes(nbytes % (16 * MiB)))
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 MiB of random bytes: 10 parts of 8 MiB, 4 in flight (the default concurrency)."""
    return _write_random(tmp_path_factory.mktemp("faults") / "big.bin", 80 * MiB)


@pytest.fixture(scope="module")
def mid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """28 MiB: 4 parts of 8 MiB (the last short), all in flight when the server dies."""
    return _write_random(tmp_path_factory.mktemp("faults") / "mid.bin", 28 * MiB)


def _uploads(server: S3Server) -> list[dict]:
    cfg = server.config()
    return s3_client(cfg).list_multipart_uploads(Bucket=cfg.bucket).get("Uploads", [])


class Outage:
    """A progress callback that SIGKILLs ``server`` at the first progress report and, if
    ``down_s`` is given, restarts it that many seconds later (in a thread)."""

    def __init__(self, server: S3Server, down_s: float | None) -> None:
        self.server = server
        self.down_s = down_s
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.nbytes = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.nbytes += nbytes
            if self.killed_at is not None:
                return
            self.server.kill()  # synchronously: the transfer cannot finish before the outage
            self.killed_at = time.monotonic()
        if self.down_s is not None:
            self._thread = threading.Thread(target=self._restart)
            self._thread.start()

    def _restart(self) -> None:
        time.sleep(self.down_s or 0)
        self.server.start()
        self.back_at = time.monotonic()

    def join(self) -> None:
        if self._thread:
            self._thread.join()


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    t0 = time.monotonic()
    fn()
    return t0, time.monotonic()


def test_upload_survives_a_server_restart(private_s3: S3Server, big_file: Path, tmp_path, caplog):
    cfg = private_s3.config(part_size_mb=8)  # otherwise the defaults: 4 parts in flight, 120 s
    outage = Outage(private_s3, down_s=1.0)
    with caplog.at_level(logging.INFO, logger="digilut"):
        t0, t1 = _timed(lambda: upload_file(cfg, big_file, "slides/big.bin", progress=outage))
    outage.join()
    assert outage.killed_at is not None and outage.back_at is not None and outage.back_at < t1
    assert any("retrying" in r.getMessage() for r in caplog.records)  # the outage was met
    got = download_file(cfg, "slides/big.bin", tmp_path / "big.bin")
    assert _sha256(got) == _sha256(big_file)
    assert _uploads(private_s3) == []
    logging.getLogger(__name__).warning(
        "upload %.1f s; killed at %.1f s, back (ready) at %.1f s",
        t1 - t0,
        outage.killed_at - t0,
        outage.back_at - t0,
    )


def test_download_resumes_after_a_server_restart(private_s3: S3Server, big_file: Path, tmp_path, caplog):
    cfg = private_s3.config()
    upload_file(cfg, big_file, "slides/big.bin")
    outage = Outage(private_s3, down_s=1.0)
    dest = tmp_path / "down" / "big.bin"
    with caplog.at_level(logging.INFO, logger="digilut"):
        download_file(cfg, "slides/big.bin", dest, progress=outage)
    outage.join()
    assert outage.back_at is not None
    assert any("retrying" in r.getMessage() for r in caplog.records)
    assert _sha256(dest) == _sha256(big_file)
    assert outage.nbytes == big_file.stat().st_size  # resumed: no byte fetched twice
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temporary file left


class _RestartWhenAborting(logging.Handler):
    """Restarts the server once the upload has given up on its parts and starts aborting."""

    def __init__(self, server: S3Server) -> None:
        super().__init__()
        self.server = server
        self.thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.thread is None and record.getMessage().startswith("abort upload"):
            self.thread = threading.Thread(target=self.server.start)
            self.thread.start()


def test_failed_upload_is_aborted_when_the_server_returns_during_the_abort(
    private_s3: S3Server, mid_file: Path
):
    """Parts give up after retry_timeout_s; the abort, retried as long, reaches the server back."""
    cfg = private_s3.config(part_size_mb=8, retry_timeout_s=5.0)
    handler = _RestartWhenAborting(private_s3)
    logger = logging.getLogger("digilut.transfer")
    logger.addHandler(handler)
    try:
        with pytest.raises(StorageError) as err:
            upload_file(cfg, mid_file, "slides/late.bin", progress=Outage(private_s3, down_s=None))
    finally:
        logger.removeHandler(handler)
    assert handler.thread is not None
    handler.thread.join()
    assert "slides/late.bin" in str(err.value) and private_s3.endpoint_url in str(err.value)
    assert _uploads(private_s3) == []


def test_upload_with_the_server_down_for_good_fails_and_the_next_upload_cleans_up(
    private_s3: S3Server, mid_file: Path, tmp_path
):
    cfg = private_s3.config(part_size_mb=8, retry_timeout_s=2.0)
    outage = Outage(private_s3, down_s=None)
    with pytest.raises(StorageError) as err:
        upload_file(cfg, mid_file, "slides/stuck.bin", progress=outage)
    message = str(err.value)
    assert "slides/stuck.bin" in message and private_s3.endpoint_url in message
    assert "multipart upload" in message  # names the upload id that was left
    private_s3.start()
    left = _uploads(private_s3)
    assert [u["Key"] for u in left] == ["slides/stuck.bin"] and left[0]["UploadId"] in message
    upload_file(cfg, mid_file, "slides/stuck.bin")  # a retry of the step: aborts the leftover first
    assert _uploads(private_s3) == []
    assert _sha256(download_file(cfg, "slides/stuck.bin", tmp_path / "stuck.bin")) == _sha256(mid_file)
    assert abort_incomplete_uploads(cfg, "slides/") == 0
