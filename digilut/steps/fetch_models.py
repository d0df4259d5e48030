"""Step ``fetch_models``: an ensemble's model files (and tuned boxes config) from S3 or MLflow."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from digilut.boxes import BOXES_CONFIG_NAME, load_boxes_config

log = logging.getLogger(__name__)


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
        from digilut.locations import s3_target
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
