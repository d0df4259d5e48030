"""S3 object storage: listing and transfers of files and folders that survive outages.

Every function takes an :class:`~digilut.s3config.S3Config` and creates its boto3 client inside
(never at import). Transfers run on s3transfer; every request (part, range, listing page, abort) is
retried through an S3 outage of up to ``retry_timeout_s``, failed uploads are aborted and local
files are written atomically: see :mod:`digilut.transfer`. Listings use boto3's paginators.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digilut.errors import StorageError, UnsafePathError
from digilut.s3config import S3Config
from digilut.transfer import (
    Progress,
    abort_incomplete,
    error_code,
    file_etag,
    get_files,
    make_patient,
    put_file,
    storage_error,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing."""

    key: str
    size: int
    etag: str  # without quotes


@dataclass
class TransferReport:
    """What :func:`upload_dir` / :func:`download_prefix` did."""

    transferred: list[str] = field(default_factory=list)  # keys
    skipped: list[str] = field(default_factory=list)  # keys already present and identical
    nbytes: int = 0  # bytes transferred
    seconds: float = 0.0


def s3_client(cfg: S3Config, *, max_attempts: int | None = None) -> Any:
    """A boto3 S3 client for ``cfg`` with path-style addressing.

    By default it is patient: botocore tries each request once and :class:`digilut.transfer.Patience`
    retries it through an outage of up to ``retry_timeout_s``. ``max_attempts`` instead gives a
    plain client with botocore's own retries and that many attempts (health checks that must fail
    fast)."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=cfg.connect_timeout_s,
        read_timeout=cfg.read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": max_attempts or 1},
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        max_pool_connections=max(10, 2 * cfg.max_concurrency),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=config,
    )
    return client if max_attempts is not None else make_patient(client, cfg.retry_timeout_s)


def _same(path: Path, obj: ObjectInfo, cfg: S3Config) -> bool:
    """Whether local ``path`` already holds ``obj`` (size, then ETag where we can recompute it)."""
    try:
        if path.stat().st_size != obj.size:
            return False
        return file_etag(path, cfg) == obj.etag
    except OSError:
        return False


def check_bucket(cfg: S3Config, *, timeout_s: float = 3.0) -> None:
    """Fail fast, with endpoint and bucket named, when the bucket cannot be reached or read.

    One HEAD request, no retry, ``timeout_s`` to connect and to read: an unreachable endpoint fails
    in about ``timeout_s`` (a refused connection at once) instead of after boto3's retries.
    """
    from dataclasses import replace

    quick = replace(cfg, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
    client = s3_client(quick, max_attempts=1)
    try:
        client.head_bucket(Bucket=cfg.bucket)
    except Exception as err:
        code, status = error_code(err)
        if status == 404 or code in {"404", "NoSuchBucket"}:
            raise StorageError(f"bucket {cfg.bucket} does not exist at {cfg.where}") from err
        if status == 403 or code == "403":
            raise StorageError(
                f"access to bucket {cfg.bucket} denied at {cfg.where}: "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from err
        raise StorageError(f"S3 endpoint unreachable: cannot reach bucket {cfg.where}: {err}") from err


def _iter_objects(client: Any, cfg: S3Config, prefix: str) -> Iterator[ObjectInfo]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield ObjectInfo(item["Key"], int(item["Size"]), str(item.get("ETag", "")).strip('"'))


def list_objects(cfg: S3Config, prefix: str = "") -> list[ObjectInfo]:
    """Objects whose key starts with ``prefix`` (a plain string prefix, ``""`` for all), by key."""
    client = s3_client(cfg)
    try:
        return list(_iter_objects(client, cfg, prefix))
    except Exception as err:
        raise storage_error(cfg, f"list {cfg.uri(prefix)}", err) from err


def list_keys(cfg: S3Config, prefix: str = "") -> list[str]:
    """Keys that start with ``prefix``, sorted."""
    return [o.key for o in list_objects(cfg, prefix)]


def abort_incomplete_uploads(cfg: S3Config, prefix: str = "", *, exact: bool = False) -> int:
    """Abort the unfinished multipart uploads under ``prefix`` (of key ``prefix`` if ``exact``);
    return how many. Their parts otherwise stay stored (and billed) but invisible."""
    client = s3_client(cfg)
    try:
        return abort_incomplete(client, cfg, prefix, exact=exact)
    except Exception as err:
        raise storage_error(cfg, f"abort incomplete uploads under {cfg.uri(prefix)}", err) from err


def upload_file(cfg: S3Config, path: str | Path, key: str, *, progress: Progress | None = None) -> str:
    """Upload the file ``path`` to ``key``; return its ``s3://`` URI.

    Files above ``part_size_mb`` go multipart with ``max_concurrency`` parts in flight, each request
    retried through outages of up to ``retry_timeout_s`` (see :mod:`digilut.transfer`).
    """
    path = Path(path)
    client = s3_client(cfg)
    put_file(client, cfg, path, key, progress)
    return cfg.uri(key)


def download_file(cfg: S3Config, key: str, path: str | Path, *, progress: Progress | None = None) -> Path:
    """Download ``key`` to ``path`` atomically (temporary file beside it, rename); return ``path``.

    Ranged GETs pinned to the object's ETag; a range whose connection breaks mid-way is fetched
    again (its bytes reported to ``progress`` as negative first).
    """
    path = Path(path)
    client = s3_client(cfg)
    get_files(client, cfg, [(key, path)], progress)
    return path


def _join_key(prefix: str, rel: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rel}" if prefix else rel


def upload_dir(
    cfg: S3Config,
    local_dir: str | Path,
    prefix: str,
    *,
    skip_existing: bool = True,
    progress: Progress | None = None,
) -> TransferReport:
    """Upload every file under ``local_dir`` to ``prefix/<relative path>``.

    Files already present with the same size and ETag are skipped (``skip_existing``), so an
    interrupted upload of a slide folder resumes where it stopped.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir}: not a folder")
    client = s3_client(cfg)
    base = prefix.strip("/")
    report = TransferReport()
    t0 = time.monotonic()
    try:
        remote = (
            {o.key: o for o in _iter_objects(client, cfg, f"{base}/" if base else "")}
            if skip_existing
            else {}
        )
    except Exception as err:
        raise storage_error(cfg, f"list {cfg.uri(base)}", err) from err
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for p in files:
        key = _join_key(base, p.relative_to(local_dir).as_posix())
        if key in remote and _same(p, remote[key], cfg):
            report.skipped.append(key)
            continue
        put_file(client, cfg, p, key, progress)
        report.transferred.append(key)
        report.nbytes += p.stat().st_size
    report.seconds = time.monotonic() - t0
    log.info(
        "upload %s -> %s: %d files (%.1f MB) in %.1f s, %d already there",
        local_dir,
        cfg.uri(base),
        len(report.transferred),
        report.nbytes / 1e6,
        report.seconds,
        len(report.skipped),
    )
    return report


