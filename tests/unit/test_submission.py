import logging

import pandas as pd
import pytest

from digilut.annotations import read_test_list
from digilut.errors import AnnotationError
from digilut.score import read_predictions_csv, score_slides
from digilut.submission import SUBMISSION_COLUMNS, make_submission, write_submission


@pytest.fixture
def test_list(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(
        "filename,max_x,max_y,trustii_id\n"
        "b_a.tif,5000,4000,12\n"
        "a_a.tif,10000,8000,3\n"
        "a_a.tif,10000,8000,1\n"
        "c_b.tif,6000,6000,7\n"
    )
    return read_test_list(path).rows


def boxes(rows):
    return pd.DataFrame(rows, columns=["filename", "x1", "x2", "y1", "y2", "score", "rank"])


def test_best_box_goes_to_the_lowest_trustii_id_in_challenge_columns(test_list):
    b = boxes(
        [
            ("a_a.tif", 500, 900, 600, 1000, 3.0, 2),
            ("a_a.tif", 100, 400, 200, 300, 9.0, 1),
            ("b_a.tif", 10, 20, 30, 40, 1.0, 1),
            ("c_b.tif", 4000, 7000, 5000, 5100, 1.0, 1),  # overshoots the slide: clipped
        ]
    )
    sub = make_submission(b, test_list)
    assert tuple(sub.columns) == SUBMISSION_COLUMNS == ("trustii_id", "filename", "y1", "y2", "x1", "x2")
    assert sub.values.tolist() == [
        [1, "a_a.tif", 200, 300, 100, 400],  # rank 1 → id 1
        [3, "a_a.tif", 600, 1000, 500, 900],
        [7, "c_b.tif", 5000, 5100, 4000, 6000],
        [12, "b_a.tif", 30, 40, 10, 20],
    ]


def test_missing_boxes_are_padded_at_the_slide_centre_never_zeros(test_list, caplog):
    b = boxes([("a_a.tif", 100, 400, 200, 300, 9.0, 1), ("zz_a.tif", 1, 2, 3, 4, 1.0, 1)])
    with caplog.at_level(logging.WARNING, logger="digilut.submission"):
        sub = make_submission(b, test_list)
    assert len(sub) == 4 and sorted(sub.trustii_id) == [1, 3, 7, 12]  # every test row answered
    assert sub.set_index("trustii_id").loc[3, ["x1", "x2", "y1", "y2"]].tolist() == [4529, 5471, 3529, 4471]
    assert sub.set_index("trustii_id").loc[12, ["x1", "x2"]].tolist() == [2029, 2971]
    assert not (sub[["x1", "x2", "y1", "y2"]] == 0).all(axis=1).any()
    assert "b_a.tif: 0 box(es) for 1 test rows; padding" in caplog.text
    assert "not in the test list, left out: zz_a.tif" in caplog.text


def test_extra_boxes_keep_the_best(test_list, caplog):
    b = boxes([("b_a.tif", 10 * k, 10 * k + 5, 0, 5, float(k), 0) for k in range(3)]).drop(columns="rank")
    with caplog.at_level(logging.WARNING, logger="digilut.submission"):
        sub = make_submission(b, test_list)
    assert sub.set_index("trustii_id").loc[12, ["x1", "x2"]].tolist() == [20, 25]  # the highest score
    assert "3 boxes for 1 test rows; keeping the best 1" in caplog.text


def test_written_submission_reads_back_and_scores(tmp_path, test_list):
    b = boxes([("a_a.tif", 100, 400, 200, 300, 9.0, 1), ("a_a.tif", 500, 900, 600, 1000, 3.0, 2)])
    path = write_submission(b, test_list, tmp_path / "out" / "submission.csv")
    assert path.read_text().splitlines()[0] == "trustii_id,filename,y1,y2,x1,x2"
    truth = b.drop(columns=["score", "rank"])
    res = score_slides(read_predictions_csv(path), truth)
    assert res.mean_f2 == 1.0


def test_bad_inputs_name_the_missing_columns(test_list):
    with pytest.raises(AnnotationError, match="boxes lack column"):
        make_submission(pd.DataFrame({"filename": ["a_a.tif"]}), test_list)
    with pytest.raises(AnnotationError, match="test list lacks column"):
        make_submission(boxes([]), test_list.drop(columns="trustii_id"))
