"""S3 settings: where the bucket is, how patient transfers are, and ``s3://bucket/prefix`` URIs.

A plain, validated dataclass with no boto3 import, so every module that only names a bucket
(:mod:`digilut.locations`, the local services, the CLI) depends on this and not on the transfers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from digilut.errors import ConfigError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DEFAULT_BUCKET = "digilut"


@dataclass(frozen=True)
class S3Config:
    """Where the bucket is and how patient transfers are. Keys are never shown in repr or logs.

    ``endpoint_url=None`` means AWS S3; credentials left ``None`` come from boto3's usual chain
    (environment, config files, a pod's service account).
    """

    endpoint_url: str | None
    bucket: str = _DEFAULT_BUCKET
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 5.0  # per TCP connect
    read_timeout_s: float = 60.0  # per socket read
    retry_timeout_s: float = 120.0  # how long one transfer keeps retrying through an outage
    part_size_mb: int = 16  # multipart part size (files above it go multipart)
    max_concurrency: int = 4  # parts (or files, for downloads) in flight at once

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ConfigError(
                f"endpoint_url={self.endpoint_url!r}: expected http(s)://host[:port], or None for AWS S3"
            )
        if not _BUCKET_RE.match(self.bucket) or ".." in self.bucket:
            raise ConfigError(
                f"bucket={self.bucket!r}: S3 bucket names are 3-63 characters of a-z, 0-9, '.' and '-', "
                "starting and ending with a letter or digit"
            )
        if not self.region:
            raise ConfigError("region must be a non-empty name such as 'us-east-1'")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError(
                "access_key_id and secret_access_key must be given together (or both left unset to "
                "use boto3's credential chain)"
            )
        if min(self.connect_timeout_s, self.read_timeout_s, self.retry_timeout_s) <= 0:
            raise ConfigError(
                f"connect_timeout_s={self.connect_timeout_s}, read_timeout_s={self.read_timeout_s}, "
                f"retry_timeout_s={self.retry_timeout_s} must all be > 0"
            )
        if not 5 <= self.part_size_mb <= 5120:
            raise ConfigError(f"part_size_mb={self.part_size_mb}: S3 parts are 5 to 5120 MB")
        if not 1 <= self.max_concurrency <= 64:
            raise ConfigError(f"max_concurrency={self.max_concurrency}: expected 1 to 64")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> S3Config:
        """Settings from the environment; keyword ``overrides`` win over it.

        Endpoint: ``DIGILUT_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
        ``MLFLOW_S3_ENDPOINT_URL``, else AWS S3. Bucket: ``DIGILUT_BUCKET`` (default
        ``digilut``). Region: ``AWS_DEFAULT_REGION`` (default ``us-east-1``). Keys:
        ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.
        """
        env = os.environ if environ is None else environ
        endpoint = next(
            (
                env[name]
                for name in (
                    "DIGILUT_S3_ENDPOINT",
                    "AWS_ENDPOINT_URL_S3",
                    "AWS_ENDPOINT_URL",
                    "MLFLOW_S3_ENDPOINT_URL",
                )
                if env.get(name)
            ),
            None,
        )
        values: dict[str, Any] = {
            "endpoint_url": endpoint,
            "bucket": env.get("DIGILUT_BUCKET") or _DEFAULT_BUCKET,
            "region": env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
            "access_key_id": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY") or None,
        }
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """Environment variables that make :meth:`from_env`, boto3 and MLflow reach this bucket."""
        env = {"DIGILUT_BUCKET": self.bucket, "AWS_DEFAULT_REGION": self.region}
        if self.endpoint_url:
            env["DIGILUT_S3_ENDPOINT"] = env["MLFLOW_S3_ENDPOINT_URL"] = self.endpoint_url
        if self.access_key_id and self.secret_access_key:
            env["AWS_ACCESS_KEY_ID"] = self.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key
        return env

    @property
    def where(self) -> str:
        """Endpoint and bucket for messages: ``s3://bucket at http://host:port``."""
        return f"s3://{self.bucket} at {self.endpoint_url or f'AWS S3 ({self.region})'}"

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")`` (prefix may be empty)."""
    m = re.match(r"^s3://([^/]+)/?(.*)$", uri)
    if not m:
        raise ConfigError(f"{uri!r}: expected an S3 URI such as s3://bucket/prefix")
    bucket, prefix = m.group(1), m.group(2)
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"{uri!r}: {bucket!r} is not a valid S3 bucket name")
    return bucket, prefix
