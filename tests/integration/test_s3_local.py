"""The local S3 server and the storage functions against it: transfers, auth, binding, failures."""

from __future__ import annotations

import hashlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from listening import listening_addresses

from digilut.errors import StorageError
from digilut.ops.process import free_ports
from digilut.ops.s3_server import S3Server
from digilut.s3config import S3Config
from digilut.storage import (
    check_bucket,
    download_file,
    download_prefix,
    list_keys,
    list_objects,
    s3_client,
    upload_dir,
    upload_file,
)
from digilut.transfer import file_etag

pytestmark = pytest.mark.integration


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _random_file(path: Path, nbytes: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np_random_bytes(nbytes, seed))
    return path


def np_random_bytes(nbytes: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).bytes(nbytes)


def test_multipart_and_small_files_round_trip_with_same_checksum(s3_cfg, s3_prefix, tmp_path):
    cfg = replace(s3_cfg, part_size_mb=5)
    big = _random_file(tmp_path / "big.bin", 23 * 2**20 + 123)  # 5 parts, the last one short
    small = _random_file(tmp_path / "small.bin", 1000, seed=1)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    for f in (big, small, empty):
        assert upload_file(cfg, f, f"{s3_prefix}/{f.name}") == f"s3://digilut/{s3_prefix}/{f.name}"
    objects = {o.key: o for o in list_objects(cfg, s3_prefix)}
    assert objects[f"{s3_prefix}/big.bin"].etag == file_etag(big, cfg)
    assert objects[f"{s3_prefix}/big.bin"].etag.endswith("-5")
    for f in (big, small, empty):
        got = download_file(cfg, f"{s3_prefix}/{f.name}", tmp_path / "down" / f.name)
        assert _sha256(got) == _sha256(f)
    assert sorted(p.name for p in (tmp_path / "down").iterdir()) == ["big.bin", "empty.bin", "small.bin"]
    uploads = s3_client(cfg).list_multipart_uploads(Bucket=cfg.bucket, Prefix=s3_prefix)
    assert uploads.get("Uploads", []) == []


def test_every_put_carries_the_content_md5_of_its_bytes(s3_cfg, s3_prefix, tmp_path):
    """The server verifies each part against it: a part corrupted in transit is refused, not stored."""
    import base64

    from digilut.transfer import put_file

    cfg = replace(s3_cfg, part_size_mb=5)
    data = np_random_bytes(11 * 2**20, seed=4)  # 3 parts
    (tmp_path / "f.bin").write_bytes(data)
    sent: list[tuple[str, str | None, int]] = []

    def record(operation_name, request, **_):
        body = request.body
        pos = body.tell()
        content = body.read()
        body.seek(pos)
        md5 = request.headers.get("Content-MD5")
        sent.append((operation_name, md5.decode() if isinstance(md5, bytes) else md5, len(content)))
        assert md5 and base64.b64decode(md5) == hashlib.md5(content).digest()

    client = s3_client(cfg)
    for op in ("UploadPart", "PutObject"):
        client.meta.events.register(f"before-send.s3.{op}", lambda op=op, **kw: record(op, **kw))
    put_file(client, cfg, tmp_path / "f.bin", f"{s3_prefix}/f.bin", None)
    put_file(client, cfg, _random_file(tmp_path / "s.bin", 1000, seed=5), f"{s3_prefix}/s.bin", None)
    assert sorted((op, n) for op, _, n in sent) == [
        ("PutObject", 1000),
        ("UploadPart", 2**20),
        ("UploadPart", 5 * 2**20),
        ("UploadPart", 5 * 2**20),
    ]


def test_upload_dir_then_download_prefix_skip_identical_files_only(s3_cfg, s3_prefix, tmp_path):
    src = tmp_path / "src"
    for rel, seed in (("images/p1_a.tif", 1), ("images/p1_b.tif", 2), ("train.csv", 3)):
        _random_file(src / rel, 50_000, seed)
    first = upload_dir(s3_cfg, src, s3_prefix)
    assert sorted(first.transferred) == [
        f"{s3_prefix}/images/p1_a.tif",
        f"{s3_prefix}/images/p1_b.tif",
        f"{s3_prefix}/train.csv",
    ]
    _random_file(src / "images/p1_a.tif", 50_000, seed=9)  # same size, new content
    second = upload_dir(s3_cfg, src, s3_prefix)
    assert second.transferred == [f"{s3_prefix}/images/p1_a.tif"]
    assert len(second.skipped) == 2

    dest = tmp_path / "dest"
    got = download_prefix(s3_cfg, s3_prefix, dest)
    assert len(got.transferred) == 3 and got.skipped == []
    assert _sha256(dest / "images/p1_a.tif") == _sha256(src / "images/p1_a.tif")
    (dest / "train.csv").write_bytes(b"x" * 50_000)  # corrupted locally, same size
    again = download_prefix(s3_cfg, s3_prefix, dest)
    assert again.transferred == [f"{s3_prefix}/train.csv"] and len(again.skipped) == 2
    assert _sha256(dest / "train.csv") == _sha256(src / "train.csv")


def test_download_of_a_missing_key_names_it_and_leaves_no_file(s3_cfg, s3_prefix, tmp_path):
    with pytest.raises(StorageError, match=f"{s3_prefix}/nope.tif"):
        download_file(s3_cfg, f"{s3_prefix}/nope.tif", tmp_path / "nope.tif")
    assert list(tmp_path.iterdir()) == []


