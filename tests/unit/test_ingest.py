"""Ingest: the versioned listing of a data source and the batches extraction is cached on.

The KFP backend caches ``extract`` on its parameters by value (backend/src/v2/cacheutils/cache.go),
so each slide's size and ETag in its batch is what makes a slide replaced under the same name miss
the cache, while the untouched batches still hit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kfp.compiler.pipeline_spec_builder import to_protobuf_value

from digilut.errors import ConfigError, SlideChangedError
from digilut.extract import ExtractConfig
from digilut.ingest import SourceListing, SourceObject, ingest_data, list_source
from digilut.steps.extract import extract_step
from digilut.steps.ingest import ingest_step, list_source_step

CSV = "filename,x1,x2,y1,y2,max_x,max_y\na_a.tif,10,50,10,50,1000,800\nb_a.tif,20,60,20,60,1000,800\n"


def replace(path: Path, data: bytes) -> None:
    """Rewrite ``path`` with ``data`` and a later modification time (same size: only the version tells)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A data folder with three slides of two patients (their bytes are never read here) and train.csv."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name in ("a_a.tif", "a_b.tif", "b_a.tif"):
        (images / name).write_bytes(name.encode() * 10)
    (tmp_path / "data" / "train.csv").write_text(CSV)
    return tmp_path / "data"


def test_the_listing_versions_every_slide_and_train_csv(source):
    listing = list_source(str(source))
    assert [s.name for s in listing.slides] == ["a_a.tif", "a_b.tif", "b_a.tif"]
    assert [s.size for s in listing.slides] == [70, 70, 70]
    assert listing.train_csv is not None and listing.train_csv.size == len(CSV)
    st = (source / "images" / "a_b.tif").stat()
    assert listing.slides[1].etag == f"{st.st_mtime_ns:x}-{st.st_size:x}"  # a folder's stand-in for the ETag
    # a pipeline parameter: JSON, and read back unchanged
    assert SourceListing.from_dict(json.loads(json.dumps(list_source_step(str(source))))) == listing
    (source / "train.csv").unlink()
    assert list_source(str(source)).train_csv is None


@pytest.mark.parametrize("with_csv", [True, False])
def test_the_listing_is_a_value_kfp_accepts_as_a_parameter(source, with_csv):
    """kfp.local (and the SDK) turn a parameter into a protobuf Value and refuse a null in it."""
    if not with_csv:
        (source / "train.csv").unlink()
    value = list_source_step(str(source))
    assert to_protobuf_value(value).struct_value["slides"][0]["name"] == "a_a.tif"
    assert (SourceListing.from_dict(value).train_csv is not None) == with_csv


def test_a_slide_replaced_under_the_same_name_changes_only_its_batch(source, tmp_path):
    before = ingest_step(str(source), list_source_step(str(source)), tmp_path / "ann1", slides_per_batch=2)
    assert [[s["name"] for s in b] for b in before] == [["a_a.tif", "a_b.tif"], ["b_a.tif"]]
    replace(source / "images" / "b_a.tif", b"x" * 70)
    after = ingest_step(str(source), list_source_step(str(source)), tmp_path / "ann2", slides_per_batch=2)
    assert after[0] == before[0]  # patient a's batch: the same value, so extract hits the cache
    assert after[1] != before[1] and after[1][0]["etag"] != before[1][0]["etag"]  # b's: a miss
    assert after[1][0]["size"] == before[1][0]["size"]


def test_ingest_refuses_a_train_csv_changed_since_it_was_listed(source, tmp_path):
    listing = list_source(str(source))
    replace(source / "train.csv", CSV.replace("10,50", "11,51").encode())
    with pytest.raises(SlideChangedError, match=r"train\.csv changed since it was listed"):
        ingest_data(str(source), tmp_path / "ann", listing=listing)


def test_extract_reports_a_slide_changed_since_it_was_listed_and_does_not_extract_it(source, tmp_path):
    (listed,) = [s for s in list_source(str(source)).slides if s.name == "b_a.tif"]
    replace(source / "images" / "b_a.tif", b"y" * 70)
    report = extract_step(str(source), [listed], tmp_path / "extracted", ExtractConfig())
    result = report.slides["b_a.tif"]
    assert result.status == "failed"
    assert "SlideChangedError" in result.error and "b_a.tif changed since it was listed" in result.error
    assert not list((tmp_path / "extracted").glob("shards/*"))


@pytest.mark.parametrize(
    "bad",
    [{"name": "a_a.tif", "size": 1}, {"name": "a_a.tif", "size": "1", "etag": "e"}, ["a_a.tif", 1, "e"]],
)
def test_a_batch_entry_that_is_not_name_size_etag_is_refused_naming_it(bad):
    with pytest.raises(ConfigError, match=r"expected a listed file"):
        SourceObject.from_dict(bad)
