"""Components of the inference pipeline: fetch a trained ensemble, predict every patch, write the
submission — each an adapter over one :mod:`digilut.steps` function.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from digilut.container_images import image

BASE = image("base")
TRAIN = image("train")


@dsl.component(base_image=BASE, install_kfp_package=False)
def fetch_models(model_uri: str, models: Output[Model]):
    """The ensemble's model files from a folder, an s3:// prefix or MLflow (models:/name/version)."""
    from pathlib import Path

    from digilut.steps.fetch_models import fetch_models_step

    files = fetch_models_step(model_uri, Path(models.path))
    models.metadata.update({"models": len(files), "source": model_uri})


@dsl.component(base_image=TRAIN, install_kfp_package=False)
def predict_all(
    patches: Input[Dataset], models: Input[Model], predict_batch_size: int, predictions: Output[Dataset]
):
    """Mean probability of the ensemble on every patch."""
    from pathlib import Path

    from digilut.predict import PredictConfig
    from digilut.steps.common import config_from
    from digilut.steps.predict import predict_all_step

    cfg = config_from(PredictConfig, locals())
    out = predict_all_step(Path(patches.path), Path(models.path), Path(predictions.path), cfg)
    predictions.metadata.update({"patches": len(out)})


@dsl.component(base_image=BASE, install_kfp_package=False)
def submission(
    data_uri: str, predictions: Input[Dataset], boxes_method: str, results_uri: str, results: Output[Dataset]
):
    """N boxes per slide of test.csv in the challenge format (trustii_id,filename,y1,y2,x1,x2)."""
    from pathlib import Path

    from digilut.boxes import BoxesConfig
    from digilut.steps.common import config_from
    from digilut.steps.submission import submission_step

    cfg = config_from(BoxesConfig, locals(), prefix="boxes_")
    path = submission_step(data_uri, Path(predictions.path), Path(results.path), cfg, results_uri)
    results.metadata.update({"submission": path.name})
