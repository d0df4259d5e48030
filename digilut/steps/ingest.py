"""Steps ``list_source`` and ``ingest``: list the data source, validate it, batch its slides."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from digilut.ingest import (
    SourceListing,
    ingest_data,
    list_source,
)

log = logging.getLogger(__name__)


def list_source_step(data_uri: str) -> dict[str, Any]:
    """The slides and train.csv of the data source with their sizes and ETags (a pipeline parameter)."""
    return list_source(data_uri).to_dict()


def ingest_step(
    data_uri: str,
    source: dict[str, Any],
    annotations: Path,
    *,
    slides_per_batch: int,
    require_boxes: bool = True,
) -> list[list[dict[str, Any]]]:
    """Validate the data source as listed in ``source``; return the slide batches for extraction, each
    slide as ``{"name", "size", "etag"}``."""
    result = ingest_data(
        data_uri,
        annotations,
        batch_size=slides_per_batch,
        require_boxes=require_boxes,
        listing=SourceListing.from_dict(source),
    )
    return result.versioned_batches()
