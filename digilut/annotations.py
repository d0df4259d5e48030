"""The DigiLut data model: slide names, patients and the challenge CSVs.

Training boxes: ``filename,x1,x2,y1,y2,max_x,max_y`` — level-0 pixels, ``x1``/``x2`` = xmin/xmax,
``y1``/``y2`` = ymin/ymax, ``max_x``/``max_y`` = the slide's level-0 width/height.
Test list: ``filename,max_x,max_y,trustii_id`` (one row per expected box: the number of rows of a
slide is the N boxes the submission must give for it).

Readers validate row by row: a bad row is dropped with a :class:`RowProblem` naming the file, the
1-based CSV line and the value; the rest of the table is kept. Only a table that is unusable as a
whole (unreadable, empty, missing columns) raises :class:`~digilut.errors.AnnotationError`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from digilut.errors import AnnotationError, UnsafePathError

log = logging.getLogger(__name__)

BOX_COLUMNS = ("filename", "x1", "x2", "y1", "y2", "max_x", "max_y")
TEST_COLUMNS = ("filename", "max_x", "max_y", "trustii_id")
SLIDE_SUFFIXES = (".tif", ".tiff")
# Real DigiLut boxes reach an aspect ratio of 6.2 (927 rows); 10 flags only real mistakes.
DEFAULT_MAX_ASPECT_RATIO = 10.0
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
_PATIENT = re.compile(r"^(?P<patient>.+)_[abAB]$")


def check_slide_name(name: object) -> str:
    """Return ``name`` if it is a plain slide file name, else raise :class:`UnsafePathError`.

    A slide name must be a bare file name (no directory part, no ``..``, not absolute, no control
    characters or newlines) ending in ``.tif``/``.tiff``. This runs before any path join, so no
    input can make digilut read or write outside its data folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"slide name {name!r} is empty or not text")
    if _UNSAFE.search(name) or name in (".", "..") or name.startswith(".."):
        raise UnsafePathError(
            f"slide name {name!r} is not a plain file name (no '/', '\\', '..', newlines or control "
            "characters allowed)"
        )
    if not name.lower().endswith(SLIDE_SUFFIXES):
        raise UnsafePathError(f"slide name {name!r} does not end in .tif/.tiff")
    return name


def patient_of(slide: str) -> str:
    """Patient id of a slide: the file name without extension and without its ``_a``/``_b`` suffix.

    >>> patient_of("bGaslniO4a_b.tif")
    'bGaslniO4a'
    """
    stem = Path(slide).stem
    m = _PATIENT.match(stem)
    return m.group("patient") if m else stem


@dataclass(frozen=True)
class RowProblem:
    """One dropped or corrected CSV row: where it is and why."""

    source: str
    line: int  # 1-based line in the CSV file (the header is line 1)
    filename: str
    message: str
    dropped: bool = True

    def __str__(self) -> str:
        action = "dropped" if self.dropped else "kept"
        return f"{self.source} line {self.line} ({self.filename}): {self.message} — {action}"


@dataclass
class Table:
    """A validated CSV: the good rows and the problems found in the others."""

    rows: pd.DataFrame
    problems: list[RowProblem] = field(default_factory=list)

    def log_problems(self) -> None:
        for p in self.problems:
            log.warning("%s", p)


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError as err:
        raise AnnotationError(f"{path}: annotation CSV not found") from err
    except pd.errors.EmptyDataError as err:
        raise AnnotationError(f"{path}: CSV is empty; expected header {','.join(columns)}") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: not a readable CSV ({err})") from err
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AnnotationError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}; "
            f"expected {','.join(columns)}"
        )
    df = df[list(columns)].copy()
    df.insert(0, "csv_line", np.arange(2, len(df) + 2))
    return df


def _to_int(value: str) -> int | None:
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?\d+\.0*", text):  # "123.0" from spreadsheet exports
        return int(float(text))
    return None


