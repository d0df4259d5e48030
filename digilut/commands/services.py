"""CLI: local servers and S3 copies (``digilut services up|down``, ``digilut s3 upload|download|ls``)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from digilut.errors import DigilutError

if TYPE_CHECKING:
    from digilut.ops.process import Service
    from digilut.s3config import S3Config

STATE_DIR = Path(".digilut-services")


def register(app: typer.Typer) -> None:
    services = typer.Typer(
        no_args_is_help=True, help="Local S3 (SeaweedFS) and MLflow servers, on 127.0.0.1 only."
    )
    services.command("up")(services_up)
    services.command("down")(services_down)
    app.add_typer(services, name="services")
    s3 = typer.Typer(
        no_args_is_help=True,
        help="Copy folders to and from S3. Endpoint and keys come from the environment: "
        "DIGILUT_S3_ENDPOINT (or MLFLOW_S3_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.",
    )
    s3.command("upload")(s3_upload)
    s3.command("download")(s3_download)
    s3.command("ls")(s3_ls)
    s3.command("abort-incomplete")(s3_abort_incomplete)
    app.add_typer(s3, name="s3")


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(2)


def services_up(
    state_dir: Path = typer.Option(
        STATE_DIR, "--dir", help="Servers' data, logs, s3.env and state (kept between runs)."
    ),
    keep: bool = typer.Option(
        False, "--keep", help="Return and leave the servers running (stop: digilut services down)."
    ),
    mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="Also start the MLflow server."),
    bucket: str = typer.Option("digilut", help="Bucket created at start."),
    s3_port: int | None = typer.Option(None, help="S3 port (default: a free one)."),
    mlflow_port: int | None = typer.Option(None, help="MLflow port (default: a free one)."),
) -> None:
    """Start SeaweedFS S3 (keys required) and an MLflow server proxying artifacts to it.

    The keys are AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY if set, else those of an earlier run
    (DIR/s3.env), else random ones; DIR/s3.env (mode 0600) exports them with the endpoints.
    """
    import os

    from digilut.ops.mlflow_server import start_mlflow
    from digilut.ops.s3_server import start_s3
    from digilut.ops.services import read_env_file, running_saved, save_state, write_env_file

    state_dir = state_dir.resolve()
    env_file, state_file = state_dir / "s3.env", state_dir / "services.json"
    running = running_saved(state_file)
    if running:
        for entry in running:
            typer.echo(f"{entry['name']} already running at {entry['address']}", err=True)
        typer.echo(
            f"use them (source {env_file}) or stop them: digilut services down --dir {state_dir}", err=True
        )
        raise typer.Exit(1)
    previous = read_env_file(env_file)
    access_key = os.environ.get("AWS_ACCESS_KEY_ID") or previous.get("AWS_ACCESS_KEY_ID")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or previous.get("AWS_SECRET_ACCESS_KEY")
    started: list[Service] = []
    try:
        s3 = start_s3(state_dir / "s3", s3_port, bucket, access_key, secret_key, keep=True)
        started.append(s3)
        tracking_uri = None
        if mlflow:
            server = start_mlflow(state_dir / "mlflow", s3.config(), port=mlflow_port, keep=True)
            started.append(server)
            tracking_uri = server.tracking_uri
    except DigilutError as err:
        for svc in started:
            svc.stop()
        raise _fail(err) from err
    write_env_file(env_file, s3.config(), tracking_uri)
    save_state(state_file, started)
    typer.echo(f"S3 endpoint  {s3.endpoint_url}  (bucket {bucket}; anonymous access refused)")
    if tracking_uri:
        typer.echo(f"MLflow       {tracking_uri}  (artifacts in s3://{bucket}/mlflow)")
    typer.echo(f"credentials  source {env_file}")
    typer.echo(f"logs         {s3.log_path}" + (f", {started[-1].log_path}" if mlflow else ""))
    if keep:
        typer.echo(f"left running; stop with: digilut services down --dir {state_dir}")
        return
    typer.echo("Ctrl-C stops them")
    _wait_then_stop(started, state_file)


def _wait_then_stop(started: list[Service], state_file: Path) -> None:
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        while all(svc.running() for svc in started):
            time.sleep(1)
        dead = [svc.name for svc in started if not svc.running()]
        typer.echo(f"error: {', '.join(dead)} exited; stopping the others", err=True)
    except KeyboardInterrupt:
        pass
    for svc in reversed(started):
        svc.stop()
    state_file.unlink(missing_ok=True)
    typer.echo("stopped")


def services_down(
    state_dir: Path = typer.Option(STATE_DIR, "--dir", help="The folder given to `services up`."),
) -> None:
    """Stop the servers that `digilut services up --keep` left running (their data is kept)."""
    from digilut.ops.services import stop_saved

    try:
        stopped = stop_saved(state_dir.resolve() / "services.json")
    except DigilutError as err:
        raise _fail(err) from err
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running from {state_dir}")


def _cfg(uri: str) -> tuple[S3Config, str]:
    """S3 settings for ``s3://bucket/prefix`` (endpoint and keys from the environment), checked."""
    from digilut.s3config import S3Config, parse_s3_uri
    from digilut.storage import check_bucket

    bucket, prefix = parse_s3_uri(uri)
    cfg = S3Config.from_env(bucket=bucket)
    check_bucket(cfg)
    return cfg, prefix


