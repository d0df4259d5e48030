"""Retrying S3 transfers: the machinery behind :mod:`digilut.storage`'s upload and download.

boto3's own retries do not survive an S3 server restart: measured against a local SeaweedFS killed
1.5 s into a 500 MB upload and back 1 s later, its defaults (legacy mode, 5 attempts, 10 threads)
failed after 1.8 s, and even ``max_attempts=10`` failed since standard mode's retry quota is shared
by the 10 part threads and drained at once. Here:

* every request that moves data (a part, a small object, a ranged GET, the final complete) is
  retried on network errors, 5xx and throttling until ``retry_timeout_s`` has passed since its
  first failure, with capped exponential backoff; botocore itself retries once, quickly;
* a multipart upload whose part fails for good is aborted (the abort is retried with the same
  patience) and the :class:`~digilut.errors.StorageError` names endpoint, bucket, key and upload
  id. If the server is still down, the next upload of the same key aborts the leftover first (one
  writer per key is assumed, as in the pipeline);
* downloads stream into a temporary file beside the target and resume with a ranged GET pinned to
  the object's ETag after an error; size (and MD5 where the ETag is one) are checked before the
  rename, so a failed download never leaves a partial file at the final path.

Requests carry ``Content-MD5`` (the server verifies every part) and no CRC trailers, which keeps
the client compatible with older S3-compatible servers (MinIO, SeaweedFS, Ceph).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from digilut.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from digilut.storage import S3Config

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[int], None]  # called with the number of bytes just transferred
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
_MB = 1024 * 1024
# Error codes of a server that is up but cannot serve now; anything 5xx counts too.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "RequestTimeTooSkewed",
    }
)


def error_code(err: BaseException) -> tuple[str, int]:
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(err: BaseException) -> bool:
    """Whether retrying later may succeed: the network or a server that cannot serve right now."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )

    if isinstance(err, HTTPClientError | ConnectionError | IncompleteReadError | ResponseStreamingError):
        return True
    if isinstance(err, ClientError):
        code, status = error_code(err)
        return (status >= 500 and status != 501) or code in _TRANSIENT_CODES  # 501: not implemented
    try:  # a streaming body read can surface urllib3's own errors
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 comes with botocore
        return False
    return isinstance(err, Urllib3Error | ConnectionResetError | TimeoutError)


class Retrier:
    """Runs a call again after transient errors until ``timeout_s`` has passed since the first one."""

    def __init__(self, cfg: S3Config, stop: threading.Event | None = None) -> None:
        self.timeout_s = cfg.retry_timeout_s
        self.stop = stop or threading.Event()
        self.retries = 0

    def __call__(self, what: str, fn: Callable[[], T], progressed: Callable[[], bool] | None = None) -> T:
        """``fn()``, retried; ``progressed()`` true after a failure means the attempt got somewhere
        (a download wrote bytes) and restarts the clock."""
        first_failure: float | None = None
        attempt = 0
        while True:
            try:
                result = fn()
            except Exception as err:
                if not is_transient(err) or self.stop.is_set():
                    raise
                now = time.monotonic()
                if progressed is not None and progressed():
                    first_failure, attempt = None, 0
                first_failure = first_failure or now
                if now - first_failure >= self.timeout_s:
                    raise
                if attempt == 0:
                    log.warning("%s: %s; retrying for up to %.0f s", what, err, self.timeout_s)
                attempt += 1
                self.retries += 1
                delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2)
                if self.stop.wait(min(delay, max(0.0, first_failure + self.timeout_s - now))):
                    raise
                continue
            if attempt:
                log.info(
                    "%s: succeeded after %d retries (%.1f s)", what, attempt, time.monotonic() - first_failure
                )
            return result


