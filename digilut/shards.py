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

import contextlib
import io
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from digilut.errors import ShardError
from digilut.files import atomic_write
from digilut.locations import is_s3, s3_target

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


DEFAULT_MAX_GAP_BYTES = 32 * 2**10  # join two wanted ranges this close into one GET (≈ 2 patches)
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # the most one joined GET asks for


class FetchStats:
    """What a :class:`ShardReader` fetched: ``bytes`` and ``requests`` that reached the storage
    (a file or S3), and ``hits``: patches its user served from a local copy instead. The counters
    live in shared memory, so a reader handed to DataLoader worker processes counts their reads."""

    def __init__(self) -> None:
        import multiprocessing as mp

        self._counts = mp.Array("q", 3)

    def add(self, nbytes: int = 0, requests: int = 0, hits: int = 0) -> None:
        with self._counts.get_lock():
            self._counts[0] += nbytes
            self._counts[1] += requests
            self._counts[2] += hits

    @property
    def bytes(self) -> int:
        return int(self._counts[0])

    @property
    def requests(self) -> int:
        return int(self._counts[1])

    @property
    def hits(self) -> int:
        return int(self._counts[2])

    def __getstate__(self) -> dict[str, object]:
        from multiprocessing import context

        # Shared counters travel to a process being started (a spawned DataLoader worker); any
        # other copy (pickle.dumps) gets counters of its own.
        return {"counts": self._counts if context.get_spawning_popen() is not None else None}

    def __setstate__(self, state: dict[str, object]) -> None:
        counts = state["counts"]
        if counts is None:
            self.__init__()  # type: ignore[misc]
        else:
            self._counts = counts

    def __repr__(self) -> str:
        return f"FetchStats(bytes={self.bytes}, requests={self.requests}, hits={self.hits})"


