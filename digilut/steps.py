"""The pipeline's steps on folders: one function per Kubeflow component.

Each function takes input folders (KFP artifact paths), parameters and output folders, calls the
library and writes its outputs. The components in ``components/`` only adapt KFP artifacts to
these calls, and ``digilut run`` runs the same components through ``kfp.local``, so a step behaves
the same in a pod, locally and in a test.

Artifacts (folders)::

    annotations   boxes.csv (validated training boxes), ingest.json (listing, slides, batches, problems)
    extracted     one batch: parts/, thumbnails/, report.json, shards.json (the shard store)
    patches       all batches merged: manifest.parquet, report.json, shards.json
    thumbnails    <stem>.png + slides.json (level-0 size of every slide)
    labels        manifest.parquet (+ overlap, label)
    split         manifest.parquet (+ split, fold, sampled), split.json
    model         one fold: model.pt, oof.parquet, result.json, tensorboard/ (digilut.train)
    predictions   predictions.parquet: the test patches with the ensemble's ``prob``
    results       boxes.csv, metrics.json, report.html, report.md, pictures/, geojson/, roc.png

Shards are not artifacts: the KFP launcher downloads every input artifact whole into the pod, and
the shards are the dataset (tens of GB on DigiLut). ``extract`` puts each slide's shard in the
*shard store* under a content-addressed name (``shards_uri``; by default ``<data_uri>/digilut-shards``,
see :func:`shard_store_for`), and the artifacts carry only the manifest and ``shards.json`` naming
the store. ``train_fold`` and ``predict`` read the patches they need by ranged GET
(:class:`digilut.shards.ShardReader`); ``merge``, ``label`` and ``split`` never touch a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from digilut.annotations import check_slide_name, check_slide_sizes
from digilut.boxes import BOXES_CONFIG_NAME, BoxesConfig, load_boxes_config, save_boxes_config
from digilut.cpus import available_cpus
from digilut.errors import ShardError
from digilut.evaluate import Evaluation, evaluate_predictions
from digilut.extract import ExtractConfig, PrepareReport, SlidePatches, extract_slides
from digilut.geojson import GEOJSON_DIR, write_geojson
from digilut.heatmap import build_heatmaps
from digilut.ingest import (
    BOXES_NAME,
    SourceListing,
    SourceObject,
    check_version,
    fetch_slides,
    ingest_data,
    list_source,
)
from digilut.labels import LabelConfig, label_patches
from digilut.manifest import (
    EXTRACT_COLUMNS,
    MANIFEST_NAME,
    conform,
    read_manifest,
    shard_store,
    write_manifest,
    write_shard_store,
)
from digilut.predict import PredictConfig, predict_patches
from digilut.report import RunFigures, write_report
from digilut.shards import atomic_write, publish_shard, shard_name
from digilut.split import SplitConfig, split_dataset
from digilut.tracking import Tracker, TrackingConfig
from digilut.train_config import FoldResult, TrainConfig

if TYPE_CHECKING:  # torch and digilut.train load in the GPU steps only: the CPU image has no torch
    import torch

log = logging.getLogger(__name__)
PREDICTIONS_NAME = "predictions.parquet"


def pick_device() -> torch.device:
    """The device for training/prediction, chosen once per step: CUDA when present, else CPU; a
    task the pipeline put on a GPU (``DIGILUT_REQUIRE_GPU=1``) fails here when CUDA is missing."""
    from digilut.model import select_device

    return select_device("auto")


def _write_json(path: Path, data: object) -> None:
    atomic_write(path, [json.dumps(data, indent=2, default=str).encode()])


def read_boxes(annotations: Path) -> pd.DataFrame:
    """The validated boxes of an ``annotations`` artifact."""
    return pd.read_csv(annotations / BOXES_NAME)


def list_source_step(data_uri: str) -> dict[str, Any]:
    """The slides and train.csv of the data source with their sizes and ETags (a pipeline parameter)."""
    return list_source(data_uri).to_dict()


def ingest_step(
    data_uri: str, source: dict[str, Any], annotations: Path, *, batch_size: int, require_boxes: bool = True
) -> list[list[dict[str, Any]]]:
    """Validate the data source as listed in ``source``; return the slide batches for extraction, each
    slide as ``{"name", "size", "etag"}``."""
    result = ingest_data(
        data_uri,
        annotations,
        batch_size=batch_size,
        require_boxes=require_boxes,
        listing=SourceListing.from_dict(source),
    )
    return result.versioned_batches()


SHARD_STORE_DIR = "digilut-shards"


def shard_store_for(data_uri: str, shards_uri: str = "") -> str:
    """The shard store of a run: ``shards_uri`` when given, else ``<data_uri>/digilut-shards``.

    Beside the data by default: a cache derived from the slides, in the bucket the pipeline already
    reads, the same for every run, pipeline root and cache hit (so a fold's rows, and its checkpoint
    key, do not change from run to run), with content-addressed names so that runs, datasets and
    settings never overwrite each other's shard. Pass ``shards_uri`` when the data is read-only.
    """
    return shards_uri.rstrip("/") or f"{data_uri.rstrip('/')}/{SHARD_STORE_DIR}"


def publish_shards(out_dir: Path, results: dict[str, SlidePatches], store: str) -> None:
    """Move the shards extracted into ``out_dir/shards`` to ``store`` under content-addressed
    names, point the slides' manifest parts at them and record the store in ``out_dir``."""
    uploaded = 0
    for name, r in results.items():
        stem = Path(name).stem
        local = out_dir / "shards" / f"{stem}.shard"
        if r.status == "ok":
            shard = shard_name(stem, r.shard_sha256)
            uploaded += publish_shard(local, store, shard)
            part_path = out_dir / "parts" / f"{stem}.parquet"
            write_manifest(pd.read_parquet(part_path).assign(shard=shard), part_path)
        local.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    write_shard_store(out_dir, store)
    ok = sum(r.status == "ok" for r in results.values())
    log.info("shards: %d slide(s) in %s (%d new, %d already there)", ok, store, uploaded, ok - uploaded)


