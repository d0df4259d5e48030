"""Boxes and heatmaps as GeoJSON that pathologists open in QuPath (and convert for ASAP).

One ``FeatureCollection`` (RFC 7946) per slide, ``<slide stem>.geojson``, in **level-0 pixel
coordinates** with the origin at the top-left corner of the full-resolution image and y growing
down: QuPath's own convention, so ``File → Import objects`` places the objects on the slide. Each
feature is a QuPath annotation (``properties.objectType = "annotation"``) with a classification
(name and RGB colour):

* ``Predicted lesion``: one Polygon per predicted box, named ``prediction <rank> (<score>)``, with
  the measurements ``score`` and ``rank``;
* ``Truth lesion``: one Polygon per truth box, when known;
* ``Heatmap ≥ <p>``: one MultiPolygon per probability level ``p``: the contour of the region whose
  heatmap (mean patch probability per grid cell, cell centres as samples) is at least ``p``, holes
  included.

Exterior rings run counter-clockwise and holes clockwise in (x, y) numbers, as RFC 7946 asks.
:func:`to_asap_xml` writes the same polygons as an ASAP annotation XML (``digilut boxes --asap``).
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from digilut.errors import DigilutError
from digilut.files import atomic_write
from digilut.heatmap import Heatmap

log = logging.getLogger(__name__)

GEOJSON_DIR = "geojson"  # the results folder of the <slide stem>.geojson files
HEATMAP_LEVELS = (0.5, 0.7, 0.9)
PREDICTED = ("Predicted lesion", (220, 20, 60))
TRUTH = ("Truth lesion", (0, 160, 0))
_LEVEL_COLOURS = ((255, 215, 0), (255, 140, 0), (128, 0, 128))
Ring = list[list[float]]


class GeoJSONError(DigilutError, ValueError):
    """A GeoJSON file that is not what :func:`write_slide_geojson` writes; names the file and feature."""


def heatmap_class(level: float) -> str:
    return f"Heatmap ≥ {level:g}"


def _feature(
    geometry: dict[str, Any], cls: tuple[str, tuple[int, int, int]], name: str, **measurements: float
) -> dict[str, Any]:
    props: dict[str, Any] = {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": cls[0], "color": list(cls[1])},
        "isLocked": False,
    }
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _oriented(ring: np.ndarray, ccw: bool) -> Ring:
    """A closed ring (first point repeated last), counter-clockwise if ``ccw`` else clockwise."""
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    if (_signed_area(ring) > 0) != ccw:
        ring = ring[::-1]
    return ring.tolist()


def box_polygon(x1: float, x2: float, y1: float, y2: float) -> dict[str, Any]:
    """The Polygon of a box (level-0 px: x1,x2 = xmin,xmax and y1,y2 = ymin,ymax)."""
    ring = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
    return {"type": "Polygon", "coordinates": [_oriented(ring, ccw=True)]}


def heatmap_contours(hm: Heatmap, level: float) -> list[list[Ring]]:
    """Polygons (exterior ring then holes, level-0 px) where ``hm.prob`` ≥ ``level``.

    The heatmap is sampled at cell centres and padded with a ring of zeros, so regions touching the
    grid's edge close; an isolated block of cells at probability 1 gives its cells' outline at 0.5.
    """
    import contourpy

    prob = np.pad(hm.prob.astype(np.float64), 1)
    rows, cols = prob.shape
    s = hm.stride_px
    x = hm.x_px + (np.arange(cols) - 0.5) * s
    y = hm.y_px + (np.arange(rows) - 0.5) * s
    gen = contourpy.contour_generator(x, y, prob, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = gen.filled(level, np.inf)
    polygons = []
    for pts, offs in zip(points, offsets, strict=True):
        rings = [np.round(pts[a:b], 1) for a, b in pairwise(offs)]
        polygons.append([_oriented(r, ccw=(i == 0)) for i, r in enumerate(rings)])
    return polygons


def slide_collection(
    boxes: pd.DataFrame,
    truth: pd.DataFrame | None = None,
    heatmap: Heatmap | None = None,
    levels: Sequence[float] = HEATMAP_LEVELS,
) -> dict[str, Any]:
    """The FeatureCollection of one slide: ``boxes`` (``x1,x2,y1,y2`` and ``score``, ``rank`` when
    present), ``truth`` boxes and the heatmap's contours at ``levels``."""
    features = []
    for i, b in enumerate(boxes.itertuples(index=False), start=1):
        rank = int(getattr(b, "rank", i))
        score = float(getattr(b, "score", np.nan))
        name = f"prediction {rank}" + ("" if np.isnan(score) else f" ({score:.2f})")
        extra = {"rank": rank} if np.isnan(score) else {"score": score, "rank": rank}
        features.append(_feature(box_polygon(b.x1, b.x2, b.y1, b.y2), PREDICTED, name, **extra))
    for i, t in enumerate((truth if truth is not None else boxes.iloc[:0]).itertuples(index=False), start=1):
        features.append(_feature(box_polygon(t.x1, t.x2, t.y1, t.y2), TRUTH, f"truth {i}"))
    if heatmap is not None:
        for level, colour in zip(levels, _LEVEL_COLOURS * len(levels), strict=False):
            polygons = heatmap_contours(heatmap, level)
            if polygons:
                geometry = {"type": "MultiPolygon", "coordinates": polygons}
                features.append(_feature(geometry, (heatmap_class(level), colour), heatmap_class(level)))
    return {"type": "FeatureCollection", "features": features}


