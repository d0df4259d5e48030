"""GeoJSON for QuPath/ASAP: RFC 7946 schema, ring closure and winding, level-0 coordinates, round trip."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pytest

from digilut.geojson import (
    GeoJSONError,
    heatmap_class,
    read_geojson_boxes,
    slide_collection,
    to_asap_xml,
    write_geojson,
)
from digilut.heatmap import build_heatmaps

SCHEMA = json.loads(
    (Path(__file__).parents[1] / "data" / "rfc7946-featurecollection.schema.json").read_text()
)
STRIDE = 256


def patches(slide: str, high: set[tuple[int, int]], *, dx: int = 0, dy: int = 0, n: int = 10) -> pd.DataFrame:
    """An ``n``×``n`` grid of non-overlapping 256 px patches at level-0 offset (dx, dy); prob 1 at
    the (row, col) cells in ``high``, 0 elsewhere."""
    rows = [
        (slide, dx + c * STRIDE, dy + r * STRIDE, STRIDE, STRIDE, 1.0 if (r, c) in high else 0.0)
        for r in range(n)
        for c in range(n)
    ]
    return pd.DataFrame(rows, columns=["slide", "x0", "y0", "w0", "h0", "prob"])


BLOCK = {(r, c) for r in range(3, 6) for c in range(2, 7)}  # rows 3-5, columns 2-6
RING = {(r, c) for r in range(2, 7) for c in range(2, 7)} - {(4, 4)}  # a 5×5 block with a hole
BOXES = pd.DataFrame(
    {
        "filename": ["a.tif", "a.tif", "b.tif"],
        "x1": [1000, 5120, 10],
        "x2": [2000, 6400, 90],
        "y1": [300, 7000, 20],
        "y2": [1250, 7936, 80],
        "score": [0.93, 0.41, 0.5],
        "rank": [1, 2, 1],
    }
)
TRUTH = pd.DataFrame({"filename": ["a.tif"], "x1": [1024], "x2": [1900], "y1": [310], "y2": [1200]})


def _rings(fc: dict) -> list[tuple[str, int, list[list[float]]]]:
    """(class, index in its polygon, ring) of every ring of every feature."""
    out = []
    for f in fc["features"]:
        g = f["geometry"]
        polygons = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        for polygon in polygons:
            out += [(f["properties"]["classification"]["name"], i, ring) for i, ring in enumerate(polygon)]
    return out


def _area(ring: list[list[float]]) -> float:
    a = np.asarray(ring)
    return 0.5 * float(np.dot(a[:-1, 0], a[1:, 1]) - np.dot(a[1:, 0], a[:-1, 1]))


def test_slide_collection_is_rfc7946_with_closed_rings_wound_right_and_qupath_properties() -> None:
    hm = build_heatmaps(patches("a.tif", RING))["a.tif"]
    fc = slide_collection(BOXES[BOXES.filename == "a.tif"], TRUTH, hm)
    jsonschema.validate(fc, SCHEMA, cls=jsonschema.Draft202012Validator)
    rings = _rings(fc)
    assert rings and all(ring[0] == ring[-1] and len(ring) >= 4 for _, _, ring in rings)
    assert all((_area(ring) > 0) == (i == 0) for _, i, ring in rings)  # exteriors CCW, holes CW
    for f in fc["features"]:
        p = f["properties"]
        assert p["objectType"] == "annotation" and isinstance(p["name"], str)
        assert len(p["classification"]["color"]) == 3 and all(
            0 <= v <= 255 for v in p["classification"]["color"]
        )
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["Predicted lesion"] * 2 + ["Truth lesion"] + [heatmap_class(v) for v in (0.5, 0.7, 0.9)]
    assert fc["features"][0]["properties"]["measurements"] == {"score": 0.93, "rank": 1.0}


def test_the_schema_refuses_what_qupath_could_not_read() -> None:
    good = slide_collection(BOXES[BOXES.filename == "b.tif"])
    jsonschema.validate(good, SCHEMA, cls=jsonschema.Draft202012Validator)
    for broken in (
        {**good, "type": "Feature"},
        {"type": "FeatureCollection", "features": [{**good["features"][0], "properties": "x"}]},
        {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
            "type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}}]},  # a ring needs 4 positions
    ):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_boxes_round_trip_through_the_files(tmp_path: Path) -> None:
    hms = build_heatmaps(pd.concat([patches("a.tif", BLOCK), patches("b.tif", set())]))
    paths = write_geojson(tmp_path, BOXES, hms, TRUTH)
    assert sorted(paths) == ["a.tif", "b.tif"] and paths["a.tif"] == tmp_path / "a.geojson"
    back = read_geojson_boxes(paths["a.tif"])
    pred = back[back.kind == "predicted"].reset_index(drop=True)
    want = BOXES[BOXES.filename == "a.tif"].reset_index(drop=True)
    for col in ("x1", "x2", "y1", "y2", "score", "rank"):
        np.testing.assert_array_equal(pred[col].to_numpy(), want[col].to_numpy().astype(float))
    t = back[back.kind == "truth"]
    assert t[["x1", "x2", "y1", "y2"]].to_numpy().tolist() == [[1024, 1900, 310, 1200]]
    b = json.loads(paths["b.tif"].read_text())  # no region ≥ 0.5 on b: no heatmap feature
    assert [f["properties"]["classification"]["name"] for f in b["features"]] == ["Predicted lesion"]
    (tmp_path / "bad.geojson").write_text('{"type": "Feature"}')
    with pytest.raises(GeoJSONError, match=r"bad\.geojson"):
        read_geojson_boxes(tmp_path / "bad.geojson")


@pytest.mark.parametrize(("dx", "dy"), [(0, 0), (3 * STRIDE, 1000)])
def test_heatmap_contour_is_the_cells_outline_in_level0_pixels(dx: int, dy: int) -> None:
    hm = build_heatmaps(patches("a.tif", BLOCK, dx=dx, dy=dy))["a.tif"]
    fc = slide_collection(BOXES.iloc[:0], None, hm, levels=(0.5,))
    ((polygon,),) = (f["geometry"]["coordinates"] for f in fc["features"])
    (exterior,) = polygon
    ring = np.asarray(exterior)
    # cells of rows 3-5 and columns 2-6 cover x 512..1792, y 768..1536 (+ the slide's offset);
    # the 0.5 contour between cell centres at 1 and 0 runs along the cells' edges
    assert ring[:, 0].min() == pytest.approx(dx + 2 * STRIDE, abs=0.1)
    assert ring[:, 0].max() == pytest.approx(dx + 7 * STRIDE, abs=0.1)
    assert ring[:, 1].min() == pytest.approx(dy + 3 * STRIDE, abs=0.1)
    assert ring[:, 1].max() == pytest.approx(dy + 6 * STRIDE, abs=0.1)


def test_a_hole_in_the_heatmap_is_a_hole_in_the_polygon() -> None:
    hm = build_heatmaps(patches("a.tif", RING))["a.tif"]
    fc = slide_collection(BOXES.iloc[:0], None, hm, levels=(0.5,))
    ((polygon,),) = (f["geometry"]["coordinates"] for f in fc["features"])
    exterior, hole = (np.asarray(r) for r in polygon)
    assert hole[:, 0].min() > exterior[:, 0].min() and hole[:, 0].max() < exterior[:, 0].max()
    assert (hole[:, 0].min() + hole[:, 0].max()) / 2 == pytest.approx(4.5 * STRIDE, abs=0.1)  # cell (4, 4)


def test_asap_xml_has_every_exterior_ring_in_its_group() -> None:
    hm = build_heatmaps(patches("a.tif", BLOCK))["a.tif"]
    fc = slide_collection(BOXES[BOXES.filename == "a.tif"], TRUTH, hm, levels=(0.5,))
    root = ET.fromstring(to_asap_xml(fc))
    anns = root.findall("./Annotations/Annotation")
    assert [a.get("PartOfGroup") for a in anns] == ["Predicted lesion"] * 2 + [
        "Truth lesion",
        "Heatmap ≥ 0.5",
    ]
    assert {g.get("Name") for g in root.findall("./AnnotationGroups/Group")} == {
        "Predicted lesion", "Truth lesion", "Heatmap ≥ 0.5"
    }  # fmt: skip
    first = [(float(c.get("X")), float(c.get("Y"))) for c in anns[0].findall("./Coordinates/Coordinate")]
    assert first == [tuple(p) for p in fc["features"][0]["geometry"]["coordinates"][0][:-1]]
    assert anns[0].get("Color") == "#DC143C"


def _pred(slides: dict[str, set[tuple[int, int]]]) -> pd.DataFrame:
    p = pd.concat([patches(s, high) for s, high in slides.items()], ignore_index=True)
    return p.assign(label=(p["prob"] > 0.5).astype(int))


def test_the_report_links_each_slide_picture_and_geojson(tmp_path: Path) -> None:
    from digilut.evaluate import evaluate_predictions
    from digilut.report import write_report

    pred = _pred({"a_a.tif": BLOCK, "a_b.tif": RING})
    truth = pd.DataFrame(
        {
            "filename": ["a_a.tif", "a_b.tif"],
            "x1": [512, 512],
            "x2": [1792, 1792],
            "y1": [768, 512],
            "y2": [1536, 1792],
        }
    )
    ev = evaluate_predictions(pred, truth)
    hms = build_heatmaps(pred)
    write_geojson(tmp_path / "geojson", ev.boxes, hms, truth)
    text = write_report(ev, pred, truth, tmp_path, heatmaps=hms).read_text()
    for stem in ("a_a", "a_b"):
        for link in (f"pictures/{stem}.png", f"geojson/{stem}.geojson"):
            assert f'href="{link}"' in text and (tmp_path / link).is_file()
    back = read_geojson_boxes(tmp_path / "geojson" / "a_a.geojson")
    assert len(back[back.kind == "truth"]) == 1 and len(back[back.kind == "predicted"]) == 1


def test_submission_step_writes_the_submitted_boxes_as_geojson(tmp_path: Path) -> None:
    from digilut.boxes import BoxesConfig
    from digilut.steps.common import PREDICTIONS_NAME
    from digilut.steps.submission import submission_step

    data, preds, results = tmp_path / "data", tmp_path / "pred", tmp_path / "results"
    data.mkdir()
    preds.mkdir()
    _pred({"p1_a.tif": BLOCK, "p1_b.tif": RING}).to_parquet(preds / PREDICTIONS_NAME)
    (data / "test.csv").write_text(
        "filename,max_x,max_y,trustii_id\np1_a.tif,2560,2560,1\np1_a.tif,2560,2560,2\np1_b.tif,2560,2560,3\n"
    )
    submission_step(str(data), preds, results, BoxesConfig())
    boxes = pd.read_csv(results / "boxes.csv")
    for slide, n in (("p1_a.tif", 2), ("p1_b.tif", 1)):
        back = read_geojson_boxes(results / "geojson" / f"{Path(slide).stem}.geojson")
        want = boxes[boxes.filename == slide].sort_values("rank")
        assert len(back) == n and back.kind.eq("predicted").all()
        np.testing.assert_allclose(back[["x1", "x2", "y1", "y2"]], want[["x1", "x2", "y1", "y2"]])