def _content_md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def part_size_bytes(size: int, cfg: S3Config) -> int:
    """The part size used for a file of ``size`` bytes: ``part_size_mb``, grown to fit 10,000 parts."""
    part = cfg.part_size_mb * _MB
    if size > part * MAX_PARTS:
        part = -(-size // MAX_PARTS)
        part = -(-part // _MB) * _MB
    return part


def file_etag(path: Path, cfg: S3Config) -> str:
    """The ETag S3 gives ``path`` when uploaded by :func:`upload_file`: its MD5, or for a multipart
    upload the MD5 of the parts' MD5s followed by ``-<parts>``."""
    size = path.stat().st_size
    part = part_size_bytes(size, cfg)
    with open(path, "rb") as fh:
        if size <= part:
            return hashlib.file_digest(fh, "md5").hexdigest()
        digests = []
        while chunk := fh.read(part):
            digests.append(hashlib.md5(chunk).digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def storage_error(cfg: S3Config, what: str, err: BaseException) -> StorageError:
    code, status = error_code(err)
    hint = ""
    if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"} or status == 403:
        hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    elif code == "NoSuchBucket":
        hint = f" (bucket {cfg.bucket} does not exist)"
    return StorageError(f"{what} ({cfg.where}) failed: {err}{hint}")


def abort_incomplete(client: Any, cfg: S3Config, prefix: str, retry: Retrier, *, exact: bool) -> int:
    n = 0
    kwargs: dict[str, Any] = {"Bucket": cfg.bucket, "Prefix": prefix}
    while True:
        page = retry(
            f"list uploads {cfg.uri(prefix)}", lambda kw=dict(kwargs): client.list_multipart_uploads(**kw)
        )
        for up in page.get("Uploads", []):
            if exact and up["Key"] != prefix:
                continue
            retry(
                f"abort upload {up['UploadId']} of {cfg.uri(up['Key'])}",
                lambda up=up: client.abort_multipart_upload(
                    Bucket=cfg.bucket, Key=up["Key"], UploadId=up["UploadId"]
                ),
            )
            log.warning(
                "aborted an incomplete multipart upload of %s (%s)", cfg.uri(up["Key"]), up["UploadId"]
            )
            n += 1
        if not page.get("IsTruncated"):
            return n
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")


def put_file(client: Any, cfg: S3Config, path: Path, key: str, progress: Progress | None) -> None:
    key = key.lstrip("/")
    if not key:
        raise ConfigError(f"upload of {path}: empty object key")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise StorageError(f"cannot upload {path}: {err.strerror or err}") from err
    part = part_size_bytes(size, cfg)
    retry = Retrier(cfg)
    t0 = time.monotonic()
    if size <= part:
        data = path.read_bytes()
        try:
            retry(
                f"put {cfg.uri(key)}",
                lambda: client.put_object(
                    Bucket=cfg.bucket, Key=key, Body=data, ContentMD5=_content_md5(hashlib.md5(data).digest())
                ),
            )
        except Exception as err:
            raise storage_error(cfg, f"upload of {path} to key {key}", err) from err
    else:
        _upload_multipart(client, cfg, path, key, size, part, retry, progress)
    if progress and size <= part:
        progress(size)
    seconds = time.monotonic() - t0
    log.info(
        "uploaded %s -> %s: %.1f MB in %.1f s (%.0f MB/s, %d retries)",
        path.name,
        cfg.uri(key),
        size / 1e6,
        seconds,
        size / 1e6 / max(seconds, 1e-6),
        retry.retries,
    )


def _upload_multipart(
    client: Any,
    cfg: S3Config,
    path: Path,
    key: str,
    size: int,
    part: int,
    retry: Retrier,
    progress: Progress | None,
) -> None:
    what = f"upload of {path} to key {key}"
    try:  # a failed earlier attempt at this key may have left parts behind
        abort_incomplete(client, cfg, key, retry, exact=True)
    except Exception as err:
        if is_transient(err):
            raise storage_error(cfg, what, err) from err
        log.warning("cannot list incomplete uploads of %s (%s); not cleaning them", cfg.uri(key), err)
    try:
        upload_id = retry(
            f"create upload {cfg.uri(key)}",
            lambda: client.create_multipart_upload(Bucket=cfg.bucket, Key=key)["UploadId"],
        )
    except Exception as err:
        raise storage_error(cfg, what, err) from err
    n_parts = -(-size // part)
    digests: list[bytes] = [b""] * n_parts
    etags: list[str] = [""] * n_parts
    lock = threading.Lock()
    fd = os.open(path, os.O_RDONLY)

    def send(i: int) -> None:
        if retry.stop.is_set():  # another part failed for good: do not start this one
            return
        data = os.pread(fd, part, i * part)
        digest = hashlib.md5(data).digest()
        try:
            resp = retry(
                f"part {i + 1}/{n_parts} of {cfg.uri(key)}",
                lambda: client.upload_part(
                    Bucket=cfg.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=i + 1,
                    Body=data,
                    ContentMD5=_content_md5(digest),
                ),
            )
        except BaseException:
            retry.stop.set()  # the other parts give up instead of retrying on
            raise
        with lock:
            digests[i], etags[i] = digest, str(resp["ETag"])
        if progress:
            progress(len(data))

    try:
        with ThreadPoolExecutor(cfg.max_concurrency, thread_name_prefix="digilut-s3") as pool:
            futures = [pool.submit(send, i) for i in range(n_parts)]
            for fut in futures:
                try:
                    fut.result()
                except BaseException:
                    retry.stop.set()
                    for other in futures:
                        other.cancel()
                    raise
        parts = [{"PartNumber": i + 1, "ETag": etags[i]} for i in range(n_parts)]
        _complete(client, cfg, key, upload_id, parts, digests, size, retry)
    except BaseException as err:
        abort_upload(client, cfg, key, upload_id)
        if isinstance(err, Exception):
            raise storage_error(cfg, f"{what} (multipart upload {upload_id})", err) from err
        raise
    finally:
        os.close(fd)


def _complete(
    client: Any,
    cfg: S3Config,
    key: str,
    upload_id: str,
    parts: list[dict[str, Any]],
    digests: list[bytes],
    size: int,
    retry: Retrier,
) -> None:
    """Complete the upload; a retry after a lost reply finds the object already there (NoSuchUpload)."""
    expected = f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"
    tries = 0

    def complete() -> None:
        nonlocal tries
        tries += 1
        try:
            client.complete_multipart_upload(
                Bucket=cfg.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except Exception as err:
            if tries == 1 or error_code(err)[0] != "NoSuchUpload":
                raise
            head = client.head_object(Bucket=cfg.bucket, Key=key)
            if int(head["ContentLength"]) != size or str(head["ETag"]).strip('"') != expected:
                raise

    retry(f"complete {cfg.uri(key)}", complete)


def abort_upload(client: Any, cfg: S3Config, key: str, upload_id: str) -> None:
    """Abort a failed upload, as patiently as a transfer; log (not raise) if that fails too."""
    try:
        Retrier(cfg)(
            f"abort upload {upload_id} of {cfg.uri(key)}",
            lambda: client.abort_multipart_upload(Bucket=cfg.bucket, Key=key, UploadId=upload_id),
        )
        log.info("aborted the failed multipart upload %s of %s", upload_id, cfg.uri(key))
    except Exception as err:
        code, _ = error_code(err)
        if code != "NoSuchUpload":
            log.error(
                "could not abort the failed multipart upload %s of %s (%s); the next upload of this key "
                "or `digilut s3 abort-incomplete` removes it",
                upload_id,
                cfg.uri(key),
                err,
            )


def get_file(
    client: Any, cfg: S3Config, key: str, path: Path, retry: Retrier, progress: Progress | None
) -> int:
    what = f"download of key {key} to {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    t0 = time.monotonic()
    try:
        head = retry(f"head {cfg.uri(key)}", lambda: client.head_object(Bucket=cfg.bucket, Key=key))
        size, etag = int(head["ContentLength"]), str(head["ETag"])
        md5 = hashlib.md5()
        with open(tmp, "wb") as fh:
            last = [0]  # bytes written when the previous attempt started

            def progressed() -> bool:
                moved, last[0] = fh.tell() > last[0], fh.tell()
                return moved

            def fetch_rest() -> None:
                done = fh.tell()
                if done >= size:
                    return
                resp = client.get_object(Bucket=cfg.bucket, Key=key, Range=f"bytes={done}-", IfMatch=etag)
                for chunk in resp["Body"].iter_chunks(_MB):
                    fh.write(chunk)
                    md5.update(chunk)
                    if progress:
                        progress(len(chunk))
                if fh.tell() != size:
                    from botocore.exceptions import IncompleteReadError

                    raise IncompleteReadError(actual_bytes=fh.tell(), expected_bytes=size)

            retry(f"get {cfg.uri(key)}", fetch_rest, progressed)
            fh.flush()
            os.fsync(fh.fileno())
        plain = etag.strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", plain) and md5.hexdigest() != plain:
            raise StorageError(f"{what}: MD5 {md5.hexdigest()} does not match the ETag {plain}")
        os.replace(tmp, path)
    except StorageError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:
        tmp.unlink(missing_ok=True)
        code, status = error_code(err)
        if status == 404 or code in {"404", "NoSuchKey"}:
            raise StorageError(f"{what}: no object {cfg.uri(key)} at {cfg.where}") from err
        raise storage_error(cfg, what, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - t0
    log.debug("downloaded %s -> %s: %.1f MB in %.1f s", cfg.uri(key), path, size / 1e6, seconds)
    return size