def write_slide_geojson(path: str | Path, collection: Mapping[str, Any]) -> Path:
    path = Path(path)
    atomic_write(path, [json.dumps(collection, separators=(",", ":"), ensure_ascii=False).encode()])
    return path


def write_geojson(
    folder: str | Path,
    boxes: pd.DataFrame,
    heatmaps: Mapping[str, Heatmap],
    truth: pd.DataFrame | None = None,
    slides: Sequence[str] | None = None,
    levels: Sequence[float] = HEATMAP_LEVELS,
) -> dict[str, Path]:
    """``folder/<stem>.geojson`` for every slide of ``slides`` (default: those with boxes or a
    heatmap); ``boxes``/``truth`` have a ``filename`` column. Returns the paths by slide."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(slides if slides is not None else set(boxes["filename"]) | set(heatmaps))
    paths = {}
    for slide in names:
        own_truth = truth[truth["filename"] == slide] if truth is not None else None
        fc = slide_collection(boxes[boxes["filename"] == slide], own_truth, heatmaps.get(slide), levels)
        paths[slide] = write_slide_geojson(folder / f"{Path(slide).stem}.geojson", fc)
    log.info("geojson: %d slide(s) -> %s", len(paths), folder)
    return paths


def read_geojson_boxes(path: str | Path) -> pd.DataFrame:
    """The predicted and truth boxes of a file written here: ``kind`` (predicted | truth),
    ``x1,x2,y1,y2`` (level-0 px: the polygon's bounds), ``score``, ``rank`` (NaN for truth)."""
    path = Path(path)
    try:
        fc = json.loads(path.read_text())
        features = fc["features"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GeoJSONError(f"{path}: not a GeoJSON FeatureCollection ({err})") from err
    kinds = {PREDICTED[0]: "predicted", TRUTH[0]: "truth"}
    rows = []
    for i, f in enumerate(features):
        try:
            kind = kinds.get(f["properties"]["classification"]["name"])
            if kind is None:
                continue
            ring = np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64)
            m = f["properties"].get("measurements", {})
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise GeoJSONError(f"{path}: feature {i} is not a classified Polygon ({err!r})") from err
        x1, y1 = ring.min(axis=0)
        x2, y2 = ring.max(axis=0)
        rows.append((kind, x1, x2, y1, y2, m.get("score", np.nan), m.get("rank", np.nan)))
    return pd.DataFrame(rows, columns=["kind", "x1", "x2", "y1", "y2", "score", "rank"])


def to_asap_xml(collection: Mapping[str, Any]) -> str:
    """The polygons of a FeatureCollection as ASAP annotation XML: one ``Polygon`` annotation per
    exterior ring (ASAP has no holes: they are left out), one group per classification with its
    colour; level-0 px as in the GeoJSON."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    groups: dict[str, str] = {}
    for i, f in enumerate(collection["features"]):
        cls = f["properties"]["classification"]
        colour = "#{:02X}{:02X}{:02X}".format(*cls["color"])
        groups.setdefault(cls["name"], colour)
        geom = f["geometry"]
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for j, polygon in enumerate(polygons):
            a = ET.SubElement(
                annotations,
                "Annotation",
                Name=f["properties"].get("name", f"annotation {i}")
                + (f" #{j + 1}" if len(polygons) > 1 else ""),
                Type="Polygon",
                PartOfGroup=cls["name"],
                Color=colour,
            )
            coords = ET.SubElement(a, "Coordinates")
            for k, (x, y) in enumerate(polygon[0][:-1]):  # ASAP closes the ring itself
                ET.SubElement(coords, "Coordinate", Order=str(k), X=format(x, ".10g"), Y=format(y, ".10g"))
    group_el = ET.SubElement(root, "AnnotationGroups")
    for name, colour in groups.items():
        g = ET.SubElement(group_el, "Group", Name=name, PartOfGroup="None", Color=colour)
        ET.SubElement(g, "Attributes")
    ET.indent(root)
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
