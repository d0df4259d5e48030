"""Trained models in MLflow's model formats: a fold's model as an ``mlflow.pytorch`` model, the
fold models as one ``pyfunc`` ensemble registered under a name.

The folders are built here and handed to :class:`~digilut.tracking.Tracker`, which only uploads
folders and registers them (it builds no models). They are built in the tracker's background
thread, when the call is sent: training does not wait for MLflow's import and pickling, and a call
retried after an outage builds its folder again. MLflow and torch are imported inside the
functions: the ensemble is registered from the CPU image (``evaluate``), which has no torch.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from digilut.tracking import RunHandle, Tracker


def pip_requirements() -> list[str]:
    """The packages a logged model needs, pinned to the versions here (no MLflow inference: slow)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "torchvision", "numpy", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def save_pytorch_model(model_file: Path, dest: Path) -> None:
    """Write the digilut model file ``model_file`` as an ``mlflow.pytorch`` model folder ``dest``."""
    import mlflow.pytorch
    import torch

    from digilut.model import load_model

    loaded = load_model(model_file, torch.device("cpu"))
    mlflow.pytorch.save_model(
        loaded.model,
        str(dest),
        serialization_format="pickle",  # pt2 would need an input example to trace
        pip_requirements=pip_requirements(),
        metadata={k: v for k, v in loaded.meta.items() if isinstance(v, int | float | str)},
    )


def save_ensemble(model_files: Sequence[Path], dest: Path, extra_files: Sequence[Path] = ()) -> None:
    """Write the fold models as one ``pyfunc`` ensemble folder ``dest`` (see
    :func:`_ensemble_python_model`), with ``extra_files`` (the tuned boxes config) beside them."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        str(dest),
        python_model=_ensemble_python_model(),
        artifacts={f"model{i}": str(p) for i, p in enumerate(model_files)},
        pip_requirements=pip_requirements(),
    )
    for extra in extra_files:
        shutil.copy2(extra, dest / extra.name)


def log_model(tracker: Tracker, run: RunHandle, model_file: str | Path, name: str = "model") -> None:
    """Log a digilut model file on ``run``: as an ``mlflow.pytorch`` model (artifact folder
    ``name``) and the file itself (``checkpoint/``)."""
    path = Path(model_file)
    tracker.log_folder(run, name, partial(save_pytorch_model, path))
    tracker.log_artifacts(run, path, "checkpoint")


def register_ensemble(
    tracker: Tracker,
    run: RunHandle,
    model_files: Sequence[str | Path],
    model_name: str,
    *,
    extra_files: Sequence[str | Path] = (),
) -> None:
    """Log the fold models as one pyfunc ensemble on ``run`` (artifact folder ``ensemble``) and
    register it as ``model_name``; ``extra_files`` are stored in the ensemble's folder."""
    paths = [Path(p) for p in model_files]
    extras = [Path(p) for p in extra_files]
    tracker.register_folder(run, "ensemble", model_name, partial(save_ensemble, paths, extra_files=extras))


def _ensemble_python_model() -> Any:
    """A pyfunc model averaging the fold models: input uint8 ``N×H×W×3`` patches, output probabilities
    (for models trained with ``stain_norm``, the patches of one call are normalised as one slide).

    The class is made here (MLflow is imported lazily) and pickled by value by cloudpickle; it
    needs the ``digilut`` package where it is loaded.
    """
    import mlflow.pyfunc

    class DigilutEnsemble(mlflow.pyfunc.PythonModel):  # type: ignore[misc, name-defined]
        def load_context(self, context: Any) -> None:
            import torch

            from digilut.predict import Ensemble

            keys = sorted(context.artifacts, key=lambda k: int(k.removeprefix("model")))
            self.ensemble = Ensemble.load([context.artifacts[k] for k in keys], torch.device("cpu"))

        # No type hints here: MLflow would read them as an input schema.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            import numpy as np
            import torch

            images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.uint8))
            stain = None
            if self.ensemble.needs_stain:  # stain-normalised models: the patches given are one slide
                from digilut.stain import fit_stain

                fitted = fit_stain(images, self.ensemble.stain_norm)
                stain = fitted.expand(len(images), *fitted.shape)
            return self.ensemble.predict_batch(images, stain).numpy()

    return DigilutEnsemble()
