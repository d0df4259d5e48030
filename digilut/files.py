"""Files written whole or not at all, and content digests: what every step that writes a result uses."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from digilut.errors import ShardError


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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (what "reused by content hash" compares)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
