"""The training pipeline: slides in S3 → patches → folds trained in parallel on GPUs → ensemble →
boxes → DigiLut score and report.

    list_source ─► ingest ─► extract ×batches (ParallelFor) ─► merge ─► label ─► split ─► train_fold ×folds
                                                                        (ParallelFor, 1 GPU each)
                          start_tracking (MLflow parent run) ───────────────┘        │
                                                    predict (ensemble of the fold models)
                                                                         │
                                                    evaluate (boxes, F2, ROC, report, publish)

Every knob is a pipeline parameter whose default comes from the library's config dataclass of the
same name, so the CLI, the library and the pipeline agree; the components get their config parameters
by name (:func:`pipelines.params.config_args`). ParallelFor parallelism is fixed when
compiling (KFP takes no run-time value there): ``DIGILUT_EXTRACT_PARALLELISM`` and
``DIGILUT_TRAIN_PARALLELISM`` (0 = unbounded).

``training`` is longer than the usual 80 lines: ~40 of them are its signature (each parameter
one line, the run's settings as the KFP UI shows them); the body only wires tasks together.
"""

import os

from kfp import dsl, kubernetes

from components.patches import extract, ingest, label, list_source, merge, split_patients
from components.training import evaluate, predict, start_tracking, train_fold
from digilut import k8s
from digilut.boxes import BoxesConfig
from digilut.extract import INFERENCE_STRIDE_PX, ExtractConfig
from digilut.labels import LabelConfig
from digilut.predict import PredictConfig
from digilut.split import SplitConfig
from digilut.train_config import TrainConfig
from pipelines.params import config_args

EXTRACT_PARALLELISM = int(os.environ.get("DIGILUT_EXTRACT_PARALLELISM", "8"))
TRAIN_PARALLELISM = int(os.environ.get("DIGILUT_TRAIN_PARALLELISM", "0"))
# An extract task holds a batch of slides (DigiLut: 1-4 GB each) and their shards on local disk; a
# fold keeps the patches it fetched from the shard store in a local copy of up to 32 GiB
# (digilut.data.DEFAULT_LOCAL_COPY_BYTES) beside its checkpoints.
EXTRACT_SCRATCH = "96Gi"
TRAIN_SCRATCH = "40Gi"
SCRATCH_PATH = "/tmp"
EXTRACT_DEFAULTS, LABEL_DEFAULTS, SPLIT_DEFAULTS = ExtractConfig(), LabelConfig(), SplitConfig()
TRAIN_DEFAULTS, PREDICT_DEFAULTS, BOXES_DEFAULTS = TrainConfig(), PredictConfig(), BoxesConfig()


