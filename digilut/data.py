"""Patches for training and inference: a shard-backed Dataset, samplers and loaders.

The CPU side does as little as possible per patch, all in uint8: read the JPEG stream from the
slide's shard by manifest row (``pread``, no per-patch files), decode it with libjpeg-turbo
(``imagecodecs``) straight into the batch array, and apply a random dihedral transform (flips and
90° rotations) as a strided copy of 3-byte pixels. A whole batch is produced by one
``__getitems__`` call, so collation is free and what crosses to the main process (and to pinned
memory) is one ``B×H×W×3`` uint8 tensor.

Everything that is arithmetic happens on the device, batched, in :mod:`digilut.transforms`
(``to_model_input``): uint8 → float, resize to the model's ``input_px``, colour jitter and H&E
stain augmentation (training only), ImageNet normalisation, channels-last. On a GPU that is a few
kernels per batch; on the CPU it is still vectorised over the batch.

Randomness is reproducible and independent of the number of workers: a batch's transforms are
drawn from a generator seeded by ``(seed, epoch, the batch's row indices)``.
"""

from __future__ import annotations

import codecs
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import imagecodecs
import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from digilut.errors import ConfigError, ShardError
from digilut.shards import ShardReader, decode_jpeg
from digilut.stain import FIT_PATCHES, describe_stain, fit_stain
from digilut.train_config import SAMPLERS

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIXEL = np.dtype((np.void, 3))  # one RGB pixel as a single 3-byte item: fast strided copies
# H&E(-DAB) stain vectors (Ruifrok & Johnston, as in scikit-image's rgb2hed)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_UNIT = float(-np.log(1e-6))  # scikit-image's stain unit, so shift jitter reads like its values
_LUMA = (0.299, 0.587, 0.114)


