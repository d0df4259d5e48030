"""Every KFP component called directly (``component.python_func``) with real artifact objects, as
kubeflow/pipelines-components tests its components: the adapters read and write the artifacts'
paths and metadata, and reach the same step functions the CLI and the pipeline run.

The data components run on ``tiny_data`` (real slides), the model and inference components on a
tiny shard set (``make_patch_manifest``). The CPU components' step modules never import torch.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from kfp import dsl
from patch_fixtures import make_patch_manifest

from components import inference, patches, training
from digilut.container_images import image
from digilut.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU models: one thread is faster

ROOT = Path(__file__).resolve().parents[2]
COMPONENT_MODULES = (patches, training, inference)


def _art(kind: type, folder: Path, name: str) -> Any:
    """An artifact object as the KFP executor hands it to a component: ``.path`` a local folder."""
    a = kind(name=name, uri=str(folder / name))
    a.path = str(folder / name)
    return a


def _components() -> dict[str, Any]:
    return {
        name: obj
        for mod in COMPONENT_MODULES
        for name, obj in vars(mod).items()
        if hasattr(obj, "python_func") and hasattr(obj, "component_spec")
    }


# --- the data half: list_source → ingest → extract → merge → label → split_patients -------------


def _subset(tiny_data: Path, folder: Path, n: int) -> Path:
    """A data folder with the first ``n`` slides of ``tiny_data`` (linked) and their boxes."""
    names = sorted(p.name for p in (tiny_data / "images").iterdir())[:n]
    (folder / "images").mkdir(parents=True)
    for name in names:
        (folder / "images" / name).symlink_to(tiny_data / "images" / name)
    boxes = pd.read_csv(tiny_data / "train.csv")
    boxes[boxes["filename"].isin(names)].to_csv(folder / "train.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def data_run(tiny_data: Path, tiny_prepared, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The data components on 4 slides of 2 patients; split_patients on ``tiny_prepared`` (3 patients)."""
    tmp = tmp_path_factory.mktemp("components_data")
    data = str(_subset(tiny_data, tmp / "data", 4))
    out: dict[str, Any] = {"data": Path(data), "source": patches.list_source.python_func(data_uri=data)}
    out["annotations"] = _art(dsl.Dataset, tmp, "annotations")
    out["batches"] = patches.ingest.python_func(
        data_uri=data, source=out["source"], slides_per_batch=2, require_boxes=True,
        annotations=out["annotations"],
    )  # fmt: skip
    out["extracted"] = [_art(dsl.Dataset, tmp, f"extracted{k}") for k in range(len(out["batches"]))]
    for batch, art in zip(out["batches"], out["extracted"], strict=True):
        patches.extract.python_func(
            data_uri=data, slides=batch, patch_px=256, target_mpp=0.5, stride_px=256,
            min_tissue_fraction=0.5, tissue_threshold=85, extracted=art, shards_uri=str(tmp / "store"),
        )  # fmt: skip
    out["patches"], out["thumbnails"] = _art(dsl.Dataset, tmp, "patches"), _art(dsl.Dataset, tmp, "thumbs")
    patches.merge.python_func(
        extracted=out["extracted"], patches=out["patches"], thumbnails=out["thumbnails"]
    )
    out["labels"] = _art(dsl.Dataset, tmp, "labels")
    patches.label.python_func(
        patches=out["patches"], annotations=out["annotations"], label_mode="patch_fraction",
        label_min_overlap=0.1, labels=out["labels"],
    )  # fmt: skip
    prepared = _art(dsl.Dataset, tiny_prepared[0].parent, tiny_prepared[0].name)  # labelled, 3 patients
    out["split"] = _art(dsl.Dataset, tmp, "split")
    out["folds"] = patches.split_patients.python_func(
        labels=prepared, test_fraction=0.34, folds=2, neg_per_pos=3.0, seed=0, split=out["split"]
    )
    out["store"] = tmp / "store"
    return out


def test_list_source_and_ingest_return_the_listing_and_the_slide_batches(data_run) -> None:
    slides = sorted(p.name for p in (data_run["data"] / "images").iterdir())
    assert [s["name"] for s in data_run["source"]["slides"]] == slides
    assert sorted(s["name"] for b in data_run["batches"] for s in b) == slides
    assert [len(b) for b in data_run["batches"]] == [2, 2]  # a patient's two slides per batch
    boxes = pd.read_csv(Path(data_run["annotations"].path) / "boxes.csv")
    assert set(boxes["filename"]) <= set(slides) and len(boxes) > 0


