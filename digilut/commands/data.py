"""CLI: synthetic data, extraction and splitting (``digilut synth | prepare | split``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from digilut.commands.options import config_options
from digilut.errors import DigilutError
from digilut.extract import ExtractConfig
from digilut.labels import LabelConfig
from digilut.split import SplitConfig

_PREPARE_HELP = {
    "patch_px": "Patch side in pixels at the target resolution.",
    "target_mpp": "Target µm/px (0.5 = 20x).",
    "stride_px": "Grid stride at the target resolution: 256 = the training grid, 128 = the inference "
    "grid (50% overlap; what the pipelines use for every slide).",
    "min_tissue_fraction": "Keep patches with at least this tissue fraction.",
    "tissue_threshold": "FAST colour threshold (distance from white).",
    "slide_mpp": "µm/px of slides without mpp metadata (DigiLut: 0.25).",
    "jpeg_quality": "JPEG quality of the stored patches.",
    "max_constant_fraction": "A slide with more unreadable (flat/garbled) tissue patches is refused.",
    "label_mode": "patch_fraction (∩/patch area) or iou.",
    "label_min_overlap": "Patch is a lesion at this overlap with a box.",
}
_SPLIT_HELP = {
    "test_fraction": "Share of patients held out for testing.",
    "folds": "Cross-validation folds over the training patients.",
    "neg_per_pos": "Negatives kept per positive in training (0 = all).",
    "seed": "Random seed.",
}


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
    app.command("prepare")(prepare)
    app.command("split")(split)


def synth(
    out: Path = typer.Argument(..., help="Output folder: writes OUT/images/*.tif and OUT/train.csv."),
    patients: int = typer.Option(4, "--patients", "-n", help="Number of patients (2 slides each)."),
    seed: int = typer.Option(0, help="Random seed: same seed, same slides."),
    size: str = typer.Option("tiny", help="tiny (~1 s/slide, tests) | demo | full (83k×197k px, real size)."),
    realism: str = typer.Option(
        "simple",
        help="simple (procedural, colour-separable) | real (real H&E, stain, infiltrates; tiny/demo).",
    ),
) -> None:
    """Write synthetic DigiLut-like slides (pyramidal tiled-JPEG TIFFs at 0.25 µm/px) and their boxes."""
    from digilut.synth import synth_dataset
    from digilut.synth_plan import SynthConfig

    try:
        df = synth_dataset(out, SynthConfig(patients=patients, seed=seed, size=size, realism=realism))  # type: ignore[arg-type]
    except DigilutError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"{2 * patients} slides, {len(df)} boxes -> {out}/images, {out}/train.csv")


@config_options(ExtractConfig, (LabelConfig, "label_"), help=_PREPARE_HELP)
def prepare(
    data: Path = typer.Argument(..., help="Data folder with images/*.tif and (optionally) train.csv."),
    out: Path = typer.Argument(
        ..., help="Output folder: manifest.parquet, report.json, one shard per slide, thumbnails/."
    ),
    workers: int = typer.Option(2, help="Slides extracted in parallel worker processes (0 = in process)."),
    **options: Any,
) -> None:
    """Extract tissue patches of every slide with pyFAST into one shard per slide, then label them:
    the pipeline's ingest, extract, merge and label steps on local folders."""
    from digilut.steps.common import config_from
    from digilut.steps.prepare import prepare_step

    try:
        cfg = config_from(ExtractConfig, options)
        label_cfg = config_from(LabelConfig, options, prefix="label_")
        report = prepare_step(data, out, cfg, label_cfg, workers=workers)
    except (DigilutError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    ok = sum(r.status == "ok" for r in report.slides.values())
    typer.echo(
        f"{ok}/{len(report.slides)} slides ok, {len(report.failed)} failed; {report.patches} patches "
        f"in {report.seconds:.1f}s -> {out}/manifest.parquet (report: {out}/report.json)"
    )
    for name in report.failed:
        typer.echo(f"  failed {name}: {report.slides[name].error}", err=True)


@config_options(SplitConfig, help=_SPLIT_HELP)
def split(
    manifest: Path = typer.Argument(..., help="Labelled manifest.parquet (from digilut prepare)."),
    out: Path = typer.Argument(
        ..., help="Output manifest with split, fold and sampled columns (and OUT.json: who is where)."
    ),
    **options: Any,
) -> None:
    """Split patients into train/test, undersample negatives, assign folds (all by patient)."""
    from digilut.manifest import read_manifest
    from digilut.steps.common import config_from
    from digilut.steps.split import split_step

    try:
        split_step(manifest, out, config_from(SplitConfig, options))
    except DigilutError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    df = read_manifest(out)
    summary = df.groupby(["split", "fold"])["patient"].nunique().to_dict()
    typer.echo(json.dumps({f"{s}/{f}": n for (s, f), n in summary.items()}))
