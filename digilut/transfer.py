"""S3 transfers on s3transfer, made patient enough to outlast an S3 server restart.

s3transfer (the transfer manager behind boto3's ``upload_file``/``download_file``) does the work:
multipart upload with parts in parallel and the abort of a failed one, parallel ranged downloads
pinned to the object's ETag (``IfMatch``) into a temporary file renamed at the end, and re-reading
a range whose body breaks mid-way. Its patience is botocore's retry mode. Measured with
``python -m bench storage`` (512 MiB upload to a local SeaweedFS SIGKILLed 1.5 s in, ready again
4.3-8.9 s in): standard mode with 10 attempts failed after 2.8 s (its retry quota is shared by the
part threads), legacy mode with 5 (boto3's default) or 10 attempts completed. Legacy mode bounds
an outage by a number of attempts with uncapped random exponential backoff (5 attempts: at most
15 s asleep, 10: up to 511 s), not by time, and logs nothing; with one attempt, s3transfer fails 3
of the 4 outage tests (tests/integration/test_s3_faults.py). So botocore tries each request once
and a ``needs-retry`` handler, :class:`Patience`, retries *every request* (a part, a range, the
complete, the abort, a listing page) on network errors, 5xx and throttling until
``retry_timeout_s`` has passed since that request's first failure (capped exponential backoff),
logging the first failure and the outcome. Hence:

* an outage shorter than ``retry_timeout_s`` costs only the requests in flight, resent;
* a multipart upload that fails for good is aborted by s3transfer, that abort being as patient;
  the :class:`~digilut.errors.StorageError` names endpoint, bucket, key and upload id. If the
  server is still down, the next upload of the same key aborts the leftover first (one writer per
  key is assumed, as in the pipeline);
* a failed download leaves nothing at the target path (s3transfer deletes its temporary file).

Every PUT carries ``Content-MD5`` (the server verifies every part) and no CRC trailers, which keeps
the client compatible with older S3-compatible servers (MinIO, SeaweedFS, Ceph).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from digilut.errors import ConfigError, StorageError
from digilut.s3config import S3Config

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of bytes just transferred (< 0: resent)
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
_FIRST_FAILURE = "digilut_first_failure"  # key in botocore's per-request context


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


def _describe(operation: str, request: dict[str, Any]) -> str:
    """``abort upload <id> of s3://bucket/key``, ``part 3 of …``: what a request does, for the log."""
    uri = "s3:/" + str(request.get("url_path", "")).split("?")[0]
    query = request.get("query_string") or {}
    upload_id = query.get("uploadId", "") if isinstance(query, dict) else ""
    return {
        "AbortMultipartUpload": f"abort upload {upload_id} of {uri}",
        "UploadPart": f"part {query.get('partNumber', '?') if isinstance(query, dict) else '?'} of {uri}",
        "CompleteMultipartUpload": f"complete {uri}",
        "CreateMultipartUpload": f"create upload {uri}",
        "PutObject": f"put {uri}",
        "GetObject": f"get {uri}",
        "HeadObject": f"head {uri}",
        "ListObjectsV2": f"list {uri}",
        "ListMultipartUploads": f"list uploads {uri}",
    }.get(operation, f"{operation} {uri}")


class Patience:
    """A botocore ``needs-retry`` handler: retry a request after transient errors until
    ``timeout_s`` has passed since its first failure (capped exponential backoff with jitter)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.retries = 0
        self._lock = threading.Lock()

    def __call__(
        self,
        response: tuple[Any, dict[str, Any]] | None = None,
        caught_exception: BaseException | None = None,
        attempts: int = 1,
        operation: Any = None,
        request_dict: dict[str, Any] | None = None,
        **_: Any,
    ) -> float | None:
        request = request_dict or {}
        context = request.setdefault("context", {})
        if caught_exception is not None:
            transient, why = is_transient(caught_exception), str(caught_exception)
        elif response is not None:
            http, parsed = response
            code = str((parsed or {}).get("Error", {}).get("Code", ""))
            status = int(http.status_code)
            transient = (status >= 500 and status != 501) or code in _TRANSIENT_CODES
            why = f"HTTP {status} {code}".strip()
        else:
            return None
        what = _describe(getattr(operation, "name", "?"), request)
        first = context.get(_FIRST_FAILURE)
        if not transient:
            if first is not None:
                log.info("%s: succeeded after %d tries (%.1f s)", what, attempts, time.monotonic() - first)
            return None
        now = time.monotonic()
        if first is None:
            first = context[_FIRST_FAILURE] = now
            log.warning("%s: %s; retrying for up to %.0f s", what, why, self.timeout_s)
        left = first + self.timeout_s - now
        if left <= 0:
            log.warning("%s: giving up after %d tries (%.1f s): %s", what, attempts, now - first, why)
            return None
        with self._lock:
            self.retries += 1
        return min(left, min(5.0, 0.1 * 2**attempts) * (0.5 + random.random() / 2))


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    """``before-call`` handler for PutObject/UploadPart: the body's MD5 as ``Content-MD5``."""
    headers, body = params["headers"], params["body"]
    if "Content-MD5" in headers:
        return
    if isinstance(body, bytes | bytearray):
        digest = hashlib.md5(body).digest()
    else:  # s3transfer's file chunk: read it without reporting progress, then rewind
        start = body.tell()
        quiet = getattr(body, "disable_callback", None)
        if quiet:
            quiet()
        md5 = hashlib.md5()
        while chunk := body.read(_MB):
            md5.update(chunk)
        body.seek(start)
        if quiet:
            body.enable_callback()
        digest = md5.digest()
    headers["Content-MD5"] = base64.b64encode(digest).decode()


