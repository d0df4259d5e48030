import pandas as pd
import pytest
from box_fixtures import oracle_patches, truth_frame
from typer.testing import CliRunner

from digilut.cli import app

A = [(2000, 3000, 3000, 3700)]
B = [(1000, 2000, 1000, 1800), (5000, 6200, 5000, 5900)]


@pytest.fixture
def inputs(tmp_path):
    probs = tmp_path / "probs.parquet"
    pd.concat([oracle_patches(A, slide="p1_a.tif"), oracle_patches(B, slide="p1_b.tif")]).to_parquet(probs)
    truth = tmp_path / "truth.csv"
    t = pd.concat([truth_frame("p1_a.tif", A), truth_frame("p1_b.tif", B)])
    t.assign(max_x=8192, max_y=8192).to_csv(truth, index=False)
    test_list = tmp_path / "test.csv"
    test_list.write_text(
        "filename,max_x,max_y,trustii_id\np1_a.tif,8192,8192,1\np1_b.tif,8192,8192,2\np1_b.tif,8192,8192,3\n"
    )
    return probs, truth, test_list


def test_boxes_from_a_test_list_write_boxes_submission_and_pictures(tmp_path, inputs):
    probs, truth, test_list = inputs
    out, sub, pics = tmp_path / "boxes.csv", tmp_path / "sub.csv", tmp_path / "pics"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["boxes", str(probs), str(out), "--counts-from", str(test_list), "--submission", str(sub),
         "--pictures", str(pics)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    boxes = pd.read_csv(out)
    assert boxes.groupby("filename").size().to_dict() == {"p1_a.tif": 1, "p1_b.tif": 2}
    assert sub.read_text().splitlines()[0] == "trustii_id,filename,y1,y2,x1,x2"
    assert sorted(p.name for p in pics.iterdir()) == ["p1_a.png", "p1_b.png"]
    scored = runner.invoke(app, ["score", str(sub), str(truth)])
    assert scored.exit_code == 0 and "mean F2 = 1.0000" in scored.output


def test_boxes_with_truth_counts_and_another_method(tmp_path, inputs):
    probs, truth, _ = inputs
    out = tmp_path / "boxes.csv"
    result = CliRunner().invoke(
        app, ["boxes", str(probs), str(out), "--counts-from", str(truth), "--method", "fuse", "--high", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 3


def test_boxes_geojson_holds_the_csv_boxes_and_the_truth_for_qupath_and_asap(tmp_path, inputs):
    import xml.etree.ElementTree as ET

    from digilut.geojson import read_geojson_boxes

    probs, truth, _ = inputs
    out, folder = tmp_path / "boxes.csv", tmp_path / "geojson"
    result = CliRunner().invoke(
        app,
        ["boxes", str(probs), str(out), "--counts-from", str(truth), "--geojson", str(folder), "--asap"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "p1_a.geojson",
        "p1_a.xml",
        "p1_b.geojson",
        "p1_b.xml",
    ]
    boxes = pd.read_csv(out)
    for slide, want_truth in (("p1_a.tif", A), ("p1_b.tif", B)):
        back = read_geojson_boxes(folder / slide.replace(".tif", ".geojson"))
        pred = back[back.kind == "predicted"].sort_values("rank")
        mine = boxes[boxes.filename == slide].sort_values("rank")
        assert (
            pred[["x1", "x2", "y1", "y2"]].to_numpy().tolist()
            == mine[["x1", "x2", "y1", "y2"]].to_numpy().tolist()
        )
        assert pred["score"].to_numpy() == pytest.approx(mine["score"].to_numpy())
        assert sorted(map(tuple, back[back.kind == "truth"][["x1", "x2", "y1", "y2"]].to_numpy())) == sorted(
            want_truth
        )
        xml = ET.parse(folder / slide.replace(".tif", ".xml")).getroot()
        groups = [a.get("PartOfGroup") for a in xml.iter("Annotation")]
        assert groups.count("Predicted lesion") == len(mine) and groups.count("Truth lesion") == len(
            want_truth
        )


def test_boxes_errors_exit_2_with_the_reason(tmp_path, inputs):
    probs, truth, _ = inputs
    runner = CliRunner()
    result = runner.invoke(app, ["boxes", str(probs), str(tmp_path / "o.csv"), "--method", "kmeans"])
    assert result.exit_code == 2 and "method='kmeans'" in result.output
    result = runner.invoke(
        app,
        ["boxes", str(probs), str(tmp_path / "o.csv"), "--counts-from", str(truth), "--submission", "s.csv"],
    )
    assert result.exit_code == 2 and "--submission needs --counts-from TEST_LIST" in result.output
