"""CLI: synthetic data, extraction and splitting (``digilut synth | prepare | split``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from digilut.errors import DigilutError


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
    from digilut.synth import SynthConfig, synth_dataset

    try:
        df = synth_dataset(out, SynthConfig(patients=patients, seed=seed, size=size, realism=realism))  # type: ignore[arg-type]
    except DigilutError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"{2 * patients} slides, {len(df)} boxes -> {out}/images, {out}/train.csv")


def prepare(
    data: Path = typer.Argument(..., help="Data folder with images/*.tif and (optionally) train.csv."),
    out: Path = typer.Argument(..., help="Output folder: manifest.parquet, report.json, one shard per slide, thumbnails/."),
    patch_px: int = typer.Option(256, help="Patch side in pixels at the target resolution."),
    target_mpp: float = typer.Option(0.5, help="Target µm/px (0.5 = 20x)."),
    stride_px: int = typer.Option(256, help="Grid stride at the target resolution (128 = 50% overlap)."),
    min_tissue_fraction: float = typer.Option(0.5, help="Keep patches with at least this tissue fraction."),
    tissue_threshold: int = typer.Option(85, help="FAST colour threshold (distance from white)."),
    slide_mpp: float | None = typer.Option(
        None, help="µm/px of slides without mpp metadata (DigiLut: 0.25)."
    ),
    label_min_overlap: float = typer.Option(0.1, help="Patch is a lesion at this overlap with a box."),
    label_mode: str = typer.Option("patch_fraction", help="patch_fraction (∩/patch area) or iou."),
    workers: int = typer.Option(2, help="Slides extracted in parallel worker processes (0 = in process)."),
) -> None:
    """Extract tissue patches of every slide with pyFAST into one shard per slide, then label them."""
    from digilut.extract import ExtractConfig
    from digilut.labels import LabelConfig
    from digilut.steps.prepare import prepare_step

    try:
        cfg = ExtractConfig(
            patch_px=patch_px,
            target_mpp=target_mpp,
            stride_px=stride_px,
            min_tissue_fraction=min_tissue_fraction,
            tissue_threshold=tissue_threshold,
            slide_mpp=slide_mpp,
        )
        report = prepare_step(
            data,
            out,
            cfg,
            workers=workers,
            label_cfg=LabelConfig(mode=label_mode, min_overlap=label_min_overlap),  # type: ignore[arg-type]
        )
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


def split(
    manifest: Path = typer.Argument(..., help="Labelled manifest.parquet (from digilut prepare)."),
    out: Path = typer.Argument(..., help="Output manifest with split, fold and sampled columns."),
    test_fraction: float = typer.Option(0.25, help="Share of patients held out for testing."),
    folds: int = typer.Option(3, help="Cross-validation folds over the training patients."),
    neg_per_pos: float = typer.Option(3.0, help="Negatives kept per positive in training (0 = all)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Split patients into train/test, undersample negatives, assign folds (all by patient)."""
    from digilut.manifest import read_manifest, write_manifest
    from digilut.split import SplitConfig, split_dataset

    try:
        df = split_dataset(
            read_manifest(manifest, require=("patient", "label")),
            SplitConfig(test_fraction=test_fraction, folds=folds, neg_per_pos=neg_per_pos, seed=seed),
        )
    except DigilutError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    write_manifest(df, out)
    summary = df.groupby(["split", "fold"])["patient"].nunique().to_dict()
    typer.echo(json.dumps({f"{s}/{f}": n for (s, f), n in summary.items()}))
