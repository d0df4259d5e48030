"""Components of the data half of the training pipeline: list_source, ingest, extract (one batch),
merge, label, split_patients — each an adapter over one :mod:`digilut.steps` function.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects. Returns are
typed element by element (``list[int]``, not ``list``): a ParallelFor item gets its type from them,
and the backend checks it against the consumer's input type. A component builds its step's config
from its parameters with :func:`digilut.steps.common.config_from` (parameters named as the fields).
"""

from typing import Any

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from digilut.container_images import image

BASE = image("base")


@dsl.component(base_image=BASE, install_kfp_package=False)
def list_source(data_uri: str) -> dict[str, Any]:
    """The slides and train.csv of DATA (folder or s3:// prefix) with sizes and ETags (never cached)."""
    from digilut.steps.ingest import list_source_step

    return list_source_step(data_uri)


@dsl.component(base_image=BASE, install_kfp_package=False)
def ingest(
    data_uri: str,
    source: dict[str, Any],
    slides_per_batch: int,
    require_boxes: bool,
    annotations: Output[Dataset],
) -> list[list[dict[str, Any]]]:
    """Validate train.csv against the listed slides; return the batches of at most
    ``slides_per_batch`` slides (name, size, ETag), a patient's slides together."""
    from pathlib import Path

    from digilut.steps.ingest import ingest_step

    out = Path(annotations.path)
    return ingest_step(data_uri, source, out, slides_per_batch=slides_per_batch, require_boxes=require_boxes)


@dsl.component(base_image=BASE, install_kfp_package=False)
def extract(
    data_uri: str,
    slides: list[dict[str, Any]],
    patch_px: int,
    target_mpp: float,
    stride_px: int,
    min_tissue_fraction: float,
    tissue_threshold: int,
    extracted: Output[Dataset],
    shards_uri: str = "",
):
    """Extract one batch of slides: shards to the shard store (``shards_uri``, "" = beside the
    data), manifest parts and thumbnails into the artifact; a bad slide is reported, not fatal."""
    from pathlib import Path

    from digilut.extract import ExtractConfig
    from digilut.ingest import SourceObject
    from digilut.steps.common import config_from
    from digilut.steps.extract import extract_step

    cfg = config_from(ExtractConfig, locals())
    objects = [SourceObject.from_dict(s) for s in slides]
    report = extract_step(data_uri, objects, Path(extracted.path), cfg, shards_uri=shards_uri)
    extracted.metadata.update({"patches": report.patches, "failed": report.failed})


@dsl.component(base_image=BASE, install_kfp_package=False)
def merge(extracted: Input[list[Dataset]], patches: Output[Dataset], thumbnails: Output[Dataset]):
    """Merge the extraction batches into one patch set (manifest + the shard store's name) and the
    thumbnails."""
    from pathlib import Path

    from digilut.steps.merge import merge_step

    report = merge_step([Path(e.path) for e in extracted], Path(patches.path), Path(thumbnails.path))
    patches.metadata.update(
        {"patches": report.patches, "slides": len(report.slides), "failed": report.failed}
    )


@dsl.component(base_image=BASE, install_kfp_package=False)
def label(
    patches: Input[Dataset],
    annotations: Input[Dataset],
    label_mode: str,
    label_min_overlap: float,
    labels: Output[Dataset],
):
    """Label every patch by its overlap with the slide's boxes."""
    from pathlib import Path

    from digilut.labels import LabelConfig
    from digilut.steps.common import config_from
    from digilut.steps.label import label_step

    cfg = config_from(LabelConfig, locals(), prefix="label_")
    done = label_step(Path(patches.path), Path(annotations.path), Path(labels.path), cfg)
    labels.metadata.update({"patches": len(done.manifest), "positives": done.positives})


@dsl.component(base_image=BASE, install_kfp_package=False)
def split_patients(
    labels: Input[Dataset],
    test_fraction: float,
    folds: int,
    neg_per_pos: float,
    seed: int,
    split: Output[Dataset],
) -> list[int]:
    """Split patients into train/test, undersample negatives, assign folds; return the fold ids."""
    from pathlib import Path

    from digilut.split import SplitConfig
    from digilut.steps.common import config_from
    from digilut.steps.split import split_step

    return split_step(Path(labels.path), Path(split.path), config_from(SplitConfig, locals()))