def _local_path(local_dir: Path, rel: str, key: str) -> Path:
    parts = rel.split("/")
    if any(p in {"", ".", ".."} for p in parts) or "\\" in rel:
        raise UnsafePathError(f"object key {key!r} would escape {local_dir}: refusing to download it")
    return local_dir.joinpath(*parts)


def download_prefix(
    cfg: S3Config,
    prefix: str,
    local_dir: str | Path,
    *,
    skip_existing: bool = True,
    progress: Progress | None = None,
) -> TransferReport:
    """Download every object under ``prefix`` into ``local_dir/<key relative to prefix>``.

    ``prefix`` is a folder (``a/b`` means keys under ``a/b/``). Files already present with the
    same size and ETag (MD5, or multipart MD5 as :func:`upload_file` makes it) are skipped.
    Up to ``max_concurrency`` files are fetched at once.
    """
    local_dir = Path(local_dir)
    base = prefix.strip("/")
    folder = f"{base}/" if base else ""
    client = s3_client(cfg)
    t0 = time.monotonic()
    try:
        objects = [o for o in _iter_objects(client, cfg, folder) if not o.key.endswith("/")]
    except Exception as err:
        raise storage_error(cfg, f"list {cfg.uri(folder)}", err) from err
    todo: list[tuple[ObjectInfo, Path]] = []
    report = TransferReport()
    for obj in objects:
        dest = _local_path(local_dir, obj.key[len(folder) :], obj.key)
        if skip_existing and _same(dest, obj, cfg):
            report.skipped.append(obj.key)
        else:
            todo.append((obj, dest))
    report.transferred = [obj.key for obj, _ in todo]
    report.nbytes = get_files(client, cfg, [(obj.key, dest) for obj, dest in todo], progress)
    report.seconds = time.monotonic() - t0
    log.info(
        "download %s -> %s: %d files (%.1f MB) in %.1f s, %d already there",
        cfg.uri(folder),
        local_dir,
        len(report.transferred),
        report.nbytes / 1e6,
        report.seconds,
        len(report.skipped),
    )
    return report


def read_range(client: Any, cfg: S3Config, key: str, start: int, nbytes: int, *, attempts: int = 3) -> bytes:
    """Bytes ``start .. start + nbytes - 1`` of object ``key``: one ranged GET. ``client`` is a patient
    client (:func:`s3_client`): a request that fails is retried through outages by
    :class:`digilut.transfer.Patience`; a body cut short by the network is asked for again, up to
    ``attempts`` times. An object shorter than the range, or missing, raises :class:`StorageError`
    at once (retrying cannot help)."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    end = start + nbytes - 1
    what = f"get {cfg.uri(key)} bytes {start}-{end}"
    for attempt in range(1, attempts + 1):
        try:
            resp = client.get_object(Bucket=cfg.bucket, Key=key, Range=f"bytes={start}-{end}")
            total = str(resp.get("ContentRange", "")).rpartition("/")[2]
            if total.isdigit() and int(total) <= end:
                raise StorageError(f"{what}: the object is only {total} bytes long ({cfg.where})")
            data = resp["Body"].read()
            if len(data) != nbytes:  # the connection closed early: transient
                raise IncompleteReadError(actual_bytes=len(data), expected_bytes=nbytes)
            return data
        except StorageError:
            raise
        except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as err:
            if attempt == attempts:
                raise storage_error(cfg, what, err) from err
            log.warning("%s: %s; reading it again (%d/%d)", what, err, attempt, attempts)
        except Exception as err:
            code, status = error_code(err)
            if status == 404 or code in {"404", "NoSuchKey"}:
                raise StorageError(f"{what}: no object {cfg.uri(key)} at {cfg.where}") from err
            if status == 416 or code == "InvalidRange":
                raise StorageError(f"{what}: the object is shorter than the range ({cfg.where})") from err
            raise storage_error(cfg, what, err) from err
    raise AssertionError("unreachable")


def object_size(cfg: S3Config, key: str) -> int | None:
    """Size of object ``key`` in bytes, or ``None`` when there is none (one HEAD, retried)."""
    client = s3_client(cfg)  # patient: retried through outages
    try:
        head = client.head_object(Bucket=cfg.bucket, Key=key)
    except Exception as err:
        code, status = error_code(err)
        if status == 404 or code in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise storage_error(cfg, f"head {cfg.uri(key)}", err) from err
    return int(head["ContentLength"])
