"""The parameters that are config fields have one meaning from the pipeline to the config: each
component's and each pipeline's signature use the field's name, type and default, and the compiled
pipelines feed each component's config parameter from the pipeline parameter of the same name
(pipelines.params). KFP needs both signatures spelled out; these tests make them drift-proof."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import inference, patches, training
from digilut.extract import INFERENCE_STRIDE_PX
from pipelines.inference import inference as inference_pipeline
from pipelines.params import CONFIGS, config_args, config_fields, config_inputs
from pipelines.training import training as training_pipeline

COMPILED = Path(__file__).parents[2] / "pipelines" / "compiled"
COMPONENTS = {
    name: getattr(mod, name)
    for mod in (patches, training, inference)
    for name in vars(mod)
    if name in CONFIGS
}
PIPELINES = {"training": training_pipeline, "inference": inference_pipeline}
# Pipeline defaults that differ from the config's on purpose, with the reason.
PIPELINE_DEFAULTS = {
    "stride_px": INFERENCE_STRIDE_PX,  # both pipelines extract on the inference grid (test patients)
}


def _all_fields() -> dict[str, tuple[type, Any]]:
    out: dict[str, tuple[type, Any]] = {}
    for cls, prefix in set(CONFIGS.values()):
        for name, (kind, default) in config_fields(cls, prefix).items():
            assert out.setdefault(name, (kind, default)) == (kind, default), f"{name}: two meanings"
    return out


def test_every_component_that_builds_a_config_is_listed_with_its_config_and_prefix() -> None:
    assert sorted(COMPONENTS) == sorted(CONFIGS)
    for mods in (patches, training, inference):
        for name, obj in vars(mods).items():
            if not hasattr(obj, "python_func"):
                continue
            source = inspect.getsource(obj.python_func)
            calls = re.findall(r"config_from\((\w+), locals\(\)(?:, prefix=\"(\w+)\")?\)", source)
            expected = [(CONFIGS[name][0].__name__, CONFIGS[name][1])] if name in CONFIGS else []
            assert calls == expected, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_component_config_parameters_have_the_fields_types_and_defaults(name: str) -> None:
    component = COMPONENTS[name]
    fields = config_fields(*CONFIGS[name])
    params = inspect.signature(component.python_func).parameters
    assert config_inputs(component), f"{name} takes no parameter of its config"
    for param in config_inputs(component):
        kind, default = fields[param]
        assert params[param].annotation is kind, (name, param)
        if params[param].default is not inspect.Parameter.empty:
            assert params[param].default == default, (name, param)


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_pipeline_config_parameters_have_the_fields_types_and_defaults(pipeline: str) -> None:
    fields = _all_fields()
    params = inspect.signature(PIPELINES[pipeline].pipeline_func).parameters
    checked = [p for p in params if p in fields]
    assert len(checked) >= 7
    for name in checked:
        kind, default = fields[name]
        assert params[name].annotation is kind, (pipeline, name)
        assert params[name].default == PIPELINE_DEFAULTS.get(name, default), (pipeline, name)


def _tasks(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return [(t["componentRef"]["name"], t) for dag in dags for t in dag["tasks"].values()]


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_compiled_pipeline_feeds_each_config_parameter_from_the_pipeline_parameter_of_its_name(
    pipeline: str,
) -> None:
    spec = next(yaml.safe_load_all((COMPILED / f"{pipeline}.yaml").read_text()))
    by_ref = {f"comp-{name.replace('_', '-')}": COMPONENTS[name] for name in CONFIGS}
    fed = set()
    for ref, task in _tasks(spec):
        if ref not in by_ref:
            continue
        inputs = task["inputs"]["parameters"]
        for param in config_inputs(by_ref[ref]):
            source = inputs[param].get("componentInputParameter")
            assert source in (param, f"pipelinechannel--{param}"), (pipeline, ref, param, inputs[param])
            fed.add(param)
    # and no pipeline parameter named as a config field is left unused (a component renamed its own)
    fields = _all_fields()
    assert {p for p in spec["root"]["inputDefinitions"]["parameters"] if p in fields} == fed


def test_a_config_parameter_missing_from_the_pipeline_is_an_error_naming_it() -> None:
    params = {"predict_batch_size": 8}
    assert config_args(training.predict, params) == params
    with pytest.raises(TypeError, match=r"train_fold takes arch, .*train_batch_size"):
        config_args(training.train_fold, {"lr": 0.1})
