import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from digilut.cli import app
from digilut.errors import AnnotationError
from digilut.score import giou_matrix, match_slide, read_predictions_csv, read_truth_csv, score_slides

SQ = (0, 100, 0, 100)  # x1, x2, y1, y2


def boxes(slide, *rows):
    return pd.DataFrame([(slide, *r) for r in rows], columns=["filename", "x1", "x2", "y1", "y2"])


def test_giou_hand_computed():
    g = giou_matrix(
        np.array([SQ, (200, 300, 0, 100), (0, 50, 0, 100), (25, 75, 25, 75), (0, 0, 0, 0)]),
        np.array([SQ, (0, 200, 0, 200)]),
    )
    assert g[0] == pytest.approx([1.0, 0.25])  # exact; nested in a 4× box: IoU = hull ratio = 0.25
    assert g[1, 0] == pytest.approx(0 - (300 * 100 - 2 * 100 * 100) / (300 * 100))  # disjoint: -1/3
    assert g[2, 0] == pytest.approx(0.5)  # half of the box: IoU 0.5, hull = the truth box
    assert g[3, 0] == pytest.approx(0.25)  # centred quarter
    assert g[4, 0] == pytest.approx(-(100 * 100 - 100 * 100) / (100 * 100))  # padding: IoU 0
    assert (g[4] <= 0).all()


def test_exact_match_scores_one():
    assert match_slide(np.array([SQ]), np.array([SQ])) == (1, 0, 0, 1.0)


@pytest.mark.parametrize(
    ("height", "hit"),
    [(51, True), (50, False), (49, False)],  # GIoU = height/100 for a box inside the truth, sharing its x
)
def test_giou_threshold_is_strictly_above_half(height, hit):
    tp, fp, fn, f2 = match_slide(np.array([(0, 100, 0, height)]), np.array([SQ]))
    assert (tp, fp, fn) == ((1, 0, 0) if hit else (0, 1, 1))
    assert f2 == (1.0 if hit else 0.0)


def test_duplicates_count_once_one_to_one_but_twice_lenient():
    pred, truth = np.array([SQ, SQ]), np.array([SQ])
    assert match_slide(pred, truth) == (1, 1, 0, pytest.approx(5 / 6))  # 5·1 / (5·1 + 4·0 + 1)
    tp, fp, fn, f2 = match_slide(pred, truth, lenient=True)
    assert (tp, fp, fn, f2) == (2, 0, 0, 1.0)


def test_nested_prediction_is_a_miss():
    assert match_slide(np.array([(0, 200, 0, 200)]), np.array([SQ]))[:3] == (0, 1, 1)


def test_padding_boxes_are_misses():
    tp, fp, fn, f2 = match_slide(np.array([SQ, (0, 0, 0, 0)]), np.array([SQ, (500, 600, 500, 600)]))
    assert (tp, fp, fn) == (1, 1, 1)
    assert f2 == pytest.approx(5 / (5 + 4 + 1))


def test_disjoint_boxes_score_zero():
    assert match_slide(np.array([(500, 600, 0, 100)]), np.array([SQ])) == (0, 1, 1, 0.0)


def test_matching_is_a_maximum_assignment():
    # a hits both truths, b only t1: one-to-one must give a→t2, b→t1 (2 TP), not a→t1.
    t = np.array([SQ, (40, 140, 0, 100)])
    pred = np.array([(20, 120, 0, 100), SQ])
    assert (giou_matrix(pred, t) > 0.5).tolist() == [[True, True], [True, False]]
    assert match_slide(pred, t)[:3] == (2, 0, 0)


