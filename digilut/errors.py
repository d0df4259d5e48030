"""Error hierarchy.

Every error digilut raises derives from :class:`DigilutError` *and* the builtin it refines, so
callers can catch either. Messages name the file, row and value and say what would be valid.
"""

from __future__ import annotations


class DigilutError(Exception):
    """Base class of every error raised by digilut."""


class ConfigError(DigilutError, ValueError):
    """A configuration value is out of range or inconsistent."""


class AnnotationError(DigilutError, ValueError):
    """An annotation CSV cannot be used at all (missing columns, unreadable, empty)."""


class UnsafePathError(DigilutError, ValueError):
    """A file name from an input would escape its data folder (``../``, absolute, control chars)."""


class SlideNotFoundError(DigilutError, FileNotFoundError):
    """A slide named by an input is not on disk / in the bucket."""


class SlideReadError(DigilutError, OSError):
    """A slide exists but cannot be read (corrupt, truncated, not a TIFF, unreadable tiles)."""


class SlideMetadataError(DigilutError, ValueError):
    """A slide's metadata is missing or implausible (no mpp, mpp out of range, no pyramid)."""


class TissueNotFoundError(DigilutError, ValueError):
    """A slide has no tissue above the threshold: nothing to extract."""


class TrainingInterrupted(DigilutError, RuntimeError):
    """Training stopped on SIGTERM after saving its state; running it again resumes."""


class GpuUnavailableError(DigilutError, RuntimeError):
    """A task scheduled on a GPU (``DIGILUT_REQUIRE_GPU=1``) finds no CUDA device: it fails rather
    than train on the CPU for days while holding the GPU."""


class SlideChangedError(DigilutError, OSError):
    """A slide is no longer the version (size, ETag) it was listed with: its patches would be cached
    under the old version."""


class ShardError(DigilutError, OSError):
    """A patch shard is missing, truncated or does not match its index."""


class StorageError(DigilutError, OSError):
    """An object store (S3) operation failed; the message names endpoint, bucket and key."""


class ServiceError(DigilutError, RuntimeError):
    """A local server (S3, MLflow) did not start or stop; the message ends with its log's tail."""
