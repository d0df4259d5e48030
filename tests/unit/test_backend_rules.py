"""The compiled pipelines against the KFP backend's own rules, offline (no KFP server runs here).

``kfp.local`` passes Python objects between tasks and never reads the platform config, so a pipeline
it runs can still be refused by the backend. These tests check what the backend checks:

* types: backend/src/v2/driver/resolve.go (``resolveInputs``) resolves each input and then checks
  the value against the consumer's declared type ("input parameter %q type mismatch");
* caching: backend/src/v2/cacheutils/cache.go (``GenerateCacheKey``) keys a task on its input
  parameters by value but on its input artifacts by name (identity): a task reading an artifact of a
  task that is never cached can never hit;
* platform config: backend/src/v2/compiler/argocompiler/container.go (``containerExecutorTask``)
  parses each task's Kubernetes config with ``protojson.Unmarshal`` (unknown fields are errors)
  against the ``kubernetes_executor_config.proto`` of its release (kubernetes_platform/proto/),
  here the schema of the minimum supported release, vendored under tests/data/.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, struct_pb2
from google.protobuf.descriptor import FileDescriptor
from kfp.pipeline_spec import pipeline_spec_pb2

from digilut.ops.kubeflow import MIN_KFP_BACKEND, input_type_mismatches

ROOT = Path(__file__).parents[2]
COMPILED = ROOT / "pipelines" / "compiled"
SCHEMA = (
    ROOT / "tests" / "data" / f"kfp_kubernetes_{MIN_KFP_BACKEND.replace('.', '_')}_executor_config_pb2.py"
)
PIPELINES = ["training", "inference"]


def load(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def executor_config_class(pb2_file: Path) -> type:
    """``KubernetesExecutorConfig`` of a generated ``*_pb2.py``, built from its serialized descriptor in a
    pool of its own (the installed, newer kfp-kubernetes keeps the default pool)."""
    tree = ast.parse(pb2_file.read_text())
    (blob,) = (
        ast.literal_eval(node.args[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
    )
    pool = descriptor_pool.DescriptorPool()

    def add(file: FileDescriptor) -> None:  # its imports first
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)

    # its imports: google/protobuf/struct.proto and pipeline_spec.proto (from the installed kfp-pipeline-spec;
    # the platform config uses only its TaskInputsSpec.InputParameterSpec, in the 2.16 form)
    add(struct_pb2.DESCRIPTOR)
    add(pipeline_spec_pb2.DESCRIPTOR)
    pool.AddSerializedFile(blob)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("kfp_kubernetes.KubernetesExecutorConfig")
    )


@pytest.mark.parametrize("name", PIPELINES)
def test_every_task_input_has_the_type_of_what_feeds_it(name):
    """Loop items included: a loop item typed STRING fed to a LIST or NUMBER_INTEGER input fails in the
    driver (backend/src/v2/driver/resolve.go, ``resolveInputs``)."""
    spec, _ = load(name)
    problems = input_type_mismatches(spec)
    assert not problems, "\n".join(problems)


def test_the_type_check_sees_a_loop_item_typed_string():
    """The defect the check guards (issue 11, 1.): the fold loop's item compiled as STRING."""
    spec, _ = load("training")
    broken = copy.deepcopy(spec)
    (loop,) = (c for c in broken["components"].values() if "train-fold" in c.get("dag", {}).get("tasks", {}))
    item = next(k for k in loop["inputDefinitions"]["parameters"] if k.endswith("-loop-item"))
    loop["inputDefinitions"]["parameters"][item]["parameterType"] = "STRING"
    loop_name = next(n for n, c in broken["components"].items() if c is loop)
    assert input_type_mismatches(broken) == [
        f"{loop_name} / task train-fold (comp-train-fold): "
        f"parameter 'fold' is declared NUMBER_INTEGER but fed the DAG's input {item!r} (STRING)"
    ]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda s: s["components"]["comp-split-patients"]["outputDefinitions"]["parameters"][
                "Output"
            ].update(parameterType="STRUCT"),
            "parameter 'pipelinechannel--split-patients-Output' is declared LIST but fed output 'Output' of "
            "task split-patients (STRUCT)",
        ),
        (
            lambda s: s["components"]["comp-merge"]["inputDefinitions"]["artifacts"]["extracted"].pop(
                "isArtifactList"
            ),
            "artifact 'extracted' is declared system.Dataset but fed output "
            "'pipelinechannel--extract-extracted' of task for-loop-1 (list of system.Dataset)",
        ),
        (
            lambda s: s["root"]["dag"]["tasks"]["ingest"]["inputs"]["parameters"].update(
                slides_per_batch={"runtimeValue": {"constant": "8"}}
            ),
            "parameter 'slides_per_batch' is declared NUMBER_INTEGER but fed the constant '8'",
        ),
        (
            lambda s: s["root"]["dag"]["tasks"]["ingest"]["inputs"]["parameters"].pop("source"),
            "required input 'source' is not fed",
        ),
    ],
)
def test_the_type_check_names_each_kind_of_disagreement(mutate, expected):
    spec, _ = load("training")
    broken = copy.deepcopy(spec)
    mutate(broken)
    problems = input_type_mismatches(broken)
    assert len(problems) == 1 and problems[0].endswith(expected), problems