def test_anonymous_requests_are_refused(s3_server: S3Server, s3_prefix):
    cfg = s3_server.config()
    url = f"{s3_server.endpoint_url}/{cfg.bucket}/{s3_prefix}/anon.txt"
    with pytest.raises(urllib.error.HTTPError) as put:
        urllib.request.urlopen(urllib.request.Request(url, data=b"anonymous", method="PUT"), timeout=10)
    assert put.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as listing:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/{cfg.bucket}?list-type=2", timeout=10)
    assert listing.value.code == 403
    assert list_keys(cfg, s3_prefix) == []


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_wrong_keys_are_refused(s3_server: S3Server, s3_prefix, tmp_path, which):
    good = s3_server.config()
    bad = (
        replace(good, secret_access_key="wrong-secret-123")
        if which == "secret"
        else replace(good, access_key_id="unknown-id")
    )
    f = _random_file(tmp_path / "x.bin", 100)
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        upload_file(bad, f, f"{s3_prefix}/x.bin")
    with pytest.raises(StorageError, match="denied"):
        check_bucket(bad)
    assert list_keys(good, s3_prefix) == []


def test_filer_http_port_refuses_unsigned_writes(s3_server: S3Server):
    """Writing into a bucket through the filer bypasses the S3 gateway's auth (a default
    ``weed mini`` answers 201); the JWT key in security.toml makes it refuse."""
    url = f"http://127.0.0.1:{s3_server.ports['filer']}/buckets/digilut/direct.txt"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, data=b"bypass", method="PUT"), timeout=10)
    assert err.value.code == 401


def test_every_listening_socket_is_on_loopback(s3_server: S3Server):
    addresses = listening_addresses(s3_server.pids())
    assert {port for _, port in addresses} >= set(s3_server.ports.values())
    assert {ip for ip, _ in addresses} == {"127.0.0.1"}


def test_bucket_check_names_a_missing_bucket(s3_server: S3Server):
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist"):
        check_bucket(s3_server.config(bucket="no-such-bucket"))


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A port whose accept queue is full: connections neither succeed nor get refused (as a
    firewalled host or a hung server), so only a connect timeout ends them."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in (*fillers, server):
        s.close()


@pytest.mark.parametrize("kind", ["refused", "blackhole"])
def test_unreachable_endpoint_fails_fast_naming_endpoint_and_bucket(kind, blackhole_port):
    port = blackhole_port if kind == "blackhole" else free_ports(1)[0]
    cfg = S3Config(f"http://127.0.0.1:{port}", "digilut", access_key_id="id", secret_access_key="secret-123")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        check_bucket(cfg, timeout_s=2.0)
    # a guard against hanging (boto3's defaults: 60 s connect timeout, retried), not a speed test
    assert time.monotonic() - t0 < 30
    assert f"127.0.0.1:{port}" in str(err.value) and "s3://digilut" in str(err.value)
    assert "unreachable" in str(err.value)


def test_s3_env_reaches_the_server_through_from_env(s3_env, s3_prefix, tmp_path):
    f = _random_file(tmp_path / "e.bin", 10)
    cfg = S3Config.from_env()
    assert cfg == s3_env
    upload_file(cfg, f, f"{s3_prefix}/e.bin")
    assert list_keys(cfg, s3_prefix) == [f"{s3_prefix}/e.bin"]


def test_stop_leaves_no_process_and_no_port(tmp_path):
    from digilut.ops.process import group_pids
    from digilut.ops.s3_server import start_s3

    server = start_s3(tmp_path / "s3")
    pgid = server.pid
    assert pgid is not None and server.pids()
    server.stop()
    assert group_pids(pgid) == []
    for port in server.ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port


def test_cli_upload_then_download_a_folder(s3_env, s3_prefix, tmp_path):
    from typer.testing import CliRunner

    from digilut.cli import app

    src = tmp_path / "data"
    _random_file(src / "images/p1_a.tif", 30_000, seed=1)
    _random_file(src / "train.csv", 100, seed=2)
    runner = CliRunner()
    up = runner.invoke(app, ["-q", "s3", "upload", str(src), f"s3://digilut/{s3_prefix}"])
    assert up.exit_code == 0, up.output
    assert list_keys(s3_env, s3_prefix) == [f"{s3_prefix}/images/p1_a.tif", f"{s3_prefix}/train.csv"]
    again = runner.invoke(app, ["-q", "s3", "upload", str(src), f"s3://digilut/{s3_prefix}"])
    assert "2 already there" in again.output
    down = runner.invoke(app, ["-q", "s3", "download", f"s3://digilut/{s3_prefix}", str(tmp_path / "back")])
    assert down.exit_code == 0, down.output
    assert _sha256(tmp_path / "back/images/p1_a.tif") == _sha256(src / "images/p1_a.tif")


def test_cli_reports_an_unreachable_endpoint(s3_env, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from digilut.cli import app

    port = free_ports(1)[0]
    monkeypatch.setenv("DIGILUT_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    result = CliRunner().invoke(app, ["-q", "s3", "upload", str(tmp_path), "s3://digilut/x"])
    assert result.exit_code == 2
    assert f"127.0.0.1:{port}" in result.output and "unreachable" in result.output


def test_pretrained_weights_load_from_an_s3_uri_and_are_recorded_by_hash(s3_env, s3_prefix, tmp_path):
    import torch
    import torchvision

    from digilut.model import ModelSpec, build_model

    reference = torchvision.models.resnet18()
    path = tmp_path / "ssl.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in reference.state_dict().items()}}, path)
    key = f"{s3_prefix}/weights/ssl.pth"
    upload_file(s3_env, path, key)
    model = build_model(ModelSpec(input_px=64), f"s3://{s3_env.bucket}/{key}")
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight)
    assert model.init.label == f"file:{_sha256(path)[:12]}" and model.init.prefix == "backbone."
    assert model.init.source == f"s3://{s3_env.bucket}/{key}"
