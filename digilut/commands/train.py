"""CLI: training and prediction (``digilut train | train-folds | predict | evaluate``).

The training and prediction options are generated from :class:`~digilut.train_config.TrainConfig`'s
and :class:`~digilut.predict.PredictConfig`'s fields (:mod:`digilut.commands.options`): the same
names (``--input-px`` for ``input_px``) and the same defaults, defined once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from digilut.commands.options import config_options
from digilut.errors import DigilutError, TrainingInterrupted
from digilut.predict import PredictConfig
from digilut.train_config import TrainConfig  # torch-free: the CLI starts fast

_TRAIN_HELP = {
    "arch": "Backbone: resnet18 | resnet34 | resnet50.",
    "weights": "auto (ImageNet if in $TORCH_HOME, else random; never downloads) | imagenet (cached or "
    "downloaded) | none (random) | a state dict PATH or s3:// URI (prefixes such as module. stripped).",
    "hidden_units": "Units of the MLP head's hidden layer (0 = dropout + linear).",
    "dropout": "Dropout before the last layer.",
    "input_px": "Model input size: patches are resized on the device (128 ≈ 4× faster on a CPU).",
    "loss": "bce | focal.",
    "pos_weight": "BCE weight of positive patches.",
    "focal_gamma": "Focal loss focusing parameter.",
    "focal_alpha": "Focal loss positive-class weight (-1 = none).",
    "epochs": "Maximum epochs.",
    "patience": "Early stopping: epochs without a better validation AUROC.",
    "train_batch_size": "Patches per training step.",
    "lr": "AdamW peak learning rate.",
    "weight_decay": "AdamW weight decay.",
    "schedule": "cosine (per step, 5% warm-up) | plateau (halve the LR on a flat validation AUROC).",
    "sampler": "weighted (class-balanced) | shuffle.",
    "patches_per_epoch": "Patches drawn per epoch (0 = as many as training rows).",
    "use_sampled": "Train on the rows kept by negative undersampling (split's 'sampled').",
    "train_min_overlap": "Train only on positives at least this share inside their box (0.5 drops a loose "
    "box's margin; 0 = all).",
    "max_val_patches": "Validate on a fixed random subset of this size (0 = every patch).",
    "brightness": "Colour jitter: brightness ± this fraction.",
    "contrast": "Colour jitter: contrast ± this fraction.",
    "saturation": "Colour jitter: saturation ± this fraction.",
    "stain_scale": "H&E stain augmentation: scale jitter per stain (0 off, 0.05 light, 0.2 strong).",
    "stain_shift": "H&E stain augmentation: shift per stain, rgb2hed units (0 off, 0.01 light, 0.05 strong).",
    "stain_norm": "none | reinhard | macenko: per-slide stain normalisation fitted on its tissue, kept for "
    "prediction.",
    "amp": "bf16 autocast on CUDA.",
    "channels_last": "channels-last memory format on CUDA.",
    "compile": "torch.compile the model on CUDA.",
    "num_workers": "DataLoader worker processes.",
    "seed": "Random seed (initialisation, sampling, augmentation).",
    "log_every_steps": "TensorBoard step-loss interval.",
}
_PREDICT_HELP = {
    "predict_batch_size": "Patches per inference batch.",
    "num_workers": "DataLoader worker processes.",
    "amp": "bf16 autocast on CUDA.",
    "channels_last": "channels-last memory format on CUDA.",
}


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("train-folds")(train_folds)
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    # SIGTERM: the state is saved; exit as a terminated process does (128 + 15), not as an error
    return typer.Exit(143 if isinstance(err, TrainingInterrupted) else 2)


@config_options(TrainConfig, help=_TRAIN_HELP)
def train(
    manifest: Path = typer.Argument(..., help="Split manifest.parquet (from digilut split)."),
    out: Path = typer.Argument(..., help="Output folder: writes OUT/fold<K>/model.pt, oof.parquet, …"),
    fold: int = typer.Option(..., "--fold", "-k", help="Validation fold K (trains on the other folds)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI (http://… or sqlite:///…); empty = off."),
    experiment: str = typer.Option("digilut", help="MLflow experiment."),
    parent_run_id: str = typer.Option("", help="MLflow run id of the pipeline run (this fold is its child)."),
    max_epochs_this_run: int = typer.Option(0, help="Stop after this many epochs (0 = all); rerun resumes."),
    **options: Any,
) -> None:
    """Train one cross-validation fold (resumes an interrupted run; a finished fold returns at once)."""
    from digilut.steps.train import train_step
    from digilut.tracking import TrackingConfig

    try:
        result = train_step(
            manifest.parent, manifest, fold, out / f"fold{fold}", TrainConfig(**options),
            TrackingConfig(tracking_uri, experiment), parent_run_id=parent_run_id, device=device,
            max_epochs_this_run=max_epochs_this_run or None,
        )  # fmt: skip
    except DigilutError as err:
        raise _fail(err) from err
    typer.echo(
        f"fold {fold}: best epoch {result.best_epoch}, validation AUROC {result.best_val_auroc:.4f} "
        f"({result.epochs_run} epochs, {result.seconds:.0f}s) -> {out / f'fold{fold}'}"
    )


@config_options(TrainConfig, help=_TRAIN_HELP)
def train_folds(
    manifest: Path = typer.Argument(..., help="Split manifest.parquet (from digilut split)."),
    out: Path = typer.Argument(..., help="Output folder: OUT/fold<K>/ for every fold."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    tracking_uri: str = typer.Option("", help="MLflow tracking URI; empty = off."),
    experiment: str = typer.Option("digilut", help="MLflow experiment."),
    register_model: str = typer.Option("", help="Register the fold ensemble under this MLflow model name."),
    **options: Any,
) -> None:
    """Train every fold of the manifest in turn, under one MLflow parent run (the pipeline's steps:
    start_tracking, train_fold per fold, publish); OUT/summary/folds.json lists the folds' results."""
    from digilut.manifest import read_manifest
    from digilut.steps.common import write_json
    from digilut.steps.publish import publish_step
    from digilut.steps.start_tracking import start_tracking_step
    from digilut.steps.train import train_step
    from digilut.tracking import TrackingConfig

    try:
        cfg, tracking = TrainConfig(**options), TrackingConfig(tracking_uri, experiment)
        df = read_manifest(manifest, require=("split", "fold"))
        folds = sorted(int(f) for f in df.loc[df["split"] == "train", "fold"].unique())
        params = {k: str(v) for k, v in {**cfg.fingerprint(), "folds": len(folds)}.items()}
        run_id = start_tracking_step("pipeline", tracking, params, {"digilut.manifest": str(manifest)})
        results = [
            train_step(manifest.parent, manifest, k, out / f"fold{k}", cfg, tracking, parent_run_id=run_id,
                       device=device)
            for k in folds
        ]  # fmt: skip
        aurocs = [r.best_val_auroc for r in results]
        write_json(out / "summary" / "folds.json", [dataclasses.asdict(r) for r in results])
        publish_step(
            out / "summary", "", tracking, run_id, {"mean_val_auroc": sum(aurocs) / len(aurocs)},
            register_model=register_model, models=[out / f"fold{r.fold}" / r.model_file for r in results],
        )  # fmt: skip
    except DigilutError as err:
        raise _fail(err) from err
    for r in results:
        typer.echo(f"fold {r.fold}: best epoch {r.best_epoch}, validation AUROC {r.best_val_auroc:.4f}")


