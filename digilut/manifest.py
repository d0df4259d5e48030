"""The patch manifest: one row per extracted patch, the table every later step reads.

Columns (added by the step named):

============  =======  =============================================================
column        dtype    meaning
============  =======  =============================================================
slide         str      slide file name, e.g. ``bGaslniO4a_a.tif``            (extract)
patient       str      patient id (``bGaslniO4a``)                            (extract)
x0, y0        int64    top-left corner of the patch in level-0 pixels         (extract)
w0, h0        int64    extent of the patch in level-0 pixels                  (extract)
level         int16    pyramid level the pixels were read from                (extract)
tissue        float32  tissue fraction of the patch (FAST tissue mask)        (extract)
shard         str      shard path relative to the patch set's shard store     (extract)
offset        int64    byte offset of the patch's JPEG stream in the shard    (extract)
nbytes        int64    length of that JPEG stream                             (extract)
overlap       float32  overlap score with the slide's boxes                   (label)
label         int8     1 = lesion, 0 = not                                    (label)
split         str      ``train`` or ``test``                                  (split)
fold          int8     validation fold of a train patient, -1 for test        (split)
sampled       bool     kept by negative undersampling (train rows)            (split)
============  =======  =============================================================

The **shard store** of a patch set is where its shards are: the folder holding the manifest
(``digilut prepare``: ``OUT/shards/<stem>.shard``), or the location named in the folder's
``shards.json`` — a folder or ``s3://`` prefix outside the pipeline's artifacts, so that a task that
takes the patch set as input downloads only the manifest and reads patches by ranged GET
(:func:`shard_store`).

Patch pixels are read back by row with :func:`read_patch` (or a :class:`~digilut.shards.ShardReader`
for many rows): ``read_patch(root, row)`` returns the ``patch_px × patch_px × 3`` uint8 RGB patch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from digilut.errors import ShardError
from digilut.files import atomic_write
from digilut.shards import ShardReader

EXTRACT_COLUMNS: dict[str, str] = {
    "slide": "string",
    "patient": "string",
    "x0": "int64",
    "y0": "int64",
    "w0": "int64",
    "h0": "int64",
    "level": "int16",
    "tissue": "float32",
    "shard": "string",
    "offset": "int64",
    "nbytes": "int64",
}
LABEL_COLUMNS: dict[str, str] = {"overlap": "float32", "label": "int8"}
SPLIT_COLUMNS: dict[str, str] = {"split": "string", "fold": "int8", "sampled": "bool"}
MANIFEST_NAME = "manifest.parquet"
SHARDS_NAME = "shards.json"


def empty_manifest() -> pd.DataFrame:
    """A manifest with the extraction columns and no rows."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in EXTRACT_COLUMNS.items()})


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Cast known columns to their manifest dtypes (unknown columns pass through)."""
    types = {**EXTRACT_COLUMNS, **LABEL_COLUMNS, **SPLIT_COLUMNS}
    return df.astype({c: t for c, t in types.items() if c in df.columns})


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest (or a part of one) as Parquet, atomically."""
    path = Path(path)
    data = conform(df).reset_index(drop=True).to_parquet(index=False)
    atomic_write(path, [data])
    return path


def read_manifest(path: str | Path, *, require: tuple[str, ...] = tuple(EXTRACT_COLUMNS)) -> pd.DataFrame:
    """Read a manifest and check that the columns ``require`` are present."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError as err:
        raise ShardError(f"{path}: manifest not found") from err
    missing = [c for c in require if c not in df.columns]
    if missing:
        raise ShardError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    return conform(df)


def read_patch(root: str | Path, row: pd.Series | dict[str, object]) -> np.ndarray:
    """RGB pixels (``H×W×3`` uint8) of the patch described by one manifest ``row``.

    ``root`` is the folder holding the manifest (shard paths are relative to it).
    """
    with ShardReader(root) as reader:
        return reader.read(str(row["shard"]), int(row["offset"]), int(row["nbytes"]))


def write_shard_store(folder: str | Path, store: str) -> None:
    """Record in ``folder/shards.json`` that the shards of the manifest in ``folder`` are under
    ``store`` (a folder or ``s3://`` prefix)."""
    atomic_write(Path(folder) / SHARDS_NAME, [json.dumps({"store": store}).encode()])


def shard_store(folder: str | Path) -> str:
    """Where the shards of the patch set in ``folder`` are: the store recorded in its
    ``shards.json``, else ``folder`` itself."""
    path = Path(folder) / SHARDS_NAME
    if not path.is_file():
        return str(folder)
    try:
        store = json.loads(path.read_text())["store"]
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f'{path}: expected {{"store": "<folder or s3:// prefix>"}}: {err}') from err
    if not isinstance(store, str) or not store:
        raise ShardError(f"{path}: store={store!r} is not a folder or s3:// prefix")
    return store
