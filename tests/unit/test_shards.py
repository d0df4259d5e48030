import hashlib

import numpy as np
import pytest

from digilut.errors import ShardError
from digilut.shards import (
    ShardReader,
    atomic_write,
    decode_jpeg,
    encode_jpeg,
    file_sha256,
    iter_shard,
    read_index,
    write_shard,
)


def patches(n: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:32, 0:32]
    base = np.stack([yy * 4, xx * 4, (yy + xx) * 2], axis=-1)
    return [(base + 20 * i).clip(0, 255).astype(np.uint8) for i in range(n)]


def test_round_trip_through_index_reader_and_iterator(tmp_path):
    imgs = patches(5)
    jpegs = [encode_jpeg(p, quality=95) for p in imgs]
    idx = write_shard(tmp_path / "s.shard", jpegs)
    back = read_index(tmp_path / "s.shard")
    assert np.array_equal(back.offset, idx.offset) and np.array_equal(back.nbytes, idx.nbytes)
    assert list(iter_shard(tmp_path / "s.shard")) == jpegs
    with ShardReader(tmp_path) as reader:
        for i in (4, 0, 2):
            got = reader.read("s.shard", int(idx.offset[i]), int(idx.nbytes[i]))
            assert np.abs(got.astype(int) - imgs[i]).mean() < 3  # JPEG q95
            assert np.array_equal(got, decode_jpeg(jpegs[i]))


def test_empty_shard_is_valid(tmp_path):
    write_shard(tmp_path / "e.shard", [])
    assert len(read_index(tmp_path / "e.shard")) == 0


def test_truncated_and_foreign_shards_are_refused(tmp_path):
    write_shard(tmp_path / "s.shard", [encode_jpeg(p) for p in patches(3)])
    data = (tmp_path / "s.shard").read_bytes()
    (tmp_path / "t.shard").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"t\.shard"):
        read_index(tmp_path / "t.shard")
    (tmp_path / "f.shard").write_bytes(b"hello world, not a shard at all")
    with pytest.raises(ShardError, match="bad footer magic"):
        read_index(tmp_path / "f.shard")
    with ShardReader(tmp_path) as reader, pytest.raises(ShardError, match="wanted"):
        reader.read_bytes("t.shard", 0, len(data))


def test_failed_atomic_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write(target, [b"old"])

    def chunks():
        yield b"new"
        raise OSError(28, "No space left on device")

    with pytest.raises(ShardError, match=r"x\.bin.*No space left"):
        atomic_write(target, chunks())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_file_sha256_is_the_standard_digest_of_the_whole_file(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")  # FIPS 180-2 test vector
    assert file_sha256(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "big").write_bytes(big)  # past any read-chunk boundary
    (tmp_path / "big2").write_bytes(big[:-1] + bytes([big[-1] ^ 1]))  # last byte differs
    assert file_sha256(tmp_path / "big") == hashlib.sha256(big).hexdigest() != file_sha256(tmp_path / "big2")