class UploadIds:
    """Remembers the multipart uploads a client creates and aborts (``after-call`` handlers), so a
    failed transfer can name its upload and say whether it is still there."""

    def __init__(self) -> None:
        self.created: dict[str, str] = {}  # key -> latest upload id
        self.gone: set[str] = set()  # upload ids aborted (or already absent)
        self._lock = threading.Lock()

    def on_create(self, parsed: dict[str, Any], **_: Any) -> None:
        if parsed.get("UploadId"):
            with self._lock:
                self.created[str(parsed.get("Key", ""))] = str(parsed["UploadId"])

    def on_abort_request(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["digilut_upload_id"] = (params.get("query_string") or {}).get("uploadId", "")

    def on_abort(self, http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        code = (parsed or {}).get("Error", {}).get("Code")
        if http_response.status_code < 300 or code == "NoSuchUpload":
            with self._lock:
                self.gone.add(context.get("digilut_upload_id", ""))


def make_patient(client: Any, timeout_s: float) -> Any:
    """Install :class:`Patience`, ``Content-MD5`` and :class:`UploadIds` on a botocore S3 client
    (whose own retries are set to one attempt); return the client."""
    events = client.meta.events
    events.register("needs-retry.s3", Patience(timeout_s), unique_id="digilut-patience")
    for op in ("PutObject", "UploadPart"):
        events.register(f"before-call.s3.{op}", _add_content_md5, unique_id=f"digilut-md5-{op}")
    ids = UploadIds()
    events.register("after-call.s3.CreateMultipartUpload", ids.on_create, unique_id="digilut-ids-create")
    events.register("before-call.s3.AbortMultipartUpload", ids.on_abort_request, unique_id="digilut-ids-a0")
    events.register("after-call.s3.AbortMultipartUpload", ids.on_abort, unique_id="digilut-ids-a1")
    client.digilut_upload_ids = ids
    return client


def part_size_bytes(size: int, cfg: S3Config) -> int:
    """The part size used for a file of ``size`` bytes: ``part_size_mb``, grown to fit 10,000 parts."""
    part = cfg.part_size_mb * _MB
    if size > part * MAX_PARTS:
        part = -(-size // MAX_PARTS)
        part = -(-part // _MB) * _MB
    return part


def transfer_config(cfg: S3Config, part: int | None = None) -> Any:
    """s3transfer settings: files above ``part`` bytes go multipart in parts of ``part`` bytes (so
    :func:`file_etag` predicts the ETag), ``max_concurrency`` requests in flight."""
    from s3transfer.manager import TransferConfig

    part = part or cfg.part_size_mb * _MB
    return TransferConfig(
        multipart_threshold=part + 1,
        multipart_chunksize=part,
        max_request_concurrency=cfg.max_concurrency,
        num_download_attempts=10,  # re-reads of a range whose body broke mid-way
    )


def file_etag(path: Path, cfg: S3Config) -> str:
    """The ETag S3 gives ``path`` when uploaded by :func:`put_file`: its MD5, or for a multipart
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


def abort_incomplete(client: Any, cfg: S3Config, prefix: str, *, exact: bool) -> int:
    """Abort the unfinished multipart uploads under ``prefix`` (of key ``prefix`` if ``exact``)."""
    n = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=cfg.bucket, Prefix=prefix):
        for up in page.get("Uploads", []):
            if exact and up["Key"] != prefix:
                continue
            client.abort_multipart_upload(Bucket=cfg.bucket, Key=up["Key"], UploadId=up["UploadId"])
            log.warning(
                "aborted an incomplete multipart upload of %s (%s)", cfg.uri(up["Key"]), up["UploadId"]
            )
            n += 1
    return n


def _manager(client: Any, config: Any, progress: Progress | None) -> tuple[Any, list[Any] | None]:
    """An s3transfer ``TransferManager`` and the subscribers that forward its progress."""
    from s3transfer.manager import TransferManager
    from s3transfer.subscribers import BaseSubscriber

    if progress is None:
        return TransferManager(client, config), None
    report = progress

    class Forward(BaseSubscriber):
        def on_progress(self, bytes_transferred: int, **_: Any) -> None:
            report(bytes_transferred)

    return TransferManager(client, config), [Forward()]


def put_file(client: Any, cfg: S3Config, path: Path, key: str, progress: Progress | None) -> None:
    """Upload ``path`` to ``key`` with a client from :func:`make_patient`."""
    key = key.lstrip("/")
    if not key:
        raise ConfigError(f"upload of {path}: empty object key")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise StorageError(f"cannot upload {path}: {err.strerror or err}") from err
    what = f"upload of {path} to key {key}"
    part = part_size_bytes(size, cfg)
    ids: UploadIds = client.digilut_upload_ids
    t0 = time.monotonic()
    if size > part:  # a failed earlier attempt at this key may have left parts behind
        try:
            abort_incomplete(client, cfg, key, exact=True)
        except Exception as err:
            if is_transient(err):
                raise storage_error(cfg, what, err) from err
            log.warning("cannot list incomplete uploads of %s (%s); not cleaning them", cfg.uri(key), err)
    manager, subscribers = _manager(client, transfer_config(cfg, part), progress)
    with manager:
        future = manager.upload(str(path), cfg.bucket, key, subscribers=subscribers)
        try:
            future.result()
        except Exception as err:
            upload_id = ids.created.get(key) if size > part else None
            if upload_id and _completed_anyway(client, cfg, path, key, err):
                log.info("%s: the complete's reply was lost but the object is there", cfg.uri(key))
            elif upload_id:
                if upload_id not in ids.gone:
                    log.error(
                        "could not abort the failed multipart upload %s of %s; the next upload of "
                        "this key or `digilut s3 abort-incomplete` removes it",
                        upload_id,
                        cfg.uri(key),
                    )
                raise storage_error(cfg, f"{what} (multipart upload {upload_id})", err) from err
            else:
                raise storage_error(cfg, what, err) from err
    seconds = time.monotonic() - t0
    log.info(
        "uploaded %s -> %s: %.1f MB in %.1f s (%.0f MB/s)",
        path.name,
        cfg.uri(key),
        size / 1e6,
        seconds,
        size / 1e6 / max(seconds, 1e-6),
    )


def _completed_anyway(client: Any, cfg: S3Config, path: Path, key: str, err: BaseException) -> bool:
    """A complete retried after its reply was lost meets ``NoSuchUpload``: the object may be there."""
    if error_code(err)[0] != "NoSuchUpload":
        return False
    try:
        head = client.head_object(Bucket=cfg.bucket, Key=key)
    except Exception:
        return False
    etag = str(head["ETag"]).strip('"')
    return int(head["ContentLength"]) == path.stat().st_size and etag == file_etag(path, cfg)


def get_files(
    client: Any, cfg: S3Config, items: Iterable[tuple[str, Path]], progress: Progress | None
) -> int:
    """Download ``(key, path)`` pairs, ``max_concurrency`` requests in flight; return the bytes.

    Each file is written to a temporary file beside ``path`` and renamed when complete; ranges are
    pinned to the object's ETag. A missing key names it; nothing is left at a failed ``path``.
    """
    total = 0
    manager, subscribers = _manager(client, transfer_config(cfg), progress)
    with manager:
        futures = []
        for key, path in items:
            path.parent.mkdir(parents=True, exist_ok=True)
            futures.append((key, path, manager.download(cfg.bucket, key, str(path), subscribers=subscribers)))
        for key, path, future in futures:
            what = f"download of key {key} to {path}"
            try:
                future.result()
            except Exception as err:
                code, status = error_code(err)
                if status == 404 or code in {"404", "NoSuchKey"}:
                    raise StorageError(f"{what}: no object {cfg.uri(key)} at {cfg.where}") from err
                raise storage_error(cfg, what, err) from err
            total += future.meta.size or 0
    return total