def test_extract_and_merge_write_their_artifacts_and_metadata(data_run) -> None:
    n_slides = len(list((data_run["data"] / "images").iterdir()))
    per_batch = [e.metadata["patches"] for e in data_run["extracted"]]
    assert all(n > 0 for n in per_batch) and all(e.metadata["failed"] == [] for e in data_run["extracted"])
    meta = data_run["patches"].metadata
    assert meta == {"patches": sum(per_batch), "slides": n_slides, "failed": []}
    assert len(list(data_run["store"].glob("*.shard"))) == n_slides  # shards in the store, not the artifact
    assert not list(Path(data_run["patches"].path).rglob("*.shard"))
    assert len(read_manifest(Path(data_run["patches"].path))) == meta["patches"]
    assert len(list(Path(data_run["thumbnails"].path).glob("*.png"))) == n_slides


def test_label_and_split_patients_write_labels_folds_and_metadata(data_run) -> None:
    labels = read_manifest(Path(data_run["labels"].path), require=("label",))
    assert data_run["labels"].metadata == {"patches": len(labels), "positives": int(labels["label"].sum())}
    assert 0 < data_run["labels"].metadata["positives"] < len(labels)
    assert data_run["folds"] == [0, 1]
    split = read_manifest(Path(data_run["split"].path), require=("split", "fold"))
    assert split.groupby("patient")["split"].nunique().max() == 1  # a patient is on one side
    summary = json.loads((Path(data_run["split"].path) / "split.json").read_text())
    assert len(summary["test_patients"]) == 1 and summary["config"]["folds"] == 2


# --- the model half and inference on a tiny shard set ----------------------------------------------


@pytest.fixture(scope="module")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("components_model")
    manifest = make_patch_manifest(tmp / "patches", patients=5, grid=5, px=64, folds=2)
    df = read_manifest(manifest)
    pos = df[df["label"] == 1].assign(x1=lambda d: d.x0, x2=lambda d: d.x0 + d.w0)
    pos = pos.assign(y1=pos.y0, y2=pos.y0 + pos.h0)
    truth = pos.groupby("slide").agg(x1=("x1", "min"), x2=("x2", "max"), y1=("y1", "min"), y2=("y2", "max"))
    truth = truth.reset_index().rename(columns={"slide": "filename"}).assign(max_x=10_000, max_y=10_000)
    out: dict[str, Any] = {"manifest": manifest, "truth": truth}
    (tmp / "annotations").mkdir()
    truth.assign(patient=truth["filename"].str[:4]).to_csv(tmp / "annotations" / "boxes.csv", index=False)
    (tmp / "thumbs").mkdir()
    run = _art(dsl.Artifact, tmp, "tracking")
    training.start_tracking.python_func(run_name="t", experiment="digilut", tracking=run, params="epochs=2")
    out["tracking"] = run
    src = _art(dsl.Dataset, tmp, "patches")  # the manifest's folder: patches and split at once
    out["models"] = []
    for k in (0, 1):
        model = _art(dsl.Model, tmp, f"model{k}")
        metrics = _art(dsl.Metrics, tmp, f"metrics{k}")
        training.train_fold.python_func(
            patches=src, split=src, fold=k, arch="resnet18", loss="bce", input_px=64, epochs=1,
            train_batch_size=16, lr=1e-3, seed=0, experiment="digilut", tracking_run=run, model=model,
            tensorboard=_art(dsl.Artifact, tmp, f"tb{k}"), metrics=metrics, weights="none",
        )  # fmt: skip
        out["models"].append(model)
        out[f"metrics{k}"] = metrics
    out["predictions"] = _art(dsl.Dataset, tmp, "predictions")
    training.predict.python_func(
        patches=src, split=src, models=out["models"], predict_batch_size=32, predictions=out["predictions"]
    )
    out["results"] = _art(dsl.Dataset, tmp, "results")
    out["eval_metrics"] = _art(dsl.Metrics, tmp, "eval_metrics")
    training.evaluate.python_func(
        predictions=out["predictions"], models=out["models"],
        annotations=_art(dsl.Dataset, tmp, "annotations"), thumbnails=_art(dsl.Dataset, tmp, "thumbs"),
        boxes_method="hysteresis", tune_boxes=False,
        tracking_run=run, experiment="digilut", results_uri=str(tmp / "published"), register_model="",
        results=out["results"], metrics=out["eval_metrics"], roc=_art(dsl.ClassificationMetrics, tmp, "roc"),
        report=_art(dsl.HTML, tmp, "report.html"), summary=_art(dsl.Markdown, tmp, "summary.md"),
    )  # fmt: skip
    out["tmp"] = tmp
    return out


def test_start_tracking_without_mlflow_writes_an_empty_run_id(model_run, monkeypatch) -> None:
    assert Path(model_run["tracking"].path).read_text() == ""
    assert model_run["tracking"].metadata == {"mlflow_run_id": "", "experiment": "digilut"}