def _parse_ints(
    df: pd.DataFrame, int_columns: tuple[str, ...], source: str, problems: list[RowProblem]
) -> pd.DataFrame:
    keep: list[dict[str, object]] = []
    for rec in df.to_dict("records"):
        line = int(rec["csv_line"])
        name = str(rec["filename"]).strip()
        try:
            check_slide_name(name)
        except UnsafePathError as err:
            problems.append(RowProblem(source, line, name, str(err)))
            continue
        out: dict[str, object] = {"csv_line": line, "filename": name}
        bad = False
        for col in int_columns:
            val = _to_int(str(rec[col]))
            if val is None:
                shown = rec[col] if rec[col] != "" else "<empty>"
                problems.append(RowProblem(source, line, name, f"{col}={shown!s} is not an integer"))
                bad = True
                break
            out[col] = val
        if not bad:
            keep.append(out)
    cols = ["csv_line", "filename", *int_columns]
    return pd.DataFrame(keep, columns=cols).astype({c: "int64" for c in int_columns})


def read_boxes_csv(
    path: str | Path,
    *,
    slides: Collection[str] | None = None,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> Table:
    """Read and validate a DigiLut training-box CSV.

    Rows are dropped (with a :class:`RowProblem`) for: an unsafe or non-TIFF file name, a
    non-integer or empty coordinate, ``x1 >= x2`` or ``y1 >= y2`` (inverted or zero-area), a box
    entirely outside ``[0, max_x) × [0, max_y)``, an aspect ratio above ``max_aspect_ratio``, an
    exact duplicate of an earlier row, a slide whose ``max_x``/``max_y`` disagree with its earlier
    rows, and (when ``slides`` is given: those found on disk or in the bucket) a slide not among
    them. A box that only overshoots
    the slide edge (the real CSV has one, 159 px past ``max_x``) is clipped and kept, with a note.
    """
    path = Path(path)
    src = path.name
    problems: list[RowProblem] = []
    df = _parse_ints(_read_csv(path, BOX_COLUMNS), BOX_COLUMNS[1:], src, problems)
    keep = np.ones(len(df), dtype=bool)
    seen: set[tuple[object, ...]] = set()
    dims: dict[str, tuple[int, int]] = {}
    on_disk = set(slides) if slides is not None else None
    for i, r in enumerate(df.itertuples(index=False)):
        line, name = int(r.csv_line), str(r.filename)

        def drop(msg: str, line: int = line, name: str = name, i: int = i) -> None:
            problems.append(RowProblem(src, line, name, msg))
            keep[i] = False

        if r.max_x <= 0 or r.max_y <= 0:
            drop(f"slide size max_x={r.max_x}, max_y={r.max_y} must be positive")
            continue
        if r.x1 >= r.x2 or r.y1 >= r.y2:
            what = "zero-area" if (r.x1 == r.x2 or r.y1 == r.y2) else "inverted"
            drop(f"{what} box: x1={r.x1} x2={r.x2} y1={r.y1} y2={r.y2} (need x1 < x2 and y1 < y2)")
            continue
        if r.x2 <= 0 or r.y2 <= 0 or r.x1 >= r.max_x or r.y1 >= r.max_y:
            drop(
                f"box x1={r.x1} x2={r.x2} y1={r.y1} y2={r.y2} lies outside the slide "
                f"(0..{r.max_x} × 0..{r.max_y})"
            )
            continue
        w, h = r.x2 - r.x1, r.y2 - r.y1
        if max(w / h, h / w) > max_aspect_ratio:
            drop(f"aspect ratio {max(w / h, h / w):.1f} of a {w}×{h} px box exceeds {max_aspect_ratio:g}")
            continue
        key = (name, r.x1, r.x2, r.y1, r.y2)
        if key in seen:
            drop("duplicate of an earlier row")
            continue
        seen.add(key)
        prev = dims.setdefault(name, (r.max_x, r.max_y))
        if prev != (r.max_x, r.max_y):
            drop(f"max_x={r.max_x}, max_y={r.max_y} disagree with earlier rows of this slide ({prev})")
            continue
        if on_disk is not None and name not in on_disk:
            drop(f"slide {name} is not among the {len(on_disk)} slides found")
            continue
        if r.x1 < 0 or r.y1 < 0 or r.x2 > r.max_x or r.y2 > r.max_y:
            problems.append(
                RowProblem(
                    src,
                    line,
                    name,
                    f"box x1={r.x1} x2={r.x2} y1={r.y1} y2={r.y2} overshoots the slide "
                    f"(0..{r.max_x} × 0..{r.max_y}); clipped to it",
                    dropped=False,
                )
            )
    out = df[keep].copy()
    out["x1"] = out["x1"].clip(lower=0)
    out["y1"] = out["y1"].clip(lower=0)
    out["x2"] = np.minimum(out["x2"], out["max_x"])
    out["y2"] = np.minimum(out["y2"], out["max_y"])
    out["patient"] = out["filename"].map(patient_of)
    return Table(out.drop(columns="csv_line").reset_index(drop=True), problems)


def check_slide_sizes(
    boxes: pd.DataFrame,
    sizes: Mapping[str, tuple[int, int]],
    *,
    source: str = "train.csv",
    tolerance_px: int = 1,
) -> tuple[pd.DataFrame, list[str], set[str]]:
    """Drop the boxes of slides whose ``max_x``/``max_y`` disagree with the slide's real size.

    ``sizes`` maps slide names to their level-0 ``(width, height)``, read from the slides. Boxes
    given in another frame (another level, a resized copy) would label the wrong patches, so such a
    slide loses its boxes *and* must be left out of training: returns the kept boxes, one message
    per such slide (naming both sizes) and the set of those slides.
    """
    bad: set[str] = set()
    messages: list[str] = []
    for name, rows in boxes.groupby("filename", sort=True):
        if name not in sizes:
            continue
        w, h = sizes[str(name)]
        mx, my = int(rows["max_x"].iloc[0]), int(rows["max_y"].iloc[0])
        if abs(mx - w) > tolerance_px or abs(my - h) > tolerance_px:
            bad.add(str(name))
            messages.append(
                f"{source} ({name}): max_x={mx}, max_y={my} disagree with the slide's real size {w}×{h} px: "
                f"its {len(rows)} box(es) dropped and the slide left out of training"
            )
    return boxes[~boxes["filename"].isin(bad)].reset_index(drop=True), messages, bad


def read_test_list(path: str | Path) -> Table:
    """Read a DigiLut test list ``filename,max_x,max_y,trustii_id`` (one row per expected box).

    The expected number of boxes N of a slide is its number of rows (:func:`expected_counts`).
    """
    path = Path(path)
    src = path.name
    problems: list[RowProblem] = []
    df = _parse_ints(_read_csv(path, TEST_COLUMNS), ("max_x", "max_y", "trustii_id"), src, problems)
    dup = df.duplicated("trustii_id", keep="first")
    for line, name, tid in df.loc[dup, ["csv_line", "filename", "trustii_id"]].itertuples(index=False):
        problems.append(RowProblem(src, int(line), str(name), f"trustii_id={tid} repeats an earlier row"))
    out = df[~dup].drop(columns="csv_line").reset_index(drop=True)
    out["patient"] = out["filename"].map(patient_of)
    return Table(out, problems)


def expected_counts(test_list: pd.DataFrame) -> dict[str, int]:
    """N boxes expected per slide from a test list (its rows per filename)."""
    return {str(k): int(v) for k, v in test_list.groupby("filename").size().items()}


def _slides_on_disk(images_dir: str | Path) -> set[str]:
    d = Path(images_dir)
    return {p.name for p in d.iterdir() if p.is_file() and p.name.lower().endswith(SLIDE_SUFFIXES)}


def list_slides(images_dir: str | Path, *, problems: list[str] | None = None) -> list[str]:
    """Sorted slide file names in ``images_dir`` (``*.tif``/``*.tiff``).

    Unsafe names (newlines, control characters) and names whose stem repeats an earlier one
    (``x_a.tif`` and ``x_a.tiff`` would share a shard) are skipped; each is logged and, when
    ``problems`` is given, appended to it.
    """
    return safe_slide_names(sorted(_slides_on_disk(images_dir)), problems=problems)


def safe_slide_names(names: Collection[str], *, problems: list[str] | None = None) -> list[str]:
    """The plain, unique-stem slide names of ``names`` (sorted); the others skipped and reported."""
    kept: list[str] = []
    stems: dict[str, str] = {}
    for name in sorted(names):
        try:
            check_slide_name(name)
        except UnsafePathError as err:
            msg = f"skipping {err}"
        else:
            first = stems.setdefault(Path(name).stem.lower(), name)
            if first == name:
                kept.append(name)
                continue
            msg = f"skipping slide {name!r}: same name as {first!r} but for the extension or case"
        log.warning("%s", msg)
        if problems is not None:
            problems.append(msg)
    return kept
