"""The inference pipeline: new slides in S3 + a trained ensemble → N boxes per slide, in the
DigiLut submission format.

    list_source ─► ingest ─► extract ×batches (ParallelFor) ─► merge ─► predict_all (GPU) ─► submission
                                  fetch_models ───────────┘

``data_uri`` holds ``images/*.tif`` and ``test.csv`` (``filename,max_x,max_y,trustii_id``: one row
per expected box); ``model_uri`` is a training run's ``results/models`` (folder or ``s3://``) or
an MLflow registry URI ``models:/<name>/<version>``.
"""

from kfp import dsl

from components.inference import fetch_models, predict_all, submission
from components.patches import extract
from digilut.boxes import BoxesConfig
from digilut.extract import INFERENCE_STRIDE_PX, ExtractConfig
from digilut.predict import PredictConfig
from pipelines.params import config_args
from pipelines.training import extract_and_merge, ingest_source, on_gpu, use_s3_and_tracking

EXTRACT_DEFAULTS, PREDICT_DEFAULTS, BOXES_DEFAULTS = ExtractConfig(), PredictConfig(), BoxesConfig()


@dsl.pipeline(
    name="digilut-inference", description="Find N lesion boxes per new slide with a trained ensemble."
)
def inference(
    data_uri: str,
    model_uri: str,
    results_uri: str = "",
    slides_per_batch: int = 8,
    patch_px: int = EXTRACT_DEFAULTS.patch_px,
    target_mpp: float = EXTRACT_DEFAULTS.target_mpp,
    stride_px: int = INFERENCE_STRIDE_PX,
    min_tissue_fraction: float = EXTRACT_DEFAULTS.min_tissue_fraction,
    tissue_threshold: int = EXTRACT_DEFAULTS.tissue_threshold,
    predict_batch_size: int = PREDICT_DEFAULTS.predict_batch_size,
    boxes_method: str = BOXES_DEFAULTS.method,
    shards_uri: str = "",
) -> None:
    params = dict(locals())  # the config parameters below are passed on by name (pipelines.params)
    ing = ingest_source(data_uri, slides_per_batch, require_boxes=False)
    mg = extract_and_merge(ing, data_uri, shards_uri=shards_uri, **config_args(extract, params))
    fm = use_s3_and_tracking(fetch_models(model_uri=model_uri)).set_caching_options(False)
    pr = predict_all(
        patches=mg.outputs["patches"], models=fm.outputs["models"], **config_args(predict_all, params)
    )
    on_gpu(use_s3_and_tracking(pr), cpu="8", memory="32Gi").set_caching_options(False)  # S3: shards
    sub = submission(
        data_uri=data_uri,
        predictions=pr.outputs["predictions"],
        results_uri=results_uri,
        **config_args(submission, params),
    )
    use_s3_and_tracking(sub).set_caching_options(False)
