import json
import shutil

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image

from digilut.errors import ConfigError
from digilut.extract import ExtractConfig, PrepareReport, extract_slide
from digilut.files import file_sha256
from digilut.manifest import read_manifest, read_patch
from digilut.shards import read_index
from digilut.steps.prepare import prepare_step


def test_report_manifest_and_one_shard_per_slide(tiny_prepared, tiny_data):
    out, report = tiny_prepared
    assert set(report.slides) == {p.name for p in (tiny_data / "images").iterdir()}
    assert all(r.status == "ok" and r.patches > 0 for r in report.slides.values())
    m = read_manifest(out, require=("slide", "x0", "label", "overlap"))
    assert len(m) == report.patches
    assert sorted(p.name.rsplit("-", 1)[0] for p in out.glob("*.shard")) == sorted(
        p.stem for p in (tiny_data / "images").iterdir()
    )  # one content-addressed shard per slide: <stem>-<sha>.shard
    for shard, rows in m.groupby("shard"):
        assert len(read_index(out / shard)) == len(rows)
    saved = json.loads((out / "report.json").read_text())
    assert saved["patches"] == len(m) and saved["slides"][m.slide.iloc[0]]["status"] == "ok"
    assert (out / "thumbnails" / m.slide.iloc[0].replace(".tif", ".png")).is_file()


def test_patch_pixels_equal_openslide_at_the_same_level0_coordinates(tiny_prepared, tiny_data):
    out, _ = tiny_prepared
    m = read_manifest(out)
    for _, row in m.sample(8, random_state=0).iterrows():
        assert row.w0 == row.h0 == 512 and row.level == 1  # 256 px at 0.5 µm/px on a 0.25 µm/px slide
        osl = openslide.OpenSlide(tiny_data / "images" / row.slide)
        truth = np.asarray(osl.read_region((int(row.x0), int(row.y0)), 1, (256, 256)))[..., :3].astype(int)
        ours = read_patch(out, row).astype(int)
        assert ours.shape == (256, 256, 3)
        assert np.abs(ours - truth).mean() < 2.5  # only our JPEG re-encoding (q90) differs


def test_positive_patches_lie_on_the_boxes(tiny_prepared, tiny_data):
    out, _ = tiny_prepared
    m = read_manifest(out, require=("label",))
    boxes = pd.read_csv(tiny_data / "train.csv")
    assert m.label.sum() > 0
    for _, p in m[m.label == 1].iterrows():
        b = boxes[boxes.filename == p.slide]
        ix = np.minimum(p.x0 + p.w0, b.x2) - np.maximum(p.x0, b.x1)
        iy = np.minimum(p.y0 + p.h0, b.y2) - np.maximum(p.y0, b.y1)
        assert ((ix > 0) & (iy > 0)).any()
    # patches on slides without boxes are all negative
    assert m[~m.slide.isin(boxes.filename)].label.sum() == 0


def test_overlapping_stride_gives_about_four_times_the_patches(tiny_data, tmp_path, tiny_prepared):
    slide = sorted((tiny_data / "images").iterdir())[0]
    r256 = tiny_prepared[1].slides[slide.name].patches
    r128 = extract_slide(slide, tmp_path, ExtractConfig(stride_px=128))
    m = pd.read_parquet(tmp_path / "parts" / slide.name.replace(".tif", ".parquet"))
    assert 2.5 * r256 < r128.patches < 5 * r256
    assert sorted(np.diff(np.unique(m.x0)))[0] == 256  # stride 128 at 20x = 256 level-0 px


