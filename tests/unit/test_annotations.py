from pathlib import Path

import pytest

from digilut.annotations import (
    check_slide_name,
    expected_counts,
    list_slides,
    patient_of,
    read_boxes_csv,
    read_test_list,
)
from digilut.errors import AnnotationError, UnsafePathError

DATA = Path(__file__).parents[1] / "data"
HEADER = "filename,x1,x2,y1,y2,max_x,max_y\n"


def write(tmp_path: Path, text: str, name: str = "train.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_real_rows_are_read_and_the_overshooting_box_is_clipped_not_dropped():
    table = read_boxes_csv(DATA / "real_boxes_sample.csv")
    assert len(table.rows) == 9
    over = table.rows[(table.rows.filename == "G97Fh5Kl2L_b.tif") & (table.rows.x1 == 79207)]
    assert over.x2.item() == 82944  # clipped to max_x (was 83103)
    (note,) = table.problems
    assert not note.dropped and note.line == 10 and "x2=83103" in str(note) and "clipped" in str(note)
    assert set(table.rows.patient) == {"bGaslniO4a", "2qj5MlLLBT", "G97Fh5Kl2L"}


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ("a_a.tif,500,400,10,20,1000,1000", "inverted box"),
        ("a_a.tif,500,500,10,20,1000,1000", "zero-area box"),
        ("a_a.tif,-50,-10,10,20,1000,1000", "outside the slide"),
        ("a_a.tif,1200,1300,10,20,1000,1000", "outside the slide"),
        ("a_a.tif,10,20,10,800,1000,1000", "aspect ratio 79.0"),
        ("a_a.tif,10,2x0,10,20,1000,1000", "x2=2x0 is not an integer"),
        ("a_a.tif,10,,10,20,1000,1000", "x2=<empty> is not an integer"),
        ("a_a.tif,10,NaN,10,20,1000,1000", "x2=NaN is not an integer"),
        ("../etc/a_a.tif,10,20,10,20,1000,1000", "not a plain file name"),
        ("/abs/a_a.tif,10,20,10,20,1000,1000", "not a plain file name"),
        ("a_a.png,10,20,10,20,1000,1000", "does not end in .tif"),
    ],
)
def test_bad_row_is_dropped_with_its_line_and_value(tmp_path, row, fragment):
    good = "a_a.tif,100,200,100,200,1000,1000\n"
    table = read_boxes_csv(write(tmp_path, HEADER + good + row + "\n"))
    assert len(table.rows) == 1  # the good row survives
    (problem,) = table.problems
    assert problem.dropped and problem.line == 3
    assert fragment in str(problem)


def test_duplicates_and_inconsistent_slide_sizes_are_dropped(tmp_path):
    text = HEADER + "a_a.tif,1,20,1,20,1000,1000\na_a.tif,1,20,1,20,1000,1000\na_a.tif,30,50,1,20,999,1000\n"
    table = read_boxes_csv(write(tmp_path, text))
    assert len(table.rows) == 1
    assert ["duplicate" in str(p) for p in table.problems] == [True, False]
    assert "disagree with earlier rows" in str(table.problems[1])


def test_boxes_for_slides_not_on_disk_are_dropped(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a_a.tif").write_bytes(b"x")
    text = HEADER + "a_a.tif,1,20,1,20,1000,1000\nb_a.tif,1,20,1,20,1000,1000\n"
    table = read_boxes_csv(write(tmp_path, text), slides=list_slides(images))
    assert table.rows.filename.tolist() == ["a_a.tif"]
    assert "b_a.tif is not among the 1 slides found" in str(table.problems[0])


def test_newline_in_a_quoted_file_name_is_refused(tmp_path):
    table = read_boxes_csv(write(tmp_path, HEADER + '"a\nb_a.tif",1,20,1,20,1000,1000\n'))
    assert table.rows.empty and "not a plain file name" in str(table.problems[0])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "CSV is empty"), ("filename,x1,x2\n", "missing column(s) y1, y2, max_x, max_y")],
)
def test_unusable_csv_raises(tmp_path, text, fragment):
    with pytest.raises(AnnotationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_boxes_csv(write(tmp_path, text))


def test_missing_csv_raises_naming_it(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_boxes_csv(tmp_path / "nope.csv")


def test_test_list_counts_and_duplicate_ids(tmp_path):
    rows = "a_a.tif,10,10,1\na_a.tif,10,10,2\nb_b.tif,10,10,3\nb_b.tif,10,10,3\n"
    text = "filename,max_x,max_y,trustii_id\n" + rows
    table = read_test_list(write(tmp_path, text, "test.csv"))
    assert expected_counts(table.rows) == {"a_a.tif": 2, "b_b.tif": 1}
    assert "trustii_id=3 repeats" in str(table.problems[0])


def test_patient_id_and_name_checks():
    assert patient_of("bGaslniO4a_a.tif") == "bGaslniO4a"
    assert patient_of("odd.tif") == "odd"
    assert check_slide_name("x_b.tiff") == "x_b.tiff"
    for bad in ["..", "../x.tif", "a/b.tif", "a\\b.tif", "a\nb.tif", "", "x.tif\x00"]:
        with pytest.raises(UnsafePathError):
            check_slide_name(bad)
