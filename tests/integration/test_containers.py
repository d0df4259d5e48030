"""The images, for real (``make image-test``): what each holds, and both pipelines with every component
in the image its decorator names (``kfp.local.DockerRunner``, user 10001, host network).

``make image-test`` builds the images, sets ``DIGILUT_IMAGE_TEST=1`` and ``DIGILUT_CA_MARKER`` (a line it
added to the CA bundle it handed to the build as a secret) and runs this file; anywhere else (``make
test``, no Docker engine) it skips, saying so. The training run is compared with the same run through
the subprocess runner (this venv): the same patches and split, N boxes per held-out slide in both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from digilut.container_images import image
from digilut.manifest import read_manifest
from digilut.ops.runner import CONTAINER_USER, run_inference_local, run_local
from digilut.slide import read_slide_info
from digilut.storage import upload_dir, upload_file
from digilut.synth import synth_dataset
from digilut.synth_plan import SynthConfig

DOCKER = os.environ.get("DOCKER", "docker")
KINDS = ("base", "train")


def _engine_error() -> str:
    if shutil.which(DOCKER) is None:
        return f"no '{DOCKER}' client"
    proc = subprocess.run([DOCKER, "info"], capture_output=True, text=True)
    return "" if proc.returncode == 0 else f"no Docker engine: {proc.stderr.strip()[:200]}"


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("DIGILUT_IMAGE_TEST"), reason="runs the built images: make image-test"
    ),
]


@pytest.fixture(scope="module", autouse=True)
def engine() -> None:
    error = _engine_error()
    if error:
        pytest.skip(error)
    for kind in KINDS:
        proc = subprocess.run([DOCKER, "image", "inspect", image(kind)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{image(kind)} is not built: make image-test builds it"


def _run_in(kind: str, script: str) -> str:
    """``script`` (Python) in image ``kind`` as the images' user, no network; its stdout."""
    proc = subprocess.run(
        [
            DOCKER,
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            CONTAINER_USER,
            image(kind),
            "python",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"in {image(kind)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --- what is inside each image ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_digilut_cli_runs(kind: str) -> None:
    proc = subprocess.run(
        [DOCKER, "run", "--rm", "--network", "none", image(kind), "digilut", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("prepare", "train", "run"):
        assert command in proc.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_executor_writes_home_and_tmp_as_10001(kind: str) -> None:
    """What a KFP task does first: ``mktemp -d`` for its program, then outputs and caches under HOME."""
    out = _run_in(
        kind,
        "import os, pathlib, subprocess, tempfile, kfp.dsl.executor_main\n"
        "d = subprocess.run(['mktemp', '-d'], capture_output=True, text=True, check=True).stdout.strip()\n"
        "pathlib.Path(d, 'ephemeral_component.py').write_text('x = 1')\n"
        "home = pathlib.Path.home(); (home / '.cache' / 'x').mkdir(parents=True)\n"
        "(home / 'f').write_text('ok')\n"
        "tempfile.NamedTemporaryFile(dir='/tmp').close()\n"
        "print(os.getuid(), os.getgid(), home, d)",
    )
    uid, gid, home, tmp = out.split()
    assert (uid, gid, home) == ("10001", "10001", "/home/digilut") and tmp.startswith("/tmp/")


# OpenCL platforms through the ICD loader pyFAST uses (ctypes: no clinfo in the images).
_PLATFORMS = """
import ctypes, fast
cl = ctypes.CDLL('libOpenCL.so.1')
n = ctypes.c_uint()
assert cl.clGetPlatformIDs(0, None, ctypes.byref(n)) == 0 and n.value > 0, 'no OpenCL platform'
ids = (ctypes.c_void_p * n.value)()
cl.clGetPlatformIDs(n.value, ids, None)
for p in ids:
    buf = ctypes.create_string_buffer(256)
    cl.clGetPlatformInfo(ctypes.c_void_p(p), 0x0902, 256, buf, None)  # CL_PLATFORM_NAME
    print(buf.value.decode())
"""


def test_base_image_fast_finds_the_pocl_opencl_platform() -> None:
    assert "Portable Computing Language" in _run_in("base", _PLATFORMS).splitlines()


def test_base_image_has_no_torch() -> None:
    out = _run_in(
        "base", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('torchvision'))"
    )
    assert out.split() == ["None", "None"]


def test_train_image_torch_reports_its_cuda_version() -> None:
    import torch  # the venv has the same CUDA build, pinned by the same requirements

    out = _run_in("train", "import torch, fast; print(torch.__version__, torch.version.cuda)")
    version, cuda = out.splitlines()[-1].split()  # pyFAST prints a banner to stdout first
    assert cuda == torch.version.cuda and cuda.startswith("13.")
    assert version.split("+")[0] == torch.__version__.split("+")[0]


def _files_holding(img: str, needle: bytes) -> tuple[list[str], int]:
    """Members of ``docker save img`` (every layer tar, the config, the manifest) whose bytes hold
    ``needle``, and how many layer tars were read."""
    hits, layers = [], 0
    proc = subprocess.Popen([DOCKER, "save", img], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
        for member in outer:
            if not member.isfile():
                continue
            layers += member.name.endswith("layer.tar")
            f = outer.extractfile(member)
            assert f is not None
            tail = b""
            while chunk := f.read(1 << 22):
                if needle in tail + chunk:
                    hits.append(member.name)
                    break
                tail = chunk[-len(needle) :]
    assert proc.wait() == 0
    return hits, layers


@pytest.mark.parametrize("kind", KINDS)
def test_ca_bundle_secret_is_in_no_layer(kind: str) -> None:
    marker = os.environ.get("DIGILUT_CA_MARKER", "").encode()
    assert len(marker) >= 16, "make image-test sets DIGILUT_CA_MARKER"
    inspect = subprocess.run(
        [DOCKER, "image", "inspect", image(kind)], capture_output=True, text=True, check=True
    )
    diff_ids = set(json.loads(inspect.stdout)[0]["RootFS"]["Layers"])
    hits, layers = _files_holding(image(kind), marker)
    assert layers == len(diff_ids), f"read {layers} layer tars of {len(diff_ids)}"
    assert hits == [], f"{image(kind)}: the CA bundle handed to the build is in {hits}"


# --- the pipelines, each component in its image ------------------------------------------------


@pytest.fixture(scope="module")
def runs(s3_server, mlflow_server, tmp_path_factory):
    """The tiny training pipeline from S3 twice (DockerRunner, SubprocessRunner), then inference in
    containers with the ensemble the container run registered."""
    tmp = tmp_path_factory.mktemp("containers")
    data = tmp / "data"
    # the e2e test's data: 4 patients left a fold without lesion-free patients
    synth_dataset(data, SynthConfig(patients=6, seed=2, size="tiny", positive_fraction=0.85))
    cfg = s3_server.config()
    upload_dir(cfg, data, "containers/data")
    mp = pytest.MonkeyPatch()
    for k, v in {**cfg.to_env(), "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri}.items():
        mp.setenv(k, v)
    out = {}
    try:
        for runner in ("docker", "subprocess"):
            out[runner] = run_local(
                f"s3://{cfg.bucket}/containers/data",
                tmp / runner,
                profile="tiny",
                results_uri=f"s3://{cfg.bucket}/containers/{runner}-results",
                echo=False,
                runner=runner,
                experiment="digilut-containers",
                run_name=f"containers-{runner}",
                register_model=f"digilut-{runner}-ensemble",
            )
        slides = sorted((data / "images").iterdir())[:2]
        rows = []
        for i, s in enumerate(slides):
            info = read_slide_info(s)  # test.csv's max_x/max_y are the slide's size: boxes are clipped to it
            rows.append((s.name, info.width, info.height, 200 + i))
        test_csv = tmp / "test.csv"
        pd.DataFrame(rows, columns=["filename", "max_x", "max_y", "trustii_id"]).to_csv(test_csv, index=False)
        for s in slides:
            upload_file(cfg, s, f"containers/new/images/{s.name}")
        upload_file(cfg, test_csv, "containers/new/test.csv")
        sub = run_inference_local(
            f"s3://{cfg.bucket}/containers/new",
            "models:/digilut-docker-ensemble/1",
            tmp / "inference",
            results_uri=f"s3://{cfg.bucket}/containers/new-results",
            echo=False,
            runner="docker",
            stride_px=256,
            predict_batch_size=64,
        )
    finally:
        mp.undo()
    # seen with make image-test PYTEST_ARGS=-s
    print(", ".join(f"{k} training run {r.seconds:.0f} s" for k, r in out.items()))
    yield out, sub, data
    shutil.rmtree(tmp, ignore_errors=True)


def _task_output(result, task: str, name: str) -> Path:
    (path,) = result.out_dir.glob(f"kfp-root/*/{task}/{name}")
    return path


def test_every_component_ran_in_its_image(runs) -> None:
    out, _, _ = runs
    log = (out["docker"].out_dir / "pipeline.log").read_text()
    assert f"Found image '{image('base')}'" in log and f"Found image '{image('train')}'" in log
    assert "Pulling image" not in log


def test_container_run_extracts_and_splits_as_the_subprocess_run(runs) -> None:
    out, _, _ = runs
    for task, name in (("merge", "patches/manifest.parquet"), ("split-patients", "split/manifest.parquet")):
        docker = read_manifest(_task_output(out["docker"], task, name), require=())
        sub = read_manifest(_task_output(out["subprocess"], task, name), require=())
        assert len(docker) > 0
        pd.testing.assert_frame_equal(docker, sub)


def test_container_run_boxes_metrics_and_registered_model(runs, mlflow_server) -> None:
    from mlflow import MlflowClient

    out, _, data = runs
    truth = pd.read_csv(data / "train.csv")
    for runner, result in out.items():
        boxes = pd.read_csv(result.boxes_csv)
        scored = {s["slide"]: s for s in result.metrics["score"]["slides"]}
        assert scored, runner
        for slide, s in scored.items():
            n = int((truth.filename == slide).sum())
            assert s["n_truth"] == n and int((boxes.filename == slide).sum()) == n, (runner, slide)
        assert 0.0 <= result.metrics["mean_f2"] <= 1.0
    assert set(out["docker"].metrics) == set(out["subprocess"].metrics)
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    assert client.get_model_version("digilut-docker-ensemble", "1").status == "READY"


def test_inference_in_containers_writes_the_submission(runs) -> None:
    _, sub_path, _ = runs
    sub = pd.read_csv(sub_path)
    assert list(sub.columns) == ["trustii_id", "filename", "y1", "y2", "x1", "x2"]
    assert sorted(sub.trustii_id) == [200, 201]
    assert (sub.x1 < sub.x2).all() and (sub.y1 < sub.y2).all()