class ShardReader:
    """Random access to patches of the shards under ``root``: a folder, or an ``s3://`` prefix.

    A folder is read with ``os.pread`` (handles kept open, one per shard); an ``s3://`` prefix
    with ranged GETs (endpoint and keys from the environment, bucket from the URI), retried through
    outages like every transfer (:class:`digilut.transfer.Patience`), so only the bytes of the
    patches asked for cross the network. :meth:`read_many` joins the wanted ranges of one shard that
    lie within ``max_gap_bytes`` of each other into one request (at most ``max_request_bytes``).
    ``stats`` counts what reached the storage. (Patches read again — epochs, DataLoader workers —
    are kept on local disk by :class:`digilut.data.PatchDataset`, not here.)

    Safe to use from DataLoader workers: file handles and the S3 client are made in the process
    that reads (never pickled), and reads share no file position.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        max_gap_bytes: int = DEFAULT_MAX_GAP_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.root = str(root)
        self.is_s3 = is_s3(self.root)
        if self.is_s3:
            self.root = self.root.rstrip("/")
        self.max_gap_bytes = max_gap_bytes
        self.max_request_bytes = max_request_bytes
        self.stats = FetchStats()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}
        self._s3: tuple[Any, Any, str, Any] | None = None  # client, config, key prefix, retrier

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        for name in ("_fds", "_s3", "_pid"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _own(self) -> None:
        if self._pid != os.getpid():  # forked into a worker: handles and client are not ours
            self._reset()

    def location(self, shard: str) -> str:
        """Where ``shard`` (a manifest's ``shard`` value) is: a path or an ``s3://`` URI."""
        return f"{self.root}/{shard}" if self.is_s3 else str(Path(self.root) / shard)

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            p = Path(self.root) / shard
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError as err:
                raise ShardError(f"{p}: shard not found") from err
            self._fds[shard] = fd
        return fd

    def _client(self) -> tuple[Any, Any, str]:
        if self._s3 is None:
            from digilut.storage import s3_client

            cfg, prefix = s3_target(self.root)
            self._s3 = (s3_client(cfg), cfg, prefix)
        return self._s3

    def _fetch(self, shard: str, offset: int, nbytes: int) -> bytes:
        """``nbytes`` at ``offset`` of ``shard`` from the storage: one request."""
        if self.is_s3:
            from digilut.errors import StorageError
            from digilut.storage import read_range

            client, cfg, prefix = self._client()
            key = f"{prefix}/{shard}" if prefix else shard
            try:
                data = read_range(client, cfg, key, offset, nbytes)
            except StorageError as err:
                raise ShardError(f"{self.location(shard)}: {err}") from err
        else:
            data = os.pread(self._fd(shard), nbytes, offset)
            if len(data) != nbytes:
                raise ShardError(
                    f"{self.location(shard)}: wanted {nbytes} bytes at {offset}, got {len(data)}"
                )
        self.stats.add(nbytes=len(data), requests=1)
        return data

    def read_many(self, shard: str, offsets: Sequence[int], nbytes: Sequence[int]) -> list[bytes]:
        """The bytes of several patches of one shard, in the order asked, in as few requests as the
        gap and size limits allow (each distinct range fetched once)."""
        self._own()
        wanted: dict[tuple[int, int], list[int]] = {}
        for j, (off, n) in enumerate(zip(offsets, nbytes, strict=True)):
            wanted.setdefault((int(off), int(n)), []).append(j)
        out: list[bytes] = [b""] * len(offsets)
        ranges = sorted(wanted)
        i = 0
        while i < len(ranges):  # one request per run of ranges close enough to join
            start, end, k = ranges[i][0], ranges[i][0] + ranges[i][1], i + 1
            while k < len(ranges):
                off, n = ranges[k]
                if off - end > self.max_gap_bytes or max(end, off + n) - start > self.max_request_bytes:
                    break
                end, k = max(end, off + n), k + 1
            block = self._fetch(shard, start, end - start)
            for off, n in ranges[i:k]:
                data = block[off - start : off - start + n]
                for j in wanted[(off, n)]:
                    out[j] = data
            i = k
        return out

    def read_bytes(self, shard: str, offset: int, nbytes: int) -> bytes:
        """The JPEG stream of one patch."""
        return self.read_many(shard, [offset], [nbytes])[0]

    def read(self, shard: str, offset: int, nbytes: int) -> np.ndarray:
        """Decoded RGB pixels of one patch."""
        return decode_jpeg(self.read_bytes(shard, offset, nbytes))

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()
        self._s3 = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; explicit close() is preferred
        with contextlib.suppress(Exception):
            self.close()


def shard_name(stem: str, sha256: str) -> str:
    """A shard's content-addressed name in a shard store: ``<stem>-<first 16 hex of SHA-256>.shard``.
    Runs, datasets and settings share a store without ever overwriting another's shard."""
    return f"{stem}-{sha256[:16]}{SHARD_SUFFIX}"


def publish_shard(path: str | Path, store: str, name: str) -> bool:
    """Put the shard file ``path`` at ``store/name`` (``store``: a folder or ``s3://`` prefix);
    False when an object of that name and size is already there (names are content-addressed)."""
    path = Path(path)
    size = path.stat().st_size
    if is_s3(store):
        from digilut.storage import object_size, upload_file

        cfg, prefix = s3_target(store)
        key = f"{prefix}/{name}" if prefix else name
        if object_size(cfg, key) == size:
            return False
        upload_file(cfg, path, key)
        return True
    dst = Path(store) / name
    if dst.is_file() and dst.stat().st_size == size:
        return False
    with open(path, "rb") as fh:
        atomic_write(dst, iter(lambda: fh.read(1 << 20), b""))
    return True


def iter_shard(path: str | Path) -> Iterator[bytes]:
    """Yield the JPEG stream of every patch of one shard, in order."""
    idx = read_index(path)
    with open(path, "rb") as fh:
        for off, n in zip(idx.offset, idx.nbytes, strict=True):
            fh.seek(int(off))
            yield fh.read(int(n))
