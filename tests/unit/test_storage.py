"""S3 settings, URIs, ETags, error classes and key safety (no server: transfers are in
tests/integration)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from digilut.errors import ConfigError, UnsafePathError
from digilut.s3config import S3Config, parse_s3_uri
from digilut.storage import _local_path
from digilut.transfer import MAX_PARTS, file_etag, is_transient, part_size_bytes

SECRET = "very-secret-value-123"


def test_repr_and_str_hide_the_keys():
    cfg = S3Config("http://127.0.0.1:9000", "digilut", access_key_id="AKIDVISIBLE", secret_access_key=SECRET)
    for text in (repr(cfg), str(cfg), cfg.where):
        assert SECRET not in text
        assert "AKIDVISIBLE" not in text
    assert "127.0.0.1:9000" in repr(cfg)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"endpoint_url": "localhost:9000"}, "endpoint_url"),
        ({"bucket": "Has_Upper"}, "bucket"),
        ({"bucket": "ab"}, "bucket"),
        ({"access_key_id": "only-id"}, "together"),
        ({"retry_timeout_s": 0}, "retry_timeout_s"),
        ({"part_size_mb": 4}, "part_size_mb"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_config_rejects_invalid_values_naming_them(kwargs, named):
    values = {"endpoint_url": "http://127.0.0.1:9000", "bucket": "digilut", **kwargs}
    with pytest.raises(ConfigError, match=named):
        S3Config(**values)


def test_from_env_reads_endpoint_bucket_region_keys_and_overrides_win():
    env = {
        "DIGILUT_S3_ENDPOINT": "http://minio:9000",
        "MLFLOW_S3_ENDPOINT_URL": "http://other:1",
        "DIGILUT_BUCKET": "slides",
        "AWS_DEFAULT_REGION": "eu-west-3",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    cfg = S3Config.from_env(env)
    assert (cfg.endpoint_url, cfg.bucket, cfg.region) == ("http://minio:9000", "slides", "eu-west-3")
    assert (cfg.access_key_id, cfg.secret_access_key) == ("id", SECRET)
    assert S3Config.from_env(env, bucket="other").bucket == "other"
    assert S3Config.from_env(cfg.to_env()) == cfg  # to_env is what a subprocess needs


def test_from_env_falls_back_to_mlflow_endpoint_then_aws_and_default_bucket():
    assert S3Config.from_env({"MLFLOW_S3_ENDPOINT_URL": "http://m:9000"}).endpoint_url == "http://m:9000"
    cfg = S3Config.from_env({})
    assert cfg.endpoint_url is None and cfg.bucket == "digilut" and cfg.access_key_id is None


def test_replace_revalidates():
    cfg = S3Config("http://127.0.0.1:9000")
    with pytest.raises(ConfigError, match="bucket"):
        replace(cfg, bucket="no_underscores")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://digilut", ("digilut", "")),
        ("s3://digilut/", ("digilut", "")),
        ("s3://digilut/data/images", ("digilut", "data/images")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["digilut/data", "http://digilut/x", "s3://", "s3://Bad_Bucket/x"])
def test_parse_s3_uri_rejects(uri):
    with pytest.raises(ConfigError, match=r"s3://|bucket"):
        parse_s3_uri(uri)


def test_part_size_grows_so_a_huge_file_fits_in_10000_parts():
    cfg = S3Config(None, part_size_mb=16)
    assert part_size_bytes(100 * 2**20, cfg) == 16 * 2**20
    huge = 400 * 2**30  # 400 GiB: 16 MiB parts would need 25,600
    part = part_size_bytes(huge, cfg)
    assert part % 2**20 == 0 and -(-huge // part) <= MAX_PARTS


def test_file_etag_is_md5_for_one_part_and_md5_of_md5s_for_multipart(tmp_path: Path):
    cfg = S3Config(None, part_size_mb=5)
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert file_etag(small, cfg) == hashlib.md5(b"x" * 1000).hexdigest()
    part = 5 * 2**20
    data = bytes(range(256)) * (part * 2 // 256) + b"tail"
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    chunks = [data[:part], data[part : 2 * part], data[2 * part :]]
    expected = hashlib.md5(b"".join(hashlib.md5(c).digest() for c in chunks)).hexdigest() + "-3"
    assert file_etag(big, cfg) == expected


@pytest.mark.parametrize("rel", ["../escape.tif", "a/../../b", "/abs/path", "a//b", "a\\..\\b", ""])
def test_keys_that_would_escape_the_download_folder_are_refused(tmp_path: Path, rel):
    with pytest.raises(UnsafePathError, match="escape"):
        _local_path(tmp_path, rel, "prefix/" + rel)


def test_safe_key_maps_under_the_folder(tmp_path: Path):
    assert _local_path(tmp_path, "images/p1_a.tif", "data/images/p1_a.tif") == tmp_path / "images/p1_a.tif"


def test_transient_errors_are_network_and_5xx_not_auth_or_missing():
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("SlowDown", 503))
    assert not is_transient(client_error("AccessDenied", 403))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(ValueError("bug"))
