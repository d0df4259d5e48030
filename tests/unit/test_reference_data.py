"""Reference H&E images: pinned, checksum-checked, a clear error when they cannot be had."""

from __future__ import annotations

from pathlib import Path

import pytest
import tifffile

from digilut.reference_data import (
    CMU_SMALL_REGION,
    ReferenceDataError,
    cmu_small_region_svs,
    reference_file,
)


def test_cached_cmu_slide_is_the_real_aperio_file() -> None:
    """`make install` fetched it: the real SVS (one 2220 × 2967 level, mpp 0.499 in its description)."""
    path = cmu_small_region_svs(fetch=False)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
        level0 = tif.series[0].levels[0]
        assert level0.shape[:2] == (2967, 2220)
        assert "MPP = 0.499" in tif.pages[0].description


def test_missing_file_without_fetch_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ReferenceDataError, match=r"python[0-9.]* -m digilut.reference_data"):
        cmu_small_region_svs(tmp_path, fetch=False)


def test_a_corrupted_cached_file_is_not_used(tmp_path: Path) -> None:
    good = cmu_small_region_svs(fetch=False)
    bad = tmp_path / CMU_SMALL_REGION.name
    bad.write_bytes(good.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ReferenceDataError, match="not cached"):
        reference_file(CMU_SMALL_REGION, directory=tmp_path, fetch=False)
