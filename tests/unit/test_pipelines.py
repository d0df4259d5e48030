"""The compiled pipelines (KFP IR): up to date, GPUs, loops, platform config, caching, retries, images."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from digilut import k8s

ROOT = Path(__file__).parents[2]
COMPILED = ROOT / "pipelines" / "compiled"


def load(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def committed_image(name: str, kind: str) -> str:
    text = (COMPILED / f"{name}.yaml").read_text()
    (ref,) = set(re.findall(rf"image: (\S+/digilut-{kind}:\S+)", text))
    return ref


def test_compiled_pipelines_are_up_to_date(tmp_path):
    ref = committed_image("training", "base")
    registry, tag = ref.rsplit("/digilut-base:", 1)
    env = {**os.environ, "DIGILUT_REGISTRY": registry, "DIGILUT_TAG": tag}
    code = f"from digilut.ops.kubeflow import compile_pipelines; compile_pipelines({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    for name in ("training", "inference"):
        fresh = (tmp_path / f"{name}.yaml").read_text()
        assert fresh == (COMPILED / f"{name}.yaml").read_text(), (
            f"{name}.yaml is stale: run `make compile TAG={tag}`"
        )


def test_fold_training_and_prediction_get_one_gpu_on_a_gpu_node():
    spec, platform = load("training")
    for executor in ("exec-train-fold", "exec-predict"):
        res = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        assert (
            res["accelerator"]["resourceType"] == k8s.GPU_RESOURCE
            and res["accelerator"]["resourceCount"] == "1"
        )
        assert res["resourceCpuRequest"] and res["resourceMemoryLimit"]
        conf = platform[executor]
        assert conf["nodeSelector"]["labels"] == dict(k8s.GPU_NODE_SELECTOR)
        assert conf["tolerations"] == [dict(k8s.GPU_TOLERATION)]
        assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"} in conf["emptyDirMounts"]


def test_folds_and_extraction_run_as_parallel_loops():
    spec, _ = load("training")
    tasks = spec["root"]["dag"]["tasks"]
    loops = {t["componentRef"]["name"]: t for t in tasks.values() if "parameterIterator" in t}
    inner = {name: set(spec["components"][name]["dag"]["tasks"]) for name in loops}
    extract_loop = next(n for n, ts in inner.items() if "extract" in ts)
    fold_loop = next(n for n, ts in inner.items() if "train-fold" in ts)
    assert loops[extract_loop]["iteratorPolicy"]["parallelismLimit"] == 8
    assert loops[fold_loop]["parameterIterator"]["items"]["inputParameter"].endswith("split-patients-Output")
    models = tasks["predict"]["inputs"]["artifacts"]["models"]["taskOutputArtifact"]
    assert models == {
        "outputArtifactKey": "pipelinechannel--train-fold-model",
        "producerTask": fold_loop.removeprefix("comp-"),
    }


def test_caching_on_for_data_steps_off_for_the_listing_training_and_retries_on_gpu_steps():
    spec, _ = load("training")
    comps, root = spec["components"], spec["root"]["dag"]["tasks"]
    extract = next(
        c["dag"]["tasks"]["extract"] for c in comps.values() if "extract" in c.get("dag", {}).get("tasks", {})
    )
    train = next(
        c["dag"]["tasks"]["train-fold"]
        for c in comps.values()
        if "train-fold" in c.get("dag", {}).get("tasks", {})
    )
    assert extract["cachingOptions"] == {"enableCache": True}
    for name in ("ingest", "merge", "label", "split-patients"):
        assert root[name]["cachingOptions"] == {"enableCache": True}
    assert train["cachingOptions"] == {}  # disabled
    for name in ("list-source", "start-tracking", "predict", "evaluate"):
        assert root[name]["cachingOptions"] == {}
    assert train["retryPolicy"]["maxRetryCount"] == 2 and train["retryPolicy"]["backoffDuration"] == "60s"


def test_the_mlflow_parent_run_gets_every_pipeline_parameter_and_the_kfp_run():
    spec, _ = load("training")
    inputs = spec["root"]["dag"]["tasks"]["start-tracking"]["inputs"]["parameters"]
    names = list(spec["root"]["inputDefinitions"]["parameters"])
    lines = inputs["params"]["runtimeValue"]["constant"].split("\n")
    # one name=value line per pipeline parameter, each value a KFP placeholder filled in at run time
    assert sorted(lines) == sorted(f"{n}={{{{$.inputs.parameters['pipelinechannel--{n}']}}}}" for n in names)
    assert inputs["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert inputs["kfp_run_name"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"


@pytest.mark.parametrize("name", ["training", "inference"])
def test_ingest_is_keyed_by_the_listing_parameter_and_extract_by_its_batch(name):
    """ingest's cache key is the listing's value (a parameter), extract's its batch of (name, size,
    ETag): a replaced slide changes both, an unchanged bucket neither (parameters by value, artifacts by
    identity: backend/src/v2/cacheutils/cache.go, ``GenerateCacheKey``)."""
    spec, _ = load(name)
    comps, root = spec["components"], spec["root"]["dag"]["tasks"]
    assert root["ingest"]["inputs"]["parameters"]["source"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "list-source"}
    }
    assert "artifacts" not in root["ingest"]["inputs"]
    (loop,) = (c for c in comps.values() if "extract" in c.get("dag", {}).get("tasks", {}))
    slides = loop["dag"]["tasks"]["extract"]["inputs"]["parameters"]["slides"]
    assert slides == {"componentInputParameter": "pipelinechannel--ingest-Output-loop-item"}


@pytest.mark.parametrize("name", ["training", "inference"])
def test_s3_credentials_come_from_the_secret_and_no_secret_value_is_in_the_yaml(name):
    _, platform = load(name)
    for conf in platform.values():
        if "secretAsEnv" in conf:
            (sec,) = conf["secretAsEnv"]
            assert sec["secretName"] == k8s.S3_SECRET_NAME
            assert {e["envVar"] for e in sec["keyToEnv"]} == set(k8s.S3_SECRET_KEYS)
    assert "exec-ingest" in platform and "secretAsEnv" in platform["exec-ingest"]
    text = (COMPILED / f"{name}.yaml").read_text()
    assert not re.search(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|password\s*[:=]", text, re.IGNORECASE
    )


@pytest.mark.parametrize("name", ["training", "inference"])
def test_images_are_pinned_and_the_ones_the_makefile_builds(name):
    spec, _ = load(name)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    base, train = committed_image(name, "base"), committed_image(name, "train")
    assert images == {base, train}
    registry, tag = base.rsplit("/digilut-base:", 1)
    assert tag not in ("latest", "main", "dev") and train == f"{registry}/digilut-train:{tag}"
    out = subprocess.run(
        ["make", "-s", "print-images", f"REGISTRY={registry}", f"TAG={tag}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(out) == {base, train}
    gpu = {
        e
        for e, v in spec["deploymentSpec"]["executors"].items()
        if "accelerator" in v["container"].get("resources", {})
    }
    assert all(spec["deploymentSpec"]["executors"][e]["container"]["image"] == train for e in gpu)


def test_committed_pipelines_and_manifests_name_one_release_tag():
    """The committed YAML and manifests/images deploy the same images: tag v<pyproject version>."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tags = {
        committed_image(n, k).rsplit(":", 1)[1] for n in ("training", "inference") for k in ("base", "train")
    }
    component = yaml.safe_load((ROOT / "manifests" / "images" / "kustomization.yaml").read_text())
    (entry,) = component["images"]
    assert tags == {f"v{version}"} == {entry["newTag"]}
    assert f"{entry['newName']}:{entry['newTag']}" == committed_image("training", "base")
