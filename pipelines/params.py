"""The pipeline parameters that are config fields, tied to the config dataclasses in one place.

KFP needs every parameter spelled out with its type twice: in the component's signature (its source
travels to the pod as text, so it cannot be generated from a dataclass at import time) and in the
pipeline's (the run's form in the KFP UI). What keeps both equal to the configs is here:

- :data:`CONFIGS`: the config each component builds with :func:`digilut.steps.common.config_from`,
  and the prefix of its parameters (``label_`` + ``LabelConfig.mode`` = ``label_mode``);
- :func:`config_args`: a component's config parameters taken from the pipeline's parameters of the
  same name, so the pipeline never spells them a third time when it calls the component;
- ``tests/unit/test_pipeline_params.py`` asserts that both signatures use the fields' names, types
  and defaults, and that the compiled pipelines feed each of them from the parameter of its name.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from digilut.boxes import BoxesConfig
from digilut.extract import ExtractConfig
from digilut.labels import LabelConfig
from digilut.predict import PredictConfig
from digilut.split import SplitConfig
from digilut.train_config import TrainConfig

# component (its Python function's name) -> (config dataclass, parameter prefix)
CONFIGS: dict[str, tuple[type, str]] = {
    "extract": (ExtractConfig, ""),
    "label": (LabelConfig, "label_"),
    "split_patients": (SplitConfig, ""),
    "train_fold": (TrainConfig, ""),
    "predict": (PredictConfig, ""),
    "predict_all": (PredictConfig, ""),
    "evaluate": (BoxesConfig, "boxes_"),
    "submission": (BoxesConfig, "boxes_"),
}


def config_fields(cls: type, prefix: str = "") -> dict[str, tuple[type, Any]]:
    """``prefix + field name`` -> (parameter type, default) of each field of ``cls``: the default's
    type (``str`` for a ``Literal``), or the declared one for a ``None`` default, as the CLI's
    options (:mod:`digilut.commands.options`)."""
    hints = typing.get_type_hints(cls)
    return {
        prefix + f.name: (hints[f.name] if f.default is None else type(f.default), f.default)
        for f in dataclasses.fields(cls)
    }


def config_inputs(component: Any) -> list[str]:
    """The parameters of ``component`` that are fields of its config, in signature order."""
    fields = config_fields(*CONFIGS[component.python_func.__name__])
    return [name for name in component.component_spec.inputs or {} if name in fields]


def config_args(component: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``component``'s config parameters from the pipeline's ``params`` (its ``locals()``); a config
    parameter the pipeline lacks is an error when compiling, not a silent component default."""
    names = config_inputs(component)
    missing = [n for n in names if n not in params]
    if missing:
        raise TypeError(
            f"component {component.python_func.__name__} takes {', '.join(missing)}: "
            "add them to the pipeline's parameters"
        )
    return {n: params[n] for n in names}
