import hashlib

import numpy as np
import pytest

from digilut.errors import ShardError
from digilut.files import atomic_write, file_sha256
from digilut.shards import (
    ShardIndex,
    ShardReader,
    decode_jpeg,
    encode_jpeg,
    iter_shard,
    publish_shard,
    read_index,
    shard_name,
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


def _shard_of(tmp_path, n: int) -> tuple[list[bytes], ShardIndex]:
    jpegs = [encode_jpeg(p) for p in patches(n)]
    return jpegs, write_shard(tmp_path / "s.shard", jpegs)


def test_read_many_joins_nearby_patches_into_one_read_and_counts_the_bytes(tmp_path):
    jpegs, idx = _shard_of(tmp_path, 10)
    want = [7, 0, 2, 1, 5, 2]  # any order, a repeat; runs 0-2, 5, 7 when only adjacent ones join
    off, nb = idx.offset[want].tolist(), idx.nbytes[want].tolist()
    with ShardReader(tmp_path, max_gap_bytes=0) as reader:
        assert reader.read_many("s.shard", off, nb) == [jpegs[i] for i in want]
        assert reader.stats.requests == 3
        assert reader.stats.bytes == sum(len(jpegs[i]) for i in {0, 1, 2, 5, 7})
    with ShardReader(tmp_path, max_gap_bytes=10**6) as reader:  # one read from patch 0 to 7
        assert reader.read_many("s.shard", off, nb) == [jpegs[i] for i in want]
        assert reader.stats.requests == 1 and reader.stats.bytes == sum(len(j) for j in jpegs[:8])
    with ShardReader(tmp_path, max_gap_bytes=10**6, max_request_bytes=len(jpegs[0])) as reader:
        reader.read_many("s.shard", off, nb)  # no read above the size cap: one per patch
        assert reader.stats.requests == 5


def test_reader_copies_carry_no_handles_and_dataloader_workers_count_into_its_stats(tmp_path):
    import pickle

    import pandas as pd

    from digilut.data import PatchDataset, make_loader

    jpegs, idx = _shard_of(tmp_path, 12)
    with ShardReader(tmp_path) as reader:
        reader.read_bytes("s.shard", int(idx.offset[3]), int(idx.nbytes[3]))
        clone = pickle.loads(pickle.dumps(reader))  # no file handle travels; its own counters
        assert clone._fds == {} and clone.stats.bytes == 0 and reader.stats.bytes == len(jpegs[3])
        assert clone.read_bytes("s.shard", int(idx.offset[4]), int(idx.nbytes[4])) == jpegs[4]
    rows = pd.DataFrame({"shard": "s.shard", "offset": idx.offset, "nbytes": idx.nbytes})
    ds = PatchDataset(tmp_path, rows)
    picked = [1, 9, 4]
    loader = make_loader(ds, picked, batch_size=1, num_workers=2)
    assert sorted(int(b.index[0]) for b in loader) == sorted(picked)
    assert ds.reader.stats.bytes == sum(len(jpegs[i]) for i in picked)  # read in the workers
    assert ds.reader.stats.requests == 3


def test_publish_shard_names_by_content_and_skips_an_identical_copy(tmp_path):
    _shard_of(tmp_path, 3)
    name = shard_name("slide_a", file_sha256(tmp_path / "s.shard"))
    assert name.startswith("slide_a-") and name.endswith(".shard") and len(name) == len("slide_a-") + 16 + 6
    store = tmp_path / "store"
    assert publish_shard(tmp_path / "s.shard", str(store), name) is True
    assert (store / name).read_bytes() == (tmp_path / "s.shard").read_bytes()
    assert publish_shard(tmp_path / "s.shard", str(store), name) is False
    assert [p.name for p in store.iterdir()] == [name]  # no temporary file left


def test_shard_store_is_the_folder_unless_shards_json_names_one(tmp_path):
    from digilut.manifest import SHARDS_NAME, shard_store, write_shard_store

    assert shard_store(tmp_path) == str(tmp_path)
    write_shard_store(tmp_path, "s3://bucket/data/digilut-shards")
    assert shard_store(tmp_path) == "s3://bucket/data/digilut-shards"
    (tmp_path / SHARDS_NAME).write_text('{"root": "x"}')
    with pytest.raises(ShardError, match=r"shards\.json.*store"):
        shard_store(tmp_path)


def test_file_sha256_is_the_standard_digest_of_the_whole_file(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")  # FIPS 180-2 test vector
    assert file_sha256(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "big").write_bytes(big)  # past any read-chunk boundary
    (tmp_path / "big2").write_bytes(big[:-1] + bytes([big[-1] ^ 1]))  # last byte differs
    assert file_sha256(tmp_path / "big") == hashlib.sha256(big).hexdigest() != file_sha256(tmp_path / "big2")
