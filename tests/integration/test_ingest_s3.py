"""The versioned listing of an S3 data source: a slide replaced under the same name gets a new
ETag in its batch (so the backend's cache misses only that batch) and is refused by extraction."""

from __future__ import annotations

from pathlib import Path

import pytest

from digilut.errors import SlideChangedError
from digilut.ingest import check_version, ingest_data, list_source
from digilut.storage import upload_file

pytestmark = pytest.mark.integration

CSV = "filename,x1,x2,y1,y2,max_x,max_y\na_a.tif,10,50,10,50,1000,800\n"


def test_an_s3_slide_replaced_under_the_same_name_changes_its_etag_and_only_its_batch(
    s3_env, s3_prefix, tmp_path: Path
):
    def put(rel: str, data: bytes) -> None:
        path = tmp_path / "up" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        upload_file(s3_env, path, f"{s3_prefix}/{rel}")

    for name in ("a_a.tif", "b_a.tif"):
        put(f"images/{name}", name.encode() * 10)
    put("images/notes.txt", b"not a slide")
    put("train.csv", CSV.encode())
    uri = f"s3://{s3_env.bucket}/{s3_prefix}"
    before = list_source(uri)
    assert [(s.name, s.size) for s in before.slides] == [("a_a.tif", 70), ("b_a.tif", 70)]
    assert all(s.etag for s in before.slides) and before.train_csv is not None
    batches = ingest_data(uri, tmp_path / "ann1", batch_size=1, listing=before).versioned_batches()

    put("images/b_a.tif", b"z" * 70)  # same name, same size, new content
    after = list_source(uri)
    assert after.slides[0] == before.slides[0]
    assert after.slides[1].size == 70 and after.slides[1].etag != before.slides[1].etag
    again = ingest_data(uri, tmp_path / "ann2", batch_size=1, listing=after).versioned_batches()
    assert again[0] == batches[0] and again[1] != batches[1]
    with pytest.raises(SlideChangedError, match=r"images/b_a\.tif changed since it was listed"):
        check_version(uri, "images/b_a.tif", before.slides[1])
    check_version(uri, "images/b_a.tif", after.slides[1])
