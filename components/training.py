"""Components of the model half of the training pipeline: start_tracking (MLflow parent run),
train_fold (GPU), predict (ensemble, GPU), evaluate (boxes, score, report, publish) — each an
adapter over :mod:`digilut.steps` functions.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from digilut.container_images import image

BASE = image("base")
TRAIN = image("train")


@dsl.component(base_image=BASE, install_kfp_package=False)
def start_tracking(
    run_name: str,
    experiment: str,
    tracking: Output[Artifact],
    params: str = "",
    kfp_run_id: str = "",
    kfp_run_name: str = "",
):
    """Open the MLflow parent run of this pipeline run (MLFLOW_TRACKING_URI from the environment),
    with the pipeline's parameters (``params``: ``name=value`` lines) and the KFP run's id and name
    as tags (and its URL when ``KFP_HOST`` is set).

    The run id travels as a small artifact (a file), not a parameter: kfp.local does not resolve an
    upstream task's parameter inside a ParallelFor, artifacts it does.
    """
    from pathlib import Path

    from digilut.steps.start_tracking import start_tracking_step
    from digilut.tracking import TrackingConfig, parse_pipeline_params

    cfg = TrackingConfig.from_env(experiment)
    run_id = start_tracking_step(
        run_name, cfg, parse_pipeline_params(params), kfp_run_id=kfp_run_id, kfp_run_name=kfp_run_name
    )
    Path(tracking.path).write_text(run_id)
    tracking.metadata.update({"mlflow_run_id": run_id, "experiment": experiment})


@dsl.component(base_image=TRAIN, install_kfp_package=False)
def train_fold(
    patches: Input[Dataset],
    split: Input[Dataset],
    fold: int,
    arch: str,
    loss: str,
    input_px: int,
    epochs: int,
    train_batch_size: int,
    lr: float,
    seed: int,
    experiment: str,
    tracking_run: Input[Artifact],
    model: Output[Model],
    tensorboard: Output[Artifact],
    metrics: Output[Metrics],
    patches_per_epoch: int = 0,
    max_val_patches: int = 0,
    checkpoint_uri: str = "",
    cpu_threads: int = 0,
    weights: str = "auto",
    stain_norm: str = "none",
    stain_scale: float = 0.05,
    stain_shift: float = 0.01,
    train_min_overlap: float = 0.0,
):
    """Train one fold's ResNet on a GPU (CPU without one); the model folder holds OOF predictions."""
    import shutil
    from pathlib import Path

    from digilut.steps.common import config_from
    from digilut.steps.train import train_step
    from digilut.tracking import TrackingConfig
    from digilut.train_config import TrainConfig

    cfg, tracking = config_from(TrainConfig, locals()), TrackingConfig.from_env(experiment)
    parent_run_id = Path(tracking_run.path).read_text().strip()
    result = train_step(
        Path(patches.path), Path(split.path), fold, Path(model.path), cfg, tracking,
        parent_run_id=parent_run_id, checkpoint_uri=checkpoint_uri,
    )  # fmt: skip
    shutil.copytree(Path(model.path) / "tensorboard", tensorboard.path, dirs_exist_ok=True)
    model.metadata.update(result.artifact_metadata())
    metrics.log_metric(f"fold{fold}_val_auroc", result.best_val_auroc)
    metrics.log_metric(f"fold{fold}_best_epoch", result.best_epoch)


@dsl.component(base_image=TRAIN, install_kfp_package=False)
def predict(
    patches: Input[Dataset],
    split: Input[Dataset],
    models: Input[list[Model]],
    predict_batch_size: int,
    predictions: Output[Dataset],
):
    """Ensemble (mean probability of every fold model) on the test patients' patches."""
    from pathlib import Path

    from digilut.predict import PredictConfig
    from digilut.steps.common import config_from
    from digilut.steps.predict import predict_step

    dirs = [Path(m.path) for m in models]
    cfg = config_from(PredictConfig, locals())
    out = predict_step(Path(patches.path), Path(split.path), dirs, Path(predictions.path), cfg)
    predictions.metadata.update({"patches": len(out), "models": len(models)})


@dsl.component(base_image=BASE, install_kfp_package=False)
def evaluate(
    predictions: Input[Dataset],
    models: Input[list[Model]],
    annotations: Input[Dataset],
    thumbnails: Input[Dataset],
    boxes_method: str,
    tune_boxes: bool,
    tracking_run: Input[Artifact],
    experiment: str,
    results_uri: str,
    register_model: str,
    results: Output[Dataset],
    metrics: Output[Metrics],
    roc: Output[ClassificationMetrics],
    report: Output[HTML],
    summary: Output[Markdown],
):
    """Boxes (N per slide), DigiLut F2, patch metrics, ROC and the HTML report; publish the results."""
    import shutil
    from pathlib import Path

    from digilut.boxes import BoxesConfig
    from digilut.steps.common import config_from
    from digilut.steps.evaluate import evaluate_step
    from digilut.steps.publish import publish_step
    from digilut.tracking import TrackingConfig

    cfg, out = config_from(BoxesConfig, locals(), prefix="boxes_"), Path(results.path)
    figures = evaluate_step(
        Path(predictions.path), [Path(m.path) for m in models], Path(annotations.path),
        Path(thumbnails.path), out, cfg, tune_boxes=tune_boxes,
    )  # fmt: skip
    parent_run_id, tracking = Path(tracking_run.path).read_text().strip(), TrackingConfig.from_env(experiment)
    publish_step(out, results_uri, tracking, parent_run_id, figures.scalars, register_model=register_model)
    for k, v in figures.scalars.items():
        metrics.log_metric(k, v)
    if figures.fpr:
        roc.log_roc_curve(figures.fpr, figures.tpr, figures.thresholds)
    roc.log_confusion_matrix(["no lesion", "lesion"], figures.confusion)
    shutil.copy(out / "report.html", report.path)
    shutil.copy(out / "report.md", summary.path)