def artifact_producers(spec: dict) -> dict[str, set[str]]:
    """Component task path -> the executor tasks whose artifacts it reads, through loop inputs."""
    comps = spec["components"]
    out: dict[str, set[str]] = {}

    def walk(dag: dict, outer: dict[str, set[str]], path: str) -> None:
        tasks = dag["dag"]["tasks"]
        for name, task in tasks.items():
            sources: dict[str, set[str]] = {}
            for key, src in task.get("inputs", {}).get("artifacts", {}).items():
                if "componentInputArtifact" in src:
                    sources[key] = outer[src["componentInputArtifact"]]
                else:
                    producer = src["taskOutputArtifact"]["producerTask"]
                    sources[key] = leaves(tasks, producer, f"{path}{producer}")
            comp = comps[task["componentRef"]["name"]]
            if "dag" in comp:
                walk(comp, sources, f"{path}{name}/")
            else:
                out[f"{path}{name}"] = set().union(*sources.values())

    def leaves(tasks: dict, name: str, path: str) -> set[str]:
        comp = comps[tasks[name]["componentRef"]["name"]]
        if "dag" not in comp:
            return {path}
        inner = comp["dag"]["tasks"]
        return set().union(*(leaves(inner, t, f"{path}/{t}") for t in inner))

    walk(spec["root"], {}, "")
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_no_cached_task_reads_an_artifact_of_an_uncached_one(name):
    """Such a task would never hit the cache (backend/src/v2/cacheutils/cache.go, ``GenerateCacheKey``:
    ``InputArtifactNames``): the listing is a parameter so that ingest and what follows can hit."""
    spec, _ = load(name)
    caching: dict[str, bool] = {}

    def collect(dag: dict, path: str) -> None:
        for task_name, task in dag["dag"]["tasks"].items():
            comp = spec["components"][task["componentRef"]["name"]]
            if "dag" in comp:
                collect(comp, f"{path}{task_name}/")
            else:
                caching[f"{path}{task_name}"] = task.get("cachingOptions", {}).get("enableCache", False)

    collect(spec["root"], "")
    never = [
        f"{task} reads artifacts of uncached {sorted(p for p in producers if not caching[p])}"
        for task, producers in artifact_producers(spec).items()
        if caching[task] and not all(caching[p] for p in producers)
    ]
    assert not never, "\n".join(never)
    assert any(caching.values())


@pytest.mark.parametrize("name", PIPELINES)
def test_platform_config_parses_with_the_minimum_backends_schema(name):
    """Every task's Kubernetes config parses, unknown fields rejected, with the
    ``KubernetesExecutorConfig`` of kfp-kubernetes MIN_KFP_BACKEND (the argocompiler's strict
    ``protojson.Unmarshal`` in backend/src/v2/compiler/argocompiler/container.go)."""
    config = executor_config_class(SCHEMA)
    _, platform = load(name)
    errors = []
    for executor, conf in platform.items():
        try:
            json_format.ParseDict(conf, config(), ignore_unknown_fields=False)
        except json_format.ParseError as err:
            errors.append(f"{executor}: {err}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_refuses_a_field_the_minimum_release_lacks():
    config = executor_config_class(SCHEMA)
    with pytest.raises(json_format.ParseError, match="notAField"):
        json_format.ParseDict({"securityContext": {"notAField": 1}}, config(), ignore_unknown_fields=False)


def test_minimum_backend_release_is_the_vendored_schema_and_stated_in_the_readmes():
    header = SCHEMA.read_text().split("# -*- coding", 1)[0]
    assert f"kfp_kubernetes-{MIN_KFP_BACKEND}-py3-none-any.whl" in header
    assert f"kubeflow/pipelines@{MIN_KFP_BACKEND}:" in header
    short = MIN_KFP_BACKEND.removesuffix(".0")
    for readme in ("README.md", "manifests/README.md"):
        stated = set(re.findall(r"KFP backend ≥ ([0-9.]+)", (ROOT / readme).read_text()))
        assert stated == {short}, f"{readme} states the minimum KFP backend as {stated}, not {short}"


def test_an_f_string_channel_is_accepted_only_where_a_constant_pastes_it():
    """The compiler feeds an f-string's channels as extra ``pipelinechannel--…`` task inputs that the
    component does not declare, and writes ``{{$.inputs.parameters['pipelinechannel--x']}}`` into the
    constant: the driver resolves every task input but type-checks only the declared ones
    (backend/src/v2/driver/resolve.go, ``resolveInputs``), so that is sound; an undeclared input that
    no constant uses is not."""
    spec, _ = load("training")
    params = spec["root"]["dag"]["tasks"]["start-tracking"]["inputs"]["parameters"]
    channels = [n for n in params if n.startswith("pipelinechannel--")]
    assert channels and input_type_mismatches(spec) == []  # the parent run's parameter text
    broken = copy.deepcopy(spec)
    broken_params = broken["root"]["dag"]["tasks"]["start-tracking"]["inputs"]["parameters"]
    broken_params["params"]["runtimeValue"]["constant"] = "no placeholder"
    problems = input_type_mismatches(broken)
    assert len(problems) == len(channels) and all("is declared undeclared" in p for p in problems)