class PatchBatch(NamedTuple):
    """One collated batch: ``images`` uint8 ``B×H×W×3``, ``labels`` float32 (−1 = unknown), ``index``
    the positions of the rows in the dataset's table."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


def dihedral(image: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """The ``H×W×3`` uint8 ``image`` rotated by ``k % 4`` quarter turns, mirrored left-right if
    ``k >= 4`` (the 8 symmetries of the square), copied into ``out`` (allocated if ``None``)."""
    h, w = image.shape[:2]
    if out is None:
        out = np.empty((w, h, 3) if k % 2 else (h, w, 3), np.uint8)
    src = np.ascontiguousarray(image).view(_PIXEL).reshape(h, w)
    view = np.rot90(src, k % 4)
    if k >= 4:
        view = view[:, ::-1]
    np.copyto(out.view(_PIXEL).reshape(out.shape[:2]), view)
    return out


def _decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    try:
        img = imagecodecs.jpeg8_decode(data, out=out)
    except Exception:  # not a baseline RGB JPEG libjpeg-turbo decodes in place: the general path
        img = decode_jpeg(data)
        if out is not None:
            np.copyto(out, img)
            return out
    if img.ndim == 2:  # greyscale JPEG
        img = np.repeat(img[..., None], 3, axis=2)
    return img


DEFAULT_LOCAL_COPY_BYTES = 32 * 2**30  # patches of S3 shards kept on local disk per dataset


def _remove_if_owner(folder: str, pid: int) -> None:
    if os.getpid() == pid:  # not from a forked worker that happens to finalise its copy
        shutil.rmtree(folder, ignore_errors=True)


class LocalCopy:
    """Patches fetched from remote shards, kept on local disk for every DataLoader worker and every
    epoch, up to ``max_bytes`` (then the rest is fetched again when read again).

    One sparse file per shard under a temporary folder (``TMPDIR``: the task's scratch volume),
    written at the patches' own offsets; which rows are there is a byte per row in shared memory,
    set after the write, so a worker never reads a patch another is still writing. Removed when the
    dataset is collected (by the process that made it) or at exit.
    """

    def __init__(self, rows: int, max_bytes: int) -> None:
        import multiprocessing as mp

        self.folder = tempfile.mkdtemp(prefix="digilut-patches-")
        self.max_bytes = max_bytes
        self._present = mp.RawArray("B", max(rows, 1))
        self._used = mp.Value("q", 0)
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.folder, os.getpid())
        self._pid, self._fds = os.getpid(), {}

    def __getstate__(self) -> dict[str, object]:
        from multiprocessing import context

        if context.get_spawning_popen() is None:
            raise TypeError("a LocalCopy is shared only with the processes it starts (DataLoader workers)")
        return {k: v for k, v in self.__dict__.items() if k not in ("_finalizer", "_fds", "_pid")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._pid, self._fds = os.getpid(), {}

    @property
    def used_bytes(self) -> int:
        return int(self._used.value)

    def _fd(self, code: int) -> int:
        if self._pid != os.getpid():
            self._pid, self._fds = os.getpid(), {}
        fd = self._fds.get(code)
        if fd is None:
            fd = self._fds[code] = os.open(
                os.path.join(self.folder, f"{code}.bin"), os.O_RDWR | os.O_CREAT, 0o600
            )
        return fd

    def has(self, rows: np.ndarray) -> np.ndarray:
        return np.frombuffer(self._present, np.uint8)[rows].astype(bool)

    def read(self, code: int, offset: int, nbytes: int) -> bytes:
        return os.pread(self._fd(code), nbytes, offset)

    def keep(self, row: int, code: int, offset: int, data: bytes) -> None:
        if self._present[row]:
            return
        with self._used.get_lock():
            if self._used.value + len(data) > self.max_bytes:
                return
            self._used.value += len(data)
        os.pwrite(self._fd(code), data, offset)
        self._present[row] = 1


class PatchDataset(Dataset[PatchBatch]):
    """The patches of manifest ``rows`` (shard paths relative to ``root``: a folder or an ``s3://``
    prefix), read in batches.

    A batch is read shard by shard with :meth:`ShardReader.read_many`: from S3, one ranged GET per
    run of nearby patches, so only the sampled patches' bytes are fetched (``reader.stats`` counts
    them, DataLoader workers included). Patches fetched from S3 are kept in a :class:`LocalCopy` of
    up to ``local_copy_bytes`` (default 32 GiB of ``TMPDIR``; 0 = none, e.g. when every patch is
    read once), so a patch read again (epochs, validation) does not cross the network again.
    ``augment`` applies a random dihedral transform per patch.
    Labels come from the ``label`` column when present (−1 otherwise). Use with
    :func:`make_loader`, which passes whole batches of indices to :meth:`__getitems__`.
    """

    def __init__(
        self,
        root: str | Path,
        rows: pd.DataFrame,
        *,
        augment: bool = False,
        seed: int = 0,
        local_copy_bytes: int = DEFAULT_LOCAL_COPY_BYTES,
    ) -> None:
        missing = [c for c in ("shard", "offset", "nbytes") if c not in rows.columns]
        if missing:
            raise ShardError(f"manifest rows lack column(s) {', '.join(missing)}")
        self.root = root
        codes, names = pd.factorize(rows["shard"].astype(str))
        self.shard_names: list[str] = [str(n) for n in names]
        self.shard_code = codes.astype(np.int32)
        self.offset = rows["offset"].to_numpy(np.int64)
        self.nbytes = rows["nbytes"].to_numpy(np.int64)
        if "label" in rows.columns:
            self.labels = rows["label"].to_numpy(np.float32)
        else:
            self.labels = np.full(len(rows), -1.0, np.float32)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.reader = ShardReader(root)
        self.local = (
            LocalCopy(len(self.offset), local_copy_bytes) if self.reader.is_s3 and local_copy_bytes else None
        )

    def __len__(self) -> int:
        return len(self.offset)

    def set_epoch(self, epoch: int) -> None:
        """Draw different augmentations each epoch (call before iterating a loader)."""
        self.epoch = epoch

    def read_bytes(self, i: int) -> bytes:
        return self.reader.read_bytes(self.shard_names[self.shard_code[i]], self.offset[i], self.nbytes[i])

    def read_batch(self, idx: np.ndarray) -> list[bytes]:
        """The JPEG streams of rows ``idx``: from the local copy when there, the others fetched
        shard by shard (nearby patches in one request) and kept in the local copy."""
        out: list[bytes] = [b""] * len(idx)
        todo = np.arange(len(idx))
        if self.local is not None:
            have = self.local.has(idx)
            for j in np.flatnonzero(have).tolist():
                i = idx[j]
                out[j] = self.local.read(int(self.shard_code[i]), int(self.offset[i]), int(self.nbytes[i]))
            self.reader.stats.add(hits=int(have.sum()))
            todo = np.flatnonzero(~have)
        codes = self.shard_code[idx[todo]]
        for code in np.unique(codes).tolist():
            sel = todo[codes == code]
            rows = idx[sel]
            got = self.reader.read_many(
                self.shard_names[code], self.offset[rows].tolist(), self.nbytes[rows].tolist()
            )
            for j, i, data in zip(sel.tolist(), rows.tolist(), got, strict=True):
                out[j] = data
                if self.local is not None:
                    self.local.keep(i, code, int(self.offset[i]), data)
        return out

    def __getitem__(self, i: int) -> PatchBatch:
        batch = self.__getitems__([i])
        return PatchBatch(batch.images[0], batch.labels[0], batch.index[0])

    def __getitems__(self, indices: Sequence[int]) -> PatchBatch:
        idx = np.asarray(indices, dtype=np.int64)
        ks = np.zeros(len(idx), np.int64)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, *idx.tolist()])
            ks = rng.integers(0, 8, len(idx))
        streams = self.read_batch(idx)
        first = _decode(streams[0])
        h, w = first.shape[:2]
        if h != w and self.augment:
            raise ShardError(f"patch {int(idx[0])} is {w}×{h}: augmentation needs square patches")
        images = np.empty((len(idx), h, w, 3), np.uint8)
        scratch = np.empty((h, w, 3), np.uint8)
        for j, (i, k) in enumerate(zip(idx.tolist(), ks.tolist(), strict=True)):
            try:
                if j == 0:
                    img = first
                elif k == 0:
                    _decode(streams[j], out=images[j])
                    continue
                else:
                    img = _decode(streams[j], out=scratch)
                if k == 0:
                    images[j] = img
                else:
                    dihedral(img, k, out=images[j])
            except ValueError as err:  # a patch whose size differs from the batch's first
                shard = self.reader.location(self.shard_names[self.shard_code[i]])
                raise ShardError(f"{shard} patch at offset {self.offset[i]}: {err}") from err
        return PatchBatch(torch.from_numpy(images), torch.from_numpy(self.labels[idx]), torch.from_numpy(idx))


def _batch_is_item(batch: PatchBatch) -> PatchBatch:
    """Collate function: :meth:`PatchDataset.__getitems__` already returns a whole batch."""
    return batch


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-row sampling weights giving each class the same total weight."""
    labels = np.asarray(labels)
    weights = np.zeros(len(labels), np.float64)
    for value in np.unique(labels):
        sel = labels == value
        weights[sel] = 1.0 / sel.sum()
    return weights