def test_mean_over_slides_empty_prediction_and_left_out_slides():
    truth = pd.concat([boxes("a.tif", SQ), boxes("b.tif", SQ, (300, 400, 300, 400))])
    pred = pd.concat([boxes("a.tif", SQ), boxes("zzz.tif", SQ)])  # b.tif: no prediction
    res = score_slides(pred, truth)
    table = res.slides.set_index("slide")
    assert table.loc["a.tif", "f2"] == 1.0
    assert table.loc["b.tif", ["tp", "fp", "fn", "f2"]].tolist() == [0, 0, 2, 0.0]
    assert res.mean_f2 == pytest.approx(0.5)
    assert res.left_out == ["zzz.tif"]  # no truth boxes: out of the mean, and said so
    assert "left out of the mean" in res.format_table()
    assert any("b.tif: 0 predicted box(es), expected exactly 2" in w for w in res.warnings)


def test_count_warning_uses_the_test_list_counts():
    truth = boxes("a.tif", SQ)
    res = score_slides(boxes("a.tif", SQ), truth, counts={"a.tif": 3, "t.tif": 2})
    assert res.slides["n_expected"].tolist() == [3]
    assert res.warnings == ["a.tif: 1 predicted box(es), expected exactly 3"]
    assert res.left_out == ["t.tif"]


def test_predictions_csv_in_submission_column_order(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("trustii_id,filename,y1,y2,x1,x2\n1,a.tif,0,100,0,100\n2,a.tif,0,0,0,0\n")
    pred = read_predictions_csv(path)
    assert pred[["x1", "x2", "y1", "y2"]].values.tolist() == [[0, 100, 0, 100], [0, 0, 0, 0]]  # padding kept
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,x1,x2,y1,y2\na.tif,0,100,0,100\na.tif,zero,100,0,100\n")
    with pytest.raises(AnnotationError, match="line 3: x1='zero'"):
        read_predictions_csv(bad)
    cols = tmp_path / "cols.csv"
    cols.write_text("filename,x,y\na.tif,1,2\n")
    with pytest.raises(AnnotationError, match=r"missing column\(s\) x1, x2, y1, y2"):
        read_predictions_csv(cols)


def test_truth_csv_challenge_format_drops_bad_rows(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(
        "filename,x1,x2,y1,y2,max_x,max_y\na.tif,0,100,0,100,1000,1000\na.tif,100,0,0,100,1000,1000\n"
    )
    truth = read_truth_csv(path)
    assert truth[["x1", "x2"]].values.tolist() == [[0, 100]]  # inverted row dropped
    with pytest.raises(AnnotationError, match="not found"):
        read_truth_csv(tmp_path / "missing.csv")


def test_cli_score_table_json_and_lenient(tmp_path):
    truth = tmp_path / "truth.csv"
    boxes("a_a.tif", SQ, (300, 400, 300, 400)).to_csv(truth, index=False)
    pred = tmp_path / "pred.csv"
    boxes("a_a.tif", SQ, SQ).to_csv(pred, index=False)  # a duplicate instead of the second lesion
    runner = CliRunner()
    out = runner.invoke(app, ["score", str(pred), str(truth)])
    assert out.exit_code == 0, out.output
    assert "mean F2 = 0.5000" in out.output  # tp=1, fp=1, fn=1: 5 / (5 + 4 + 1)
    out = runner.invoke(app, ["score", str(pred), str(truth), "--json", "--lenient"])
    data = json.loads(out.output)
    assert data["mode"] == "lenient"
    assert data["mean_f2"] == pytest.approx(5 * 1 * 0.5 / (4 * 1 + 0.5))  # P = 2/2, R = 1/2
    tl = tmp_path / "test.csv"
    tl.write_text(
        "filename,max_x,max_y,trustii_id\na_a.tif,1000,1000,1\na_a.tif,1000,1000,2\na_a.tif,1000,1000,3\n"
    )
    data = json.loads(
        runner.invoke(app, ["score", str(pred), str(truth), "--json", "--test-list", str(tl)]).output
    )
    assert data["warnings"] == ["a_a.tif: 2 predicted box(es), expected exactly 3"]
    out = runner.invoke(app, ["score", str(tmp_path / "nope.csv"), str(truth)])
    assert out.exit_code == 2 and "not found" in out.output