def test_resume_reuses_finished_slides_and_redoes_changed_ones(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    out = tmp_path / "out"
    first = prepare_step(data, out, ExtractConfig(), workers=0)
    victim = sorted(first.slides)[0]
    (shard,) = out.glob(victim.replace(".tif", "-*.shard"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")  # corrupt one finished shard
    second = prepare_step(data, out, ExtractConfig(), workers=0)
    assert (
        second.slides[victim].seconds > 0
        and second.slides[victim].shard_sha256 == first.slides[victim].shard_sha256
    )
    assert file_sha256(shard) == first.slides[victim].shard_sha256  # the damaged shard was replaced
    others = [s for s in first.slides if s != victim]
    assert all(second.slides[s].seconds == first.slides[s].seconds for s in others)  # reused as is
    assert PrepareReport.load(out / "report.json").patches == first.patches


def test_bad_slides_are_reported_and_skipped_in_worker_processes(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "images" / "zero_a.tif").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(data / "images" / "png_a.tif", format="PNG")
    good = sorted((tiny_data / "images").iterdir())[0].read_bytes()
    (data / "images" / "cut_a.tif").write_bytes(good[: int(len(good) * 0.6)])
    report = prepare_step(data, tmp_path / "out", ExtractConfig(), workers=2)
    assert report.slides["zero_a.tif"].status == "failed" and "0 bytes" in report.slides["zero_a.tif"].error
    assert (
        report.slides["png_a.tif"].status == "failed"
        and "not a readable TIFF" in report.slides["png_a.tif"].error
    )
    assert report.slides["cut_a.tif"].status == "failed" and "cut_a.tif" in report.slides["cut_a.tif"].error
    ok = [s for s, r in report.slides.items() if r.status == "ok"]
    assert len(ok) == 6
    assert set(read_manifest(tmp_path / "out").slide) == set(ok)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="stride_px=0"):
        ExtractConfig(stride_px=0)
    with pytest.raises(ConfigError, match=r"min_tissue_fraction=1\.5"):
        ExtractConfig(min_tissue_fraction=1.5)


def test_extract_step_puts_shards_in_the_store_and_merge_copies_none(tiny_data, tiny_prepared, tmp_path):
    """The pipeline's artifacts hold no shard (the KFP launcher downloads input artifacts whole):
    extract puts each slide's shard in the shard store under a content-addressed name, merge only
    names the store, and the patches read from there are those of ``digilut prepare``."""
    from digilut.errors import ShardError
    from digilut.ingest import list_source
    from digilut.manifest import shard_store, write_shard_store
    from digilut.steps.extract import extract_step, shard_store_for
    from digilut.steps.merge import merge_step

    listed = {s.name: s for s in list_source(str(tiny_data)).slides}
    slides = sorted(listed)[:2]
    store = tmp_path / "store"
    for k, name in enumerate(slides):  # two extraction batches
        extract_step(
            str(tiny_data),
            [listed[name]],
            tmp_path / f"ex{k}",
            ExtractConfig(),
            workers=0,
            shards_uri=str(store),
        )
    batches = [tmp_path / "ex0", tmp_path / "ex1"]
    merge_step(batches, tmp_path / "patches", tmp_path / "thumbs")
    assert sorted(p.name for p in tmp_path.rglob("*.shard")) == sorted(p.name for p in store.iterdir())
    assert shard_store(tmp_path / "patches") == str(store)
    m = read_manifest(tmp_path / "patches").sort_values(["slide", "y0", "x0"]).reset_index(drop=True)
    assert set(m["shard"]) == {p.name for p in store.iterdir()} and len(set(m["shard"])) == 2
    prepared, _ = tiny_prepared
    ref = read_manifest(prepared)
    ref = ref[ref["slide"].isin(slides)].sort_values(["slide", "y0", "x0"]).reset_index(drop=True)
    cols = ["slide", "x0", "y0", "offset", "nbytes"]
    pd.testing.assert_frame_equal(m[cols], ref[cols])
    for i in (0, len(m) // 2, len(m) - 1):
        np.testing.assert_array_equal(read_patch(str(store), m.iloc[i]), read_patch(prepared, ref.iloc[i]))

    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    extract_step(
        str(tiny_data),
        [listed[slides[0]]],
        tmp_path / "again",
        ExtractConfig(),
        workers=0,
        shards_uri=str(store),
    )
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before  # already there: not rewritten

    write_shard_store(tmp_path / "ex1", str(tmp_path / "elsewhere"))
    with pytest.raises(ShardError, match="different stores"):
        merge_step(batches, tmp_path / "patches2", tmp_path / "thumbs2")
    assert shard_store_for("s3://b/data/") == "s3://b/data/digilut-shards"
    assert shard_store_for("s3://b/data", "s3://c/shards/") == "s3://c/shards"