def make_sampler(
    labels: np.ndarray, kind: str, *, num_samples: int | None = None, seed: int = 0, epoch: int = 0
) -> Sampler[int]:
    """A row sampler: ``weighted`` (class-balanced, with replacement), ``shuffle`` or ``sequential``.

    ``num_samples`` caps an epoch (default: every row once). The generator is seeded by
    ``(seed, epoch)`` so a resumed run draws the same rows.
    """
    n = len(labels)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 3]).generate_state(1)[0]))
    if kind == "weighted":
        w = torch.from_numpy(class_balanced_weights(labels))
        return WeightedRandomSampler(w, num_samples or n, replacement=True, generator=gen)
    if kind == "shuffle":
        return RandomSampler(range(n), num_samples=min(num_samples or n, n), generator=gen)
    if kind == "sequential":
        return SequentialSampler(range(n))
    raise ConfigError(f"sampler={kind!r}: choose one of {', '.join(SAMPLERS)}")


def make_loader(
    dataset: PatchDataset,
    sampler: Sampler[int],
    *,
    batch_size: int,
    num_workers: int = 2,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader[PatchBatch]:
    """A DataLoader yielding :class:`PatchBatch` es (uint8 images, pinned when ``pin_memory``).

    Its forked workers inherit the import locks other threads hold at that moment: a worker reading a
    shard from S3 (urllib3 encodes the host with the ``idna`` codec) waited forever for the lock of
    ``encodings.idna``, which the MLflow thread was importing for its first request. Looking the codec
    up here, before any fork, caches it for every worker.
    """
    codecs.lookup("idna")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_batch_is_item,
        pin_memory=pin_memory,
        drop_last=drop_last,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,  # workers are re-forked each epoch and see set_epoch()
    )


def slide_stain_stats(
    root: str | Path, rows: pd.DataFrame, method: str, fit_patches: int = FIT_PATCHES
) -> dict[str, np.ndarray]:
    """Per slide of ``rows`` (manifest rows; shards relative to ``root``): its ``method`` stain
    statistics (:func:`digilut.stain.fit_stain`), fitted on up to ``fit_patches`` of its patches
    spread evenly over its rows."""
    out: dict[str, np.ndarray] = {}
    for slide, part in rows.groupby("slide", sort=True):
        pick = np.unique(np.linspace(0, len(part) - 1, min(len(part), fit_patches)).round().astype(int))
        batch = PatchDataset(root, part.iloc[pick], augment=False).__getitems__(range(len(pick)))
        out[str(slide)] = fit_stain(batch.images, method, str(slide)).numpy()
        log.info("stain: %s %s over %d patches", slide, describe_stain(out[str(slide)], method), len(pick))
    return out
