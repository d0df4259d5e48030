"""Patch shards: one object per slide holding all its JPEG-encoded patches.

A DigiLut run has millions of patches; object stores and file systems handle them best as one
object per slide. A shard is the concatenation of the patches' JPEG streams followed by a footer
index, so it is self-describing, while the manifest also records ``offset``/``nbytes`` of every
patch so a reader (or an S3 range GET) fetches one patch without the footer::

    [jpeg 0][jpeg 1]...[jpeg n-1][index: n × (offset u64, nbytes u32)][n u64][MAGIC 8 bytes]

Writes are atomic: the shard is written to a temporary file in the same folder, fsynced, then
renamed, so a crash or a full disk never leaves a truncated shard at the final path.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from digilut.errors import ShardError

MAGIC = b"DLSHARD1"
SHARD_SUFFIX = ".shard"
_ENTRY = np.dtype([("offset", "<u8"), ("nbytes", "<u4")])
_TAIL = struct.Struct("<Q8s")


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """JPEG-encode an ``H×W×3`` uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode one patch's JPEG stream to an ``H×W×3`` uint8 RGB array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class ShardIndex:
    """Where each patch lies in a shard: parallel arrays ``offset`` and ``nbytes``."""

    offset: np.ndarray
    nbytes: np.ndarray

    def __len__(self) -> int:
        return len(self.offset)


def atomic_write(path: Path, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``path`` atomically (temp file, fsync, rename); return bytes written.

    On any error (a full disk included) the temporary file is removed and the error re-raised as
    :class:`ShardError` naming ``path``; a previous file at ``path`` is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    total = 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                total += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


def write_shard(path: str | Path, jpegs: list[bytes]) -> ShardIndex:
    """Write the JPEG streams ``jpegs`` as one shard at ``path``; return their index."""
    nbytes = np.fromiter((len(j) for j in jpegs), dtype=np.uint64, count=len(jpegs))
    offset = np.zeros(len(jpegs), dtype=np.uint64)
    if len(jpegs):
        offset[1:] = np.cumsum(nbytes)[:-1]
    table = np.empty(len(jpegs), dtype=_ENTRY)
    table["offset"] = offset
    table["nbytes"] = nbytes
    atomic_write(Path(path), [*jpegs, table.tobytes(), _TAIL.pack(len(jpegs), MAGIC)])
    return ShardIndex(offset.astype(np.int64), nbytes.astype(np.int64))


def read_index(path: str | Path) -> ShardIndex:
    """Read a shard's footer index; raise :class:`ShardError` if the shard is truncated or foreign."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size < _TAIL.size:
                raise ShardError(f"{path}: {size} bytes is too short to be a shard")
            fh.seek(size - _TAIL.size)
            n, magic = _TAIL.unpack(fh.read(_TAIL.size))
            if magic != MAGIC:
                raise ShardError(f"{path}: not a digilut shard (bad footer magic {magic!r})")
            start = size - _TAIL.size - n * _ENTRY.itemsize
            if start < 0:
                raise ShardError(f"{path}: footer claims {n} patches but the file is {size} bytes")
            fh.seek(start)
            table = np.frombuffer(fh.read(n * _ENTRY.itemsize), dtype=_ENTRY)
    except FileNotFoundError as err:
        raise ShardError(f"{path}: shard not found") from err
    offset = table["offset"].astype(np.int64)
    nbytes = table["nbytes"].astype(np.int64)
    if n and int(offset[-1] + nbytes[-1]) != start:
        raise ShardError(f"{path}: index does not match the data ({int(offset[-1] + nbytes[-1])} != {start})")
    return ShardIndex(offset, nbytes)


class ShardReader:
    """Random access to patches of many shards, keeping file handles open (one per shard).

    Safe to use from DataLoader workers: handles are opened lazily in the process that reads, and
    reads use ``os.pread`` (no shared file position).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # forked into a worker: handles are not ours
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            p = self.root / shard
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError as err:
                raise ShardError(f"{p}: shard not found") from err
            self._fds[shard] = fd
        return fd

    def read_bytes(self, shard: str, offset: int, nbytes: int) -> bytes:
        data = os.pread(self._fd(shard), int(nbytes), int(offset))
        if len(data) != nbytes:
            raise ShardError(f"{self.root / shard}: wanted {nbytes} bytes at {offset}, got {len(data)}")
        return data

    def read(self, shard: str, offset: int, nbytes: int) -> np.ndarray:
        """Decoded RGB pixels of one patch."""
        return decode_jpeg(self.read_bytes(shard, offset, nbytes))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; explicit close() is preferred
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:
            pass


def iter_shard(path: str | Path) -> Iterator[bytes]:
    """Yield the JPEG stream of every patch of one shard, in order."""
    idx = read_index(path)
    with open(path, "rb") as fh:
        for off, n in zip(idx.offset, idx.nbytes, strict=True):
            fh.seek(int(off))
            yield fh.read(int(n))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (what "reused by content hash" compares)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