def extract_step(
    data_uri: str,
    slides: list[SourceObject],
    extracted: Path,
    cfg: ExtractConfig,
    *,
    workers: int = 1,
    shards_uri: str = "",
) -> PrepareReport:
    """Fetch one batch of slides and extract them; failures are reported. A slide that is no longer
    its listed version (size, ETag) is reported failed, not extracted. The shards go to the shard
    store (:func:`shard_store_for`), the manifest parts and thumbnails into ``extracted``. Slides and
    shards are written under ``TMPDIR`` (a sized scratch volume in the pod)."""
    extracted.mkdir(parents=True, exist_ok=True)
    results: dict[str, SlidePatches] = {}
    with tempfile.TemporaryDirectory(prefix="digilut-slides-") as tmp:
        paths: list[Path] = []
        for slide in slides:
            try:
                check_slide_name(slide.name)  # before any path join
                check_version(data_uri, f"images/{slide.name}", slide)
                paths.extend(fetch_slides(data_uri, [slide.name], Path(tmp)).values())
            except (OSError, ValueError) as err:  # missing, changed or unsafe slide: report, go on
                results[slide.name] = SlidePatches(slide.name, "failed", error=f"{type(err).__name__}: {err}")
        threads = max(1, available_cpus() // max(1, workers))
        work = Path(tmp) / "extracted"
        results.update(extract_slides(paths, work, cfg, workers=workers, threads=threads))
        publish_shards(work, results, shard_store_for(data_uri, shards_uri))
        shutil.copytree(work, extracted, dirs_exist_ok=True)
    report = PrepareReport(results, sum(r.seconds for r in results.values()), cfg.__dict__.copy())
    atomic_write(extracted / "report.json", [report.to_json().encode()])
    return report


def merge_step(extracted: list[Path], patches: Path, thumbnails: Path) -> PrepareReport:
    """Merge extraction batches into one ``patches`` folder (manifest, report, the shard store's
    name: no shard is copied) and one ``thumbnails`` folder."""
    for d in (patches, thumbnails):
        d.mkdir(parents=True, exist_ok=True)
    slides: dict[str, SlidePatches] = {}
    parts: list[pd.DataFrame] = []
    sizes: dict[str, tuple[int, int]] = {}
    stores = {shard_store(batch) for batch in extracted}
    if len(stores) > 1:
        raise ShardError(
            f"extraction batches put their shards in different stores ({', '.join(sorted(stores))}); "
            "one run uses one shards_uri"
        )
    for batch in extracted:
        report = PrepareReport.load(batch / "report.json")
        for name, r in report.slides.items():
            slides[name] = r
            if r.status != "ok":
                continue
            stem = Path(name).stem
            _link_or_copy(batch / "thumbnails" / f"{stem}.png", thumbnails / f"{stem}.png")
            parts.append(pd.read_parquet(batch / "parts" / f"{stem}.parquet"))
            sizes[name] = (r.width, r.height)
    manifest = (
        conform(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame(columns=list(EXTRACT_COLUMNS))
    )
    write_manifest(manifest, patches / MANIFEST_NAME)
    if stores:
        write_shard_store(patches, stores.pop())
    merged = PrepareReport(slides, sum(r.seconds for r in slides.values()))
    atomic_write(patches / "report.json", [merged.to_json().encode()])
    _write_json(thumbnails / "slides.json", {k: {"width": w, "height": h} for k, (w, h) in sizes.items()})
    failed = merged.failed
    log.info(
        "merge: %d batch(es), %d slides ok, %d failed%s; %d patches",
        len(extracted),
        len(parts),
        len(failed),
        f" ({', '.join(failed)})" if failed else "",
        len(manifest),
    )
    return merged


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def label_step(patches: Path, annotations: Path, labels: Path, cfg: LabelConfig) -> pd.DataFrame:
    """Label every patch of ``patches`` by its overlap with the boxes of ``annotations``."""
    labels.mkdir(parents=True, exist_ok=True)
    manifest, boxes = read_manifest(patches), read_boxes(annotations)
    if (patches / "report.json").is_file():  # boxes must be in the frame of the slides' real size
        report = PrepareReport.load(patches / "report.json")
        sizes = {s: (r.width, r.height) for s, r in report.slides.items() if r.status == "ok"}
        boxes, problems, wrong_size = check_slide_sizes(boxes, sizes)
        for msg in problems:
            log.warning("%s", msg)
        manifest = manifest[~manifest["slide"].isin(wrong_size)].reset_index(drop=True)
    df = label_patches(manifest, boxes, cfg)
    write_manifest(df, labels / MANIFEST_NAME)
    return df


def split_step(labels: Path, split: Path, cfg: SplitConfig) -> list[int]:
    """Split patients, undersample and assign folds; return the fold ids to train."""
    split.mkdir(parents=True, exist_ok=True)
    df = split_dataset(read_manifest(labels, require=("patient", "label")), cfg)
    write_manifest(df, split / MANIFEST_NAME)
    summary = {
        "test_patients": sorted(df.loc[df["split"] == "test", "patient"].unique().tolist()),
        "folds": {
            int(k): sorted(g["patient"].unique().tolist())
            for k, g in df[df["split"] == "train"].groupby("fold")
        },
        "config": cfg.__dict__,
    }
    _write_json(split / "split.json", summary)
    return sorted(summary["folds"])


# --- model side ------------------------------------------------------------------------------


def start_tracking_step(
    run_name: str,
    cfg: TrackingConfig,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Open the pipeline's MLflow parent run with the pipeline's ``params`` and ``tags`` (the KFP
    run); return its id ("" when tracking is off or down)."""
    with Tracker(cfg) as tracker:
        if not tracker.enabled:
            log.info("tracking: no MLflow tracking URI configured; runs are not logged")
            return ""
        run = tracker.start_run(run_name, tags={"digilut.kind": "pipeline", **(tags or {})})
        tracker.log_params(run, params or {})
        run_id = run.wait(cfg.request_timeout_s * 3) or ""
    if not run_id:
        log.warning("tracking: MLflow at %s did not answer; this run is not logged", cfg.tracking_uri)
    return run_id


def checkpoint_location(checkpoint_uri: str, manifest: Path, fold: int, cfg: TrainConfig) -> str:
    """Where fold ``fold`` keeps its checkpoints under ``checkpoint_uri`` (a folder or ``s3://``
    prefix): ``fold<k>-<key>``, the key hashing the fold's rows and the training settings — so a
    re-run of the same pipeline (a new pod, a new run) finds it, and another dataset or config does not."""
    from digilut.train import fold_data_digest, fold_rows

    data = fold_rows(read_manifest(manifest), fold, cfg)
    key = hashlib.sha256(
        (fold_data_digest(data) + json.dumps(cfg.fingerprint(), sort_keys=True)).encode()
    ).hexdigest()[:16]
    return f"{checkpoint_uri.rstrip('/')}/fold{fold}-{key}"


def restore_checkpoint(where: str, model_dir: Path) -> bool:
    """Copy a fold's checkpoint folder ``where`` (folder or ``s3://``) into ``model_dir``; False if none."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if where.startswith("s3://"):
        from digilut.ingest import s3_target
        from digilut.storage import download_prefix

        s3, prefix = s3_target(where)
        done = download_prefix(s3, prefix, model_dir)
        return bool(done.transferred or done.skipped)
    if Path(where).is_dir():
        shutil.copytree(where, model_dir, dirs_exist_ok=True)
        return True
    return False


def train_step(
    patches: Path,
    split: Path,
    fold: int,
    model_dir: Path,
    cfg: TrainConfig,
    tracking: TrackingConfig,
    *,
    parent_run_id: str = "",
    checkpoint_uri: str = "",
) -> FoldResult:
    """Train one fold on the device chosen here (CUDA when present); resumes from ``model_dir``.

    With ``checkpoint_uri`` (a folder or ``s3://`` prefix that outlives the run), the fold's folder
    is copied there after every epoch and restored from there first: a fold killed on one pod
    resumes on the next run's pod, and a finished fold is reused (Argo ignores ``set_retry``
    inside a ``ParallelFor``, so recovery comes from here, not from retries).
    """
    from digilut.train import train_fold

    device = pick_device()
    manifest = split / MANIFEST_NAME
    on_checkpoint = None
    if checkpoint_uri:
        where = checkpoint_location(checkpoint_uri, manifest, fold, cfg)
        if restore_checkpoint(where, model_dir):
            log.info("fold %d: checkpoint restored from %s", fold, where)

        def on_checkpoint(folder: Path) -> None:
            publish_results(folder, where)

    with Tracker(tracking) as tracker:
        parent = tracker.attach(parent_run_id) if parent_run_id else None
        return train_fold(
            manifest,
            fold,
            model_dir,
            cfg,
            device,
            tracker=tracker,
            parent=parent,
            root=shard_store(patches),
            on_checkpoint=on_checkpoint,
        )


def predict_step(
    patches: Path, split: Path, model_dirs: list[Path], predictions: Path, cfg: PredictConfig
) -> pd.DataFrame:
    """Mean probability of the fold models on every test patch; writes ``predictions.parquet``."""
    predictions.mkdir(parents=True, exist_ok=True)
    df = read_manifest(split, require=("split",))
    rows = df[df["split"] == "test"]
    files = [d / FoldResult.load(d).model_file for d in model_dirs]
    out = predict_patches(rows, shard_store(patches), files, cfg, pick_device())
    write_manifest(out, predictions / PREDICTIONS_NAME)
    return out


def _oof(model_dirs: list[Path]) -> pd.DataFrame:
    parts = [pd.read_parquet(d / FoldResult.load(d).oof_file) for d in model_dirs]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def evaluate_step(
    predictions: Path,
    model_dirs: list[Path],
    annotations: Path,
    thumbnails: Path | None,
    results: Path,
    boxes_cfg: BoxesConfig | None = None,
    *,
    tune_boxes: bool = True,
    title: str = "digilut run",
) -> Evaluation:
    """Boxes (N per test slide; post-processing tuned on out-of-fold slides), score and report."""
    results.mkdir(parents=True, exist_ok=True)
    pred = pd.read_parquet(predictions / PREDICTIONS_NAME)
    truth = read_boxes(annotations)
    test_truth = truth[truth["filename"].isin(set(pred["slide"]))]
    oof = _oof(model_dirs)
    oof_truth = truth[truth["filename"].isin(set(oof["slide"]))] if len(oof) else None
    ev = evaluate_predictions(
        pred,
        test_truth,
        oof=oof if len(oof) else None,
        oof_truth=oof_truth if tune_boxes else None,
        boxes_config=None if tune_boxes else boxes_cfg,
        tune_base=boxes_cfg,
    )
    ev.save(results)
    hms = build_heatmaps(pred) if len(pred) else {}
    write_geojson(results / GEOJSON_DIR, ev.boxes, hms, test_truth, slides=sorted(hms))
    folds = [FoldResult.load(d) for d in model_dirs]
    models = [f"fold {r.fold}: {r.init.get('words', 'initialisation not recorded')}" for r in folds]
    write_report(
        ev, pred, test_truth, results, thumbnails=thumbnails, title=title, heatmaps=hms, models=models
    )
    (results / "models").mkdir(exist_ok=True)
    for d in model_dirs:  # the ensemble travels with the results: the inference pipeline reads it
        r = FoldResult.load(d)
        shutil.copy2(d / r.model_file, results / "models" / f"fold{r.fold}.pt")
    save_boxes_config(ev.boxes_config, results / "models" / BOXES_CONFIG_NAME)  # tuned: travels too
    return ev


def publish_results(results: Path, results_uri: str) -> None:
    """Copy the results folder to ``results_uri``: a folder or ``s3://`` prefix ("" = nowhere)."""
    if results_uri.startswith("s3://"):
        from digilut.ingest import s3_target
        from digilut.storage import upload_dir

        cfg, prefix = s3_target(results_uri)
        upload_dir(cfg, results, prefix)
        log.info("results uploaded to %s", results_uri)
    elif results_uri:
        shutil.copytree(results, results_uri, dirs_exist_ok=True)
        log.info("results copied to %s", results_uri)


def publish_step(
    results: Path,
    results_uri: str,
    tracking: TrackingConfig,
    parent_run_id: str,
    figures: RunFigures,
    *,
    register_model: str = "",
) -> None:
    """Copy the results folder to ``results_uri`` (a folder or ``s3://`` prefix; "" = nowhere),
    log the figures and report to the MLflow parent run (registering the ensemble as
    ``register_model`` when given), then close the run."""
    publish_results(results, results_uri)
    if parent_run_id:
        with Tracker(tracking) as tracker:
            run = tracker.attach(parent_run_id)
            tracker.log_metrics(run, figures.scalars, step=0)
            tracker.log_artifacts(run, results, "results")
            if register_model:
                extra = [p for p in [results / "models" / BOXES_CONFIG_NAME] if p.is_file()]
                tracker.register_ensemble(
                    run, sorted((results / "models").glob("*.pt")), register_model, extra_files=extra
                )
            tracker.end_run(run)


# --- inference -------------------------------------------------------------------------------

MODEL_GLOB = "*.pt"


def fetch_models_step(model_uri: str, models: Path) -> list[Path]:
    """Copy an ensemble's model files into ``models``: from a folder or ``s3://`` prefix holding
    ``*.pt`` digilut model files (e.g. a training run's ``results/models``), or an MLflow registry
    URI ``models:/<name>/<version>`` (the registered ensemble's artifacts). The boxes config the
    training run tuned (``boxes_config.json`` beside the models) comes along when there is one."""
    models.mkdir(parents=True, exist_ok=True)
    if model_uri.startswith("models:/") or model_uri.startswith("runs:/"):
        import mlflow.artifacts

        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or None  # the pod's, not a process global
        root = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(models / "mlflow"), tracking_uri=tracking_uri
            )
        )
    elif model_uri.startswith("s3://"):
        from digilut.ingest import s3_target
        from digilut.storage import download_prefix

        cfg, prefix = s3_target(model_uri)
        root = models / "s3"
        download_prefix(cfg, prefix, root)
    else:
        root = Path(model_uri)
    found = sorted(p for p in root.rglob(MODEL_GLOB) if p.name != "last.pt")
    if not found:
        raise FileNotFoundError(f"{model_uri}: no model files ({MODEL_GLOB}) found")
    out = []
    for i, p in enumerate(found):
        dst = models / f"model{i}.pt"
        shutil.copy2(p, dst)
        out.append(dst)
    configs = sorted(root.rglob(BOXES_CONFIG_NAME))
    if configs:  # the boxes config the training run tuned for this ensemble
        load_boxes_config(configs[0])  # a broken file fails here, naming it
        shutil.copy2(configs[0], models / BOXES_CONFIG_NAME)
    log.info(
        "models: %d model file(s) from %s; %s",
        len(out),
        model_uri,
        f"tuned boxes config {configs[0]}" if configs else "no tuned boxes config (defaults apply)",
    )
    return out


def predict_all_step(patches: Path, models: Path, predictions: Path, cfg: PredictConfig) -> pd.DataFrame:
    """Mean probability of the ensemble in ``models`` on every patch of ``patches``."""
    predictions.mkdir(parents=True, exist_ok=True)
    files = sorted(models.glob("model*.pt"))
    out = predict_patches(read_manifest(patches), shard_store(patches), files, cfg, pick_device())
    write_manifest(out, predictions / PREDICTIONS_NAME)
    if (models / BOXES_CONFIG_NAME).is_file():  # the ensemble's tuned boxes config goes with its output
        shutil.copy2(models / BOXES_CONFIG_NAME, predictions / BOXES_CONFIG_NAME)
    return out


def submission_step(data_uri: str, predictions: Path, results: Path, cfg: BoxesConfig) -> Path:
    """N boxes per slide of the source's ``test.csv`` (``filename,max_x,max_y,trustii_id``) in the
    challenge submission format ``trustii_id,filename,y1,y2,x1,x2``. The boxes config the ensemble's
    training run tuned (``predictions/boxes_config.json``, carried from the models) replaces ``cfg``
    when present; ``cfg`` applies to an ensemble without one."""
    from digilut.annotations import expected_counts, read_test_list
    from digilut.boxes import slide_boxes
    from digilut.ingest import fetch_file
    from digilut.submission import write_submission

    results.mkdir(parents=True, exist_ok=True)
    test_csv = fetch_file(data_uri, "test.csv", results / "source")
    if test_csv is None:
        raise FileNotFoundError(f"{data_uri}: no test.csv (filename,max_x,max_y,trustii_id) to submit for")
    table = read_test_list(test_csv)
    table.log_problems()
    pred = pd.read_parquet(predictions / PREDICTIONS_NAME)
    if (predictions / BOXES_CONFIG_NAME).is_file():
        tuned = load_boxes_config(predictions / BOXES_CONFIG_NAME)
        if tuned.method != cfg.method:
            log.warning("boxes_method=%s ignored: the ensemble was tuned with %s", cfg.method, tuned.method)
        cfg = tuned
        log.info("submission: the ensemble's tuned boxes config: %s", cfg)
    counts = expected_counts(table.rows)
    hms = build_heatmaps(pred) if len(pred) else {}
    boxes = slide_boxes(pred, counts, cfg, heatmaps=hms)
    atomic_write(results / "boxes.csv", [boxes.to_csv(index=False).encode()])
    write_geojson(results / GEOJSON_DIR, boxes, hms, slides=sorted(set(counts) & set(hms)))
    return write_submission(boxes, table.rows, results / "submission.csv")