def test_train_fold_writes_the_model_tensorboard_and_metrics(model_run) -> None:
    for k, model in enumerate(model_run["models"]):
        assert (Path(model.path) / "model.pt").is_file() and (Path(model.path) / "oof.parquet").is_file()
        assert model.metadata["fold"] == k and model.metadata["framework"] == "pytorch"
        assert model.metadata["best_epoch"] == 0
        assert list((model_run["tmp"] / f"tb{k}").rglob("events.out.tfevents.*"))
        assert set(model_run[f"metrics{k}"].metadata) == {f"fold{k}_val_auroc", f"fold{k}_best_epoch"}


def test_predict_and_evaluate_score_the_test_patients_and_publish(model_run) -> None:
    pred = model_run["predictions"]
    df = pd.read_parquet(Path(pred.path) / "predictions.parquet")
    assert pred.metadata == {"patches": len(df), "models": 2} and (df["split"] == "test").all()
    assert df["prob"].between(0, 1).all()
    results = Path(model_run["results"].path)
    metrics = json.loads((results / "metrics.json").read_text())
    assert model_run["eval_metrics"].metadata["mean_f2"] == pytest.approx(metrics["score"]["mean_f2"])
    assert sorted(p.name for p in (results / "models").glob("*.pt")) == ["fold0.pt", "fold1.pt"]
    tmp = model_run["tmp"]
    assert (tmp / "report.html").read_text() == (results / "report.html").read_text()
    assert (tmp / "published" / "metrics.json").is_file()  # results_uri: copied there


def test_inference_components_fetch_predict_and_submit(model_run) -> None:
    tmp = model_run["tmp"]
    models = _art(dsl.Model, tmp, "fetched")
    inference.fetch_models.python_func(
        model_uri=str(Path(model_run["results"].path) / "models"), models=models
    )
    assert models.metadata == {"models": 2, "source": str(Path(model_run["results"].path) / "models")}
    preds = _art(dsl.Dataset, tmp, "all_predictions")
    patches_art = _art(dsl.Dataset, tmp, "patches")
    inference.predict_all.python_func(
        patches=patches_art, models=models, predict_batch_size=32, predictions=preds
    )
    assert preds.metadata == {"patches": len(read_manifest(model_run["manifest"]))}
    data = tmp / "new_data"
    data.mkdir()
    slides = sorted(read_manifest(model_run["manifest"])["slide"].unique())
    rows = [(s, 10_000, 10_000, 100 + i) for i, s in enumerate(slides)]
    pd.DataFrame(rows, columns=["filename", "max_x", "max_y", "trustii_id"]).to_csv(
        data / "test.csv", index=False
    )
    results = _art(dsl.Dataset, tmp, "submission")
    inference.submission.python_func(
        data_uri=str(data), predictions=preds, boxes_method="hysteresis", results_uri="", results=results
    )
    sub = pd.read_csv(Path(results.path) / "submission.csv")
    assert results.metadata == {"submission": "submission.csv"}
    assert sorted(sub["trustii_id"]) == sorted(r[3] for r in rows)  # exactly N (= 1) box per slide


def test_every_component_is_tested_here_and_stays_thin() -> None:
    """Each component is an adapter: at most ~30 lines of body (docstring and signature aside)."""
    text = Path(__file__).read_text()
    for name, comp in _components().items():
        assert f".{name}.python_func(" in text, f"component {name} has no python_func test"
        func = ast.parse(inspect.getsource(comp.python_func)).body[0]
        body = func.body[1:] if isinstance(func.body[0], ast.Expr) else func.body  # type: ignore[attr-defined]
        lines = body[-1].end_lineno - body[0].lineno + 1
        assert lines <= 30, f"component {name}: {lines} lines of body"


# --- the CPU image has no torch ------------------------------------------------------------------


def _cpu_step_modules() -> list[str]:
    """The ``digilut.steps`` modules the components on the base image import."""
    mods: set[str] = set()
    for comp in _components().values():
        if comp.component_spec.implementation.container.image != image("base"):
            continue
        for node in ast.walk(ast.parse(inspect.getsource(comp.python_func))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("digilut.steps."):
                mods.add(node.module)  # type: ignore[arg-type]
    return sorted(mods)


def test_cpu_steps_import_no_torch() -> None:
    """digilut-base has no torch: importing a CPU step's module (or a component module, or the CLI)
    in a fresh interpreter leaves torch and torchvision unloaded; each module is checked on its own
    (train/predict import torch inside the GPU steps only)."""
    modules = _cpu_step_modules()
    assert {"digilut.steps.ingest", "digilut.steps.evaluate", "digilut.steps.submission"} <= set(modules)
    modules += ["components.patches", "components.training", "components.inference", "digilut.cli"]
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    out[m] = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {m: v for m, v in loaded.items() if v} == {}, "these modules import torch on the CPU image"
