"""Locations: "a local folder or an ``s3://`` prefix", where steps read data and publish results.

Steps read their inputs from and write their results to either kind of location. This module turns
a location URI into S3 settings and a prefix (:func:`s3_target`), fetches a top-level file or a
source's slides as local paths (:func:`fetch_file`, :func:`fetch_slides`) and publishes a local
folder to a location (:func:`publish_results`). Listing and transfers themselves are in
:mod:`digilut.storage`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from digilut.annotations import check_slide_name
from digilut.errors import SlideNotFoundError
from digilut.s3config import S3Config, parse_s3_uri

log = logging.getLogger(__name__)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_target(uri: str) -> tuple[S3Config, str]:
    """The S3 settings (bucket from the URI, endpoint and keys from the environment) and prefix."""
    bucket, prefix = parse_s3_uri(uri)
    return replace(S3Config.from_env(), bucket=bucket), prefix.strip("/")


def fetch_file(data_uri: str, name: str, dest: Path) -> Path | None:
    """A top-level file of the source (e.g. ``train.csv``) as a local path; None when absent."""
    if not is_s3(data_uri):
        p = Path(data_uri) / name
        return p if p.is_file() else None
    from digilut.storage import download_file, list_keys

    cfg, prefix = s3_target(data_uri)
    key = f"{prefix}/{name}" if prefix else name
    if key not in list_keys(cfg, key):
        return None
    return download_file(cfg, key, dest / name)


def fetch_slides(data_uri: str, names: list[str], dest: Path) -> dict[str, Path]:
    """Local paths of the slides ``names``: in place for a folder, downloaded into ``dest`` for S3."""
    paths: dict[str, Path] = {}
    for name in names:
        check_slide_name(name)  # before any path join
        if not is_s3(data_uri):
            p = Path(data_uri) / "images" / name
            if not p.is_file():
                raise SlideNotFoundError(f"{p}: slide not found")
            paths[name] = p
            continue
        from digilut.storage import download_file

        cfg, prefix = s3_target(data_uri)
        key = f"{prefix}/images/{name}" if prefix else f"images/{name}"
        paths[name] = download_file(cfg, key, dest / "images" / name)
    return paths


def publish_results(results: Path, results_uri: str) -> None:
    """Copy the results folder to ``results_uri``: a folder or ``s3://`` prefix ("" = nowhere)."""
    if is_s3(results_uri):
        from digilut.storage import upload_dir

        cfg, prefix = s3_target(results_uri)
        upload_dir(cfg, results, prefix)
        log.info("results uploaded to %s", results_uri)
    elif results_uri:
        shutil.copytree(results, results_uri, dirs_exist_ok=True)
        log.info("results copied to %s", results_uri)