@config_options(PredictConfig, help=_PREDICT_HELP)
def predict(
    manifest: Path = typer.Argument(..., help="Manifest of the patches to score (test slides: stride 128)."),
    models: list[Path] = typer.Argument(..., help="Fold model files (…/fold<K>/model.pt) or fold folders."),
    out: Path = typer.Argument(..., help="Output Parquet: the manifest rows + prob."),
    split: str = typer.Option("test", help="Rows of this split only (test | train | all)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    **options: Any,
) -> None:
    """Mean probability of every patch under the fold models (each patch decoded once)."""
    from digilut.predict import patch_metrics
    from digilut.steps.predict import predict_step

    try:
        root = manifest if manifest.is_dir() else manifest.parent
        pred = predict_step(root, manifest, models, out, PredictConfig(**options), rows=split, device=device)
    except DigilutError as err:
        raise _fail(err) from err
    msg = f"{len(pred)} patches × {len(models)} model(s) -> {out}"
    if "label" in pred.columns and len(pred):
        m = patch_metrics(pred["label"].to_numpy(), pred["prob"].to_numpy())
        msg += f"; patch AUROC {m.auroc:.4f}"
    typer.echo(msg)


def evaluate(
    predictions: Path = typer.Argument(..., help="Predicted patches (digilut predict output) with labels."),
    truth: Path = typer.Argument(..., help="Truth boxes CSV of the predicted slides (train.csv format)."),
    out: Path = typer.Argument(..., help="Output folder: metrics.json and boxes.csv."),
    folds: list[Path] = typer.Option(
        [], "--fold-dir", help="Fold folders whose oof.parquet tune the threshold."
    ),
    oof_truth: Path | None = typer.Option(
        None, help="Truth boxes of the OOF slides: tunes the boxes config."
    ),
) -> None:
    """Patch metrics at the OOF-tuned threshold, N boxes per slide and the DigiLut mean F2."""
    import pandas as pd

    from digilut.evaluate import evaluate_predictions
    from digilut.manifest import read_manifest
    from digilut.score import read_truth_csv

    try:
        pred = read_manifest(predictions, require=("slide", "x0", "y0", "w0", "h0", "label", "prob"))
        oof = (
            pd.concat([read_manifest(f / "oof.parquet") for f in folds], ignore_index=True) if folds else None
        )
        result = evaluate_predictions(
            pred, read_truth_csv(truth), oof=oof, oof_truth=read_truth_csv(oof_truth) if oof_truth else None
        )
    except DigilutError as err:
        raise _fail(err) from err
    result.save(out)
    typer.echo(result.format_table())
    typer.echo(json.dumps({"mean_f2": result.score.mean_f2, "patch_auroc": result.patch.auroc}))