def _progress(desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def s3_upload(
    local_dir: Path = typer.Argument(..., help="Folder to upload (all files below it)."),
    uri: str = typer.Argument(..., help="Destination s3://bucket/prefix."),
    skip_existing: bool = typer.Option(
        True, "--skip-existing/--overwrite", help="Skip files already there (same size and MD5)."
    ),
) -> None:
    """Upload a folder: DIR/a/b.tif -> s3://bucket/prefix/a/b.tif. Resumes: identical files are skipped."""
    from digilut.storage import upload_dir

    try:
        cfg, prefix = _cfg(uri)
        with _progress("upload") as bar:
            report = upload_dir(cfg, local_dir, prefix, skip_existing=skip_existing, progress=bar.update)
    except (DigilutError, FileNotFoundError) as err:
        raise _fail(err) from err
    typer.echo(
        f"{len(report.transferred)} files ({report.nbytes / 1e6:.1f} MB) uploaded in {report.seconds:.1f}s, "
        f"{len(report.skipped)} already there -> {uri}"
    )


def s3_download(
    uri: str = typer.Argument(..., help="Source s3://bucket/prefix (a folder)."),
    local_dir: Path = typer.Argument(..., help="Destination folder."),
    skip_existing: bool = typer.Option(
        True, "--skip-existing/--overwrite", help="Skip files already here (same size and MD5)."
    ),
) -> None:
    """Download every object under a prefix: s3://bucket/prefix/a/b.tif -> DIR/a/b.tif."""
    from digilut.storage import download_prefix

    try:
        cfg, prefix = _cfg(uri)
        with _progress("download") as bar:
            report = download_prefix(cfg, prefix, local_dir, skip_existing=skip_existing, progress=bar.update)
    except DigilutError as err:
        raise _fail(err) from err
    typer.echo(
        f"{len(report.transferred)} files ({report.nbytes / 1e6:.1f} MB) downloaded in "
        f"{report.seconds:.1f}s, {len(report.skipped)} already there -> {local_dir}"
    )


def s3_ls(uri: str = typer.Argument(..., help="s3://bucket/prefix")) -> None:
    """List objects (size in bytes, key) whose key starts with the prefix."""
    from digilut.storage import list_objects

    try:
        cfg, prefix = _cfg(uri)
        objects = list_objects(cfg, prefix)
    except DigilutError as err:
        raise _fail(err) from err
    for obj in objects:
        typer.echo(f"{obj.size:>14}  {obj.key}")


def s3_abort_incomplete(uri: str = typer.Argument(..., help="s3://bucket/prefix")) -> None:
    """Abort unfinished multipart uploads under a prefix (left by a transfer that failed for good)."""
    from digilut.storage import abort_incomplete_uploads

    try:
        cfg, prefix = _cfg(uri)
        n = abort_incomplete_uploads(cfg, prefix)
    except DigilutError as err:
        raise _fail(err) from err
    typer.echo(f"aborted {n} incomplete upload(s) under {uri}")