def non_root(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Run as the images' numeric non-root user (the pod is refused if the image would run as root)."""
    return kubernetes.set_security_context(
        task, run_as_user=k8s.RUN_AS_USER, run_as_group=k8s.RUN_AS_GROUP, run_as_non_root=True
    )


def use_s3_and_tracking(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 credentials from the Secret, endpoint/bucket/MLflow URI from the ConfigMap (as env); non-root."""
    non_root(task)
    kubernetes.use_secret_as_env(
        task, secret_name=k8s.S3_SECRET_NAME, secret_key_to_env={k: k for k in k8s.S3_SECRET_KEYS}
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=k8s.RUNTIME_CONFIGMAP,
        config_map_key_to_env={k: k for k in k8s.RUNTIME_ENV_KEYS},
    )
    return task


def on_gpu(task: dsl.PipelineTask, *, cpu: str = "8", memory: str = "48Gi") -> dsl.PipelineTask:
    """One NVIDIA GPU, a GPU node (selector + taint toleration), a memory-backed /dev/shm for the
    DataLoader workers, and retries with backoff for node preemption; non-root."""
    non_root(task)
    task.set_accelerator_type(k8s.GPU_RESOURCE).set_accelerator_limit(1)
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    for key, value in k8s.GPU_NODE_SELECTOR.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, **dict(k8s.GPU_TOLERATION))
    kubernetes.use_field_path_as_env(task, env_name=k8s.REQUIRE_GPU_ENV, field_path=k8s.REQUIRE_GPU_FIELD)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="600s")
    return task


def ingest_source(data_uri: str, slides_per_batch: int, require_boxes: bool) -> dsl.PipelineTask:
    """An uncached listing of the source (slide names, sizes, ETags; train.csv's ETag) feeding a cached
    ingest: the backend compares parameters by value but input artifacts by identity
    (backend/src/v2/cacheutils/cache.go, ``GenerateCacheKey``), so a listing parameter lets ingest and
    everything after it hit the cache while the data is unchanged, and miss when a file changed."""
    src = use_s3_and_tracking(list_source(data_uri=data_uri)).set_caching_options(False)
    ing = ingest(
        data_uri=data_uri, source=src.output, slides_per_batch=slides_per_batch, require_boxes=require_boxes
    )
    return use_s3_and_tracking(ing).set_caching_options(True)


def with_scratch(task: dsl.PipelineTask, size: str) -> dsl.PipelineTask:
    """A ``size`` scratch volume at ``/tmp`` (the images' ``TMPDIR``) for a task that writes large
    files (slides, shards, the local copy of fetched patches).

    KFP 2.17's SDK has no ``ephemeral-storage`` request (``PipelineTask`` sets CPU, memory and
    accelerators only), so the space is an emptyDir with ``sizeLimit`` (kfp-kubernetes): the pod
    is evicted, naming the volume, when it writes more, instead of filling the node's disk. No
    environment variable: kfp.local ignores the mount but would pass one on."""
    return kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH_PATH, size_limit=size)


def extract_and_merge(ing: dsl.PipelineTask, data_uri: str, **extract_params: object) -> dsl.PipelineTask:
    """Extraction fanned out over ingest's slide batches (cached on each slide's name, size and ETag),
    then merged (cached)."""
    with dsl.ParallelFor(ing.outputs["Output"], parallelism=EXTRACT_PARALLELISM) as batch:
        ex = extract(data_uri=data_uri, slides=batch, **extract_params)
        use_s3_and_tracking(ex).set_cpu_request("4").set_memory_request("16Gi").set_memory_limit("16Gi")
        with_scratch(ex, EXTRACT_SCRATCH).set_caching_options(True)
    return non_root(merge(extracted=dsl.Collected(ex.outputs["extracted"]))).set_caching_options(True)


@dsl.pipeline(
    name="digilut-training", description="Train a patch-classifier ensemble and find DigiLut lesion boxes."
)
def training(
    data_uri: str,
    results_uri: str = "",
    slides_per_batch: int = 8,
    patch_px: int = EXTRACT_DEFAULTS.patch_px,
    target_mpp: float = EXTRACT_DEFAULTS.target_mpp,
    stride_px: int = INFERENCE_STRIDE_PX,
    min_tissue_fraction: float = EXTRACT_DEFAULTS.min_tissue_fraction,
    tissue_threshold: int = EXTRACT_DEFAULTS.tissue_threshold,
    label_mode: str = LABEL_DEFAULTS.mode,
    label_min_overlap: float = LABEL_DEFAULTS.min_overlap,
    test_fraction: float = SPLIT_DEFAULTS.test_fraction,
    folds: int = SPLIT_DEFAULTS.folds,
    neg_per_pos: float = SPLIT_DEFAULTS.neg_per_pos,
    arch: str = TRAIN_DEFAULTS.arch,
    weights: str = TRAIN_DEFAULTS.weights,
    loss: str = TRAIN_DEFAULTS.loss,
    input_px: int = TRAIN_DEFAULTS.input_px,
    stain_norm: str = TRAIN_DEFAULTS.stain_norm,
    stain_scale: float = TRAIN_DEFAULTS.stain_scale,
    stain_shift: float = TRAIN_DEFAULTS.stain_shift,
    train_min_overlap: float = TRAIN_DEFAULTS.train_min_overlap,
    epochs: int = TRAIN_DEFAULTS.epochs,
    train_batch_size: int = TRAIN_DEFAULTS.train_batch_size,
    lr: float = TRAIN_DEFAULTS.lr,
    patches_per_epoch: int = TRAIN_DEFAULTS.patches_per_epoch,
    max_val_patches: int = TRAIN_DEFAULTS.max_val_patches,
    checkpoint_uri: str = "",
    shards_uri: str = "",
    cpu_threads: int = TRAIN_DEFAULTS.cpu_threads,
    predict_batch_size: int = PREDICT_DEFAULTS.predict_batch_size,
    boxes_method: str = BOXES_DEFAULTS.method,
    tune_boxes: bool = True,
    seed: int = SPLIT_DEFAULTS.seed,
    experiment: str = "digilut",
    run_name: str = "digilut-training",
    register_model: str = "",
) -> None:
    """``data_uri``: ``s3://bucket/prefix`` (or a folder, locally) holding images/*.tif and train.csv;
    ``results_uri``: where boxes.csv, metrics.json, the report and the fold models are published ("" =
    artifacts only); ``register_model``: register the ensemble under this MLflow model name ("" = no);
    ``checkpoint_uri``: a folder or ``s3://`` prefix that outlives runs, where each fold keeps its
    checkpoints so that re-running a failed or half-finished pipeline resumes its folds ("" = none);
    ``shards_uri``: the shard store, a folder or ``s3://`` prefix where extraction puts the patch shards
    that training and prediction read by ranged GET ("" = ``<data_uri>/digilut-shards``)."""
    run_params = dict(locals())  # every parameter above: logged on the MLflow parent run, passed on by name
    ing = ingest_source(data_uri, slides_per_batch, require_boxes=True)
    tracking = use_s3_and_tracking(
        start_tracking(
            run_name=run_name,
            experiment=experiment,
            params="\n".join(f"{name}={value}" for name, value in run_params.items()),
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        )
    )
    tracking.set_caching_options(False)
    mg = extract_and_merge(ing, data_uri, shards_uri=shards_uri, **config_args(extract, run_params))
    lb = label(
        patches=mg.outputs["patches"],
        annotations=ing.outputs["annotations"],
        **config_args(label, run_params),
    )
    non_root(lb).set_caching_options(True)
    sp = split_patients(labels=lb.outputs["labels"], **config_args(split_patients, run_params))
    non_root(sp).set_caching_options(True)
    with dsl.ParallelFor(sp.outputs["Output"], parallelism=TRAIN_PARALLELISM) as fold:
        tr = train_fold(
            patches=mg.outputs["patches"],
            split=sp.outputs["split"],
            fold=fold,
            experiment=experiment,
            tracking_run=tracking.outputs["tracking"],
            checkpoint_uri=checkpoint_uri,
            **config_args(train_fold, run_params),
        )
        with_scratch(on_gpu(use_s3_and_tracking(tr)), TRAIN_SCRATCH).set_caching_options(False)
    pr = predict(
        patches=mg.outputs["patches"],
        split=sp.outputs["split"],
        models=dsl.Collected(tr.outputs["model"]),
        **config_args(predict, run_params),
    )
    on_gpu(use_s3_and_tracking(pr), cpu="8", memory="32Gi").set_caching_options(False)  # S3: shards
    ev = evaluate(
        predictions=pr.outputs["predictions"],
        models=dsl.Collected(tr.outputs["model"]),
        annotations=ing.outputs["annotations"],
        thumbnails=mg.outputs["thumbnails"],
        tune_boxes=tune_boxes,
        tracking_run=tracking.outputs["tracking"],
        experiment=experiment,
        results_uri=results_uri,
        register_model=register_model,
        **config_args(evaluate, run_params),
    )
    use_s3_and_tracking(ev).set_caching_options(False)
