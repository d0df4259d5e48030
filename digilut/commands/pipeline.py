"""CLI: the Kubeflow pipeline — run it here (``run``, ``demo``), compile it, submit it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from digilut.errors import DigilutError


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("demo")(demo)
    app.command("compile")(compile_)
    app.command("submit")(submit)


def _params(values: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected NAME=VALUE (e.g. epochs=5)")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def run(
    data: str = typer.Argument(
        ..., help="DATA folder (images/*.tif + train.csv, or test.csv with --models) or s3://bucket/prefix."
    ),
    out: Path = typer.Argument(
        ..., help="Output folder: boxes.csv, metrics.json, report.html (submission.csv), pipeline.log."
    ),
    profile: str = typer.Option(
        "demo", help="Parameter set: demo (2 CPU cores), tiny (tests), full (GPU cluster)."
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Pipeline parameter override NAME=VALUE (repeatable)."
    ),
    results_uri: str | None = typer.Option(
        None, help="Publish results here too (folder or s3://); default OUT/results."
    ),
    models: str | None = typer.Option(
        None,
        help="Run the inference pipeline with this ensemble instead of training: a folder or s3:// "
        "prefix of model files (a training run's results/models) or models:/<name>/<version>.",
    ),
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="Reuse an earlier run's outputs of the cached steps (as KFP does)."
    ),
) -> None:
    """Run a Kubeflow pipeline here through kfp.local (the components a cluster runs): training, or
    inference with --models (DATA/test.csv lists the slides and N boxes each)."""
    from digilut.ops.runner import run_inference_local, run_local

    try:
        if models:
            sub = run_inference_local(
                data, models, out, results_uri=results_uri, cache=cache, **_params(param)
            )
            typer.echo(f"submission: {sub}\nboxes:      {sub.parent / 'boxes.csv'}")
            return
        r = run_local(data, out, profile=profile, results_uri=results_uri, cache=cache, **_params(param))
    except DigilutError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    m = r.metrics
    typer.echo(
        f"mean F2 = {m['mean_f2']:.4f} on the held-out patients; patch AUROC {m['patch']['auroc']:.4f}"
    )
    typer.echo(
        f"boxes:   {r.boxes_csv}\nmetrics: {r.metrics_json}\nreport:  {r.report_html}\n({r.seconds:.0f}s"
        + (f"; from the cache: {', '.join(sorted(set(r.cached)))})" if r.cached else ")")
    )


def demo(
    work: Path = typer.Argument(Path("demo-out"), help="Working folder (data, server state, run outputs)."),
    patients: int = typer.Option(8, help="Synthetic patients (2 slides each)."),
    seed: int = typer.Option(0, help="Seed of the synthetic dataset."),
    size: str = typer.Option("demo", help="Synthetic slide size: demo (12k×9k px) | tiny | full."),
    profile: str = typer.Option("demo", help="Pipeline parameter set (see `digilut run --profile`)."),
    keep: bool = typer.Option(
        False, "--keep", envvar="KEEP", help="Leave the S3 and MLflow servers running."
    ),
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="Reuse the last demo run's outputs of the cached steps."
    ),
) -> None:
    """The whole pipeline locally: synthetic slides → local S3 + MLflow servers → kfp.local run → summary."""
    from digilut.ops.demo import run_demo

    try:
        d = run_demo(work, patients=patients, seed=seed, size=size, profile=profile, keep=keep, cache=cache)
    except DigilutError as err:
        typer.echo(f"error: {err}", err=True)
        if keep and (work / "services.json").is_file():
            typer.echo(f"servers left running (--keep); stop: digilut services down --dir {work}", err=True)
        raise typer.Exit(1) from err
    m = d.run.metrics
    lines = [
        "",
        "=== digilut demo: done ===",
        f"mean F2 (held-out patients): {m['mean_f2']:.4f}   patch AUROC: {m['patch']['auroc']:.4f}",
        f"pipeline time: {d.run.seconds:.0f}s"
        + (f" (from the cache: {', '.join(sorted(set(d.run.cached)))})" if d.run.cached else ""),
        f"boxes.csv:  {d.run.boxes_csv}",
        f"report:     {d.run.report_html}",
        f"results in S3: {d.results_uri} (endpoint {d.s3_endpoint})",
        f"MLflow UI:  {d.mlflow_uri}" + ("" if keep else " (stopped; KEEP=1 make demo leaves it up)"),
        f"TensorBoard: {d.tensorboard_cmd}",
    ]
    if d.env_file:
        lines.append(f"servers left running: source {d.env_file}; stop: digilut services down --dir {work}")
    typer.echo("\n".join(lines))


def compile_(
    out: Path = typer.Option(None, help="Output folder (default pipelines/compiled)."),
) -> None:
    """Compile the training and inference pipelines to KFP YAML (images from DIGILUT_REGISTRY/DIGILUT_TAG)."""
    from digilut.ops.kubeflow import COMPILED_DIR, compile_pipelines

    for path in compile_pipelines(out or COMPILED_DIR):
        typer.echo(str(path))


def submit(
    data_uri: str = typer.Argument(..., help="s3://bucket/prefix with images/ and train.csv (or test.csv)."),
    host: str = typer.Option(None, envvar="KFP_HOST", help="KFP API URL."),
    namespace: str = typer.Option(None, envvar="KFP_NAMESPACE", help="Kubeflow namespace/profile."),
    token: str = typer.Option(
        None, envvar="KFP_TOKEN", help="Bearer token (omit for in-cluster/port-forward)."
    ),
    pipeline: str = typer.Option("training", help="training or inference."),
    experiment: str = typer.Option("digilut", help="KFP experiment."),
    cron: str = typer.Option(None, help="Create a recurring run on this cron schedule instead of one run."),
    param: list[str] = typer.Option([], "--param", "-p", help="Pipeline parameter NAME=VALUE (repeatable)."),
    tag: str = typer.Option(
        None, envvar="DIGILUT_TAG", help="Image tag the compiled YAML must name (default: the git short SHA)."
    ),
) -> None:
    """Upload the compiled pipeline as a new version and start a run on Kubeflow (with --cron: replace
    the pipeline's recurring run); print its URL. Refuses YAML compiled for another image tag."""
    from digilut.ops.kubeflow import SubmitConfig, submit_run

    try:
        cfg = SubmitConfig.from_env(
            host=host,
            namespace=namespace,
            token=token,
            pipeline=pipeline,
            experiment=experiment,
            cron=cron,
            tag=tag,
        )
        url = submit_run(cfg, {"data_uri": data_uri, **_params(param)})
    except (DigilutError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(url)
