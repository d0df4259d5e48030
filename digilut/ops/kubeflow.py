"""Compile the pipelines to KFP IR YAML and submit runs to a Kubeflow Pipelines backend.

``compile_pipelines`` writes ``pipelines/compiled/<name>.yaml`` (committed; a test fails when they
are stale). ``submit_run`` uses ``kfp.Client``: uploads the compiled pipeline as a new version,
creates a run (or replaces the pipeline's recurring run) in an experiment, and returns the run's URL.
Host, namespace and token come from arguments or the environment (``KFP_HOST``, ``KFP_NAMESPACE``,
``KFP_TOKEN``); the image tag the YAML must name from ``DIGILUT_TAG`` (the Makefile's ``TAG``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digilut import k8s
from digilut.errors import ConfigError

log = logging.getLogger(__name__)
COMPILED_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "compiled"
# The oldest KFP backend release that accepts the compiled pipelines: its Argo compiler parses each
# task's Kubernetes platform config strictly, and `optional` in secretAsEnv/configMapAsEnv (2.15) and
# `securityContext` (2.16, honoured by its driver) are fields older releases reject.
MIN_KFP_BACKEND = "2.16.0"


def pipeline_functions() -> dict[str, Any]:
    """The pipelines by name (imported here: compiling reads the image tag from the environment)."""
    from pipelines.inference import inference
    from pipelines.training import training

    return {"training": training, "inference": inference}


def compile_pipelines(out_dir: str | Path = COMPILED_DIR) -> list[Path]:
    """Compile every pipeline to ``out_dir/<name>.yaml``; return the paths.

    A pipeline whose task inputs disagree in type with what feeds them is refused
    (:func:`input_type_mismatches`): the backend would fail it at run time.
    """
    import yaml
    from kfp import compiler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fn in pipeline_functions().items():
        path = out / f"{name}.yaml"
        compiler.Compiler().compile(fn, str(path))
        problems = input_type_mismatches(next(yaml.safe_load_all(path.read_text())))
        if problems:
            path.unlink()
            raise ConfigError(
                f"{name} pipeline: the KFP backend would refuse it:\n  " + "\n  ".join(problems)
            )
        paths.append(path)
        log.info("compiled %s -> %s", name, path)
    return paths


# Python type of a constant -> the IR parameter types it may feed.
_CONSTANT_TYPES = {
    bool: {"BOOLEAN"},
    int: {"NUMBER_INTEGER", "NUMBER_DOUBLE"},
    float: {"NUMBER_DOUBLE"},
    str: {"STRING"},
    list: {"LIST"},
    dict: {"STRUCT"},
}


def _artifact_type(definition: dict[str, Any] | None) -> str:
    if definition is None:
        return "nothing"
    kind = definition["artifactType"]["schemaTitle"]
    return f"list of {kind}" if definition.get("isArtifactList") else kind


def _parameter_source(src: dict[str, Any], own: dict[str, Any], outputs_of: Any) -> tuple[set[str], str]:
    """The IR types a task's parameter source may have, and where it comes from (for the message)."""
    if "componentInputParameter" in src:
        key = src["componentInputParameter"]
        got = own.get("parameters", {}).get(key, {}).get("parameterType", "nothing")
        return {got}, f"the DAG's input {key!r} ({got})"
    if "taskOutputParameter" in src:
        key, producer = (
            src["taskOutputParameter"]["outputParameterKey"],
            src["taskOutputParameter"]["producerTask"],
        )
        got = outputs_of(producer).get("parameters", {}).get(key, {}).get("parameterType", "nothing")
        return {got}, f"output {key!r} of task {producer} ({got})"
    if "runtimeValue" in src:
        value = src["runtimeValue"]["constant"]
        return _CONSTANT_TYPES.get(type(value), set()), f"the constant {value!r}"
    if "taskFinalStatus" in src:
        return {"TASK_FINAL_STATUS"}, "a task's final status"
    return set(), f"an unknown source {sorted(src)}"


def _artifact_source(src: dict[str, Any], own: dict[str, Any], outputs_of: Any) -> tuple[str, str]:
    if "componentInputArtifact" in src:
        key = src["componentInputArtifact"]
        got = _artifact_type(own.get("artifacts", {}).get(key))
        return got, f"the DAG's input {key!r} ({got})"
    key, producer = src["taskOutputArtifact"]["outputArtifactKey"], src["taskOutputArtifact"]["producerTask"]
    got = _artifact_type(outputs_of(producer).get("artifacts", {}).get(key))
    return got, f"output {key!r} of task {producer} ({got})"


def _task_problems(
    task: dict[str, Any], declared: dict[str, Any], own: dict[str, Any], outputs_of: Any
) -> list[str]:
    problems, fed = [], set()
    params = task.get("inputs", {}).get("parameters", {})
    constants = [
        str(src["runtimeValue"].get("constant", "")) for src in params.values() if "runtimeValue" in src
    ]
    for name, src in params.items():
        fed.add(name)
        if name not in declared.get("parameters", {}) and any(
            f"{{{{$.inputs.parameters['{name}']}}}}" in c for c in constants
        ):
            # an f-string's channel: the driver resolves every task input and types only the declared
            # ones; the value is pasted into the constant's text (resolve.go, resolveInputs)
            continue
        want = declared.get("parameters", {}).get(name, {}).get("parameterType", "undeclared")
        allowed, origin = _parameter_source(src, own, outputs_of)
        if want not in allowed:
            problems.append(f"parameter {name!r} is declared {want} but fed {origin}")
    for name, src in task.get("inputs", {}).get("artifacts", {}).items():
        fed.add(name)
        want = _artifact_type(declared.get("artifacts", {}).get(name))
        got, origin = _artifact_source(src, own, outputs_of)
        if got != want:
            problems.append(f"artifact {name!r} is declared {want} but fed {origin}")
    if iterator := task.get("parameterIterator"):
        fed.add(iterator["itemInput"])
        items = iterator["items"]["inputParameter"]
        got = declared.get("parameters", {}).get(items, {}).get("parameterType")
        if got != "LIST":
            problems.append(f"loop items {items!r} are declared {got}, not LIST")
    for name, d in {**declared.get("parameters", {}), **declared.get("artifacts", {})}.items():
        if name not in fed and not d.get("isOptional") and "defaultValue" not in d:
            problems.append(f"required input {name!r} is not fed")
    return problems


def input_type_mismatches(spec: dict[str, Any]) -> list[str]:
    """Where a compiled pipeline (KFP IR: the YAML's first document) feeds a task a value of another type.

    Every DAG (the root and each loop) is walked: each task input's declared type (its component's
    ``inputDefinitions``) must equal the type of what feeds it (an input of the enclosing DAG: a pipeline
    parameter or a loop item; an upstream task's output; a constant), every required input must be fed,
    and each DAG output must have its producer's type. The backend's driver resolves a value and then
    checks it against the declared type (backend/src/v2/driver/resolve.go, ``resolveInputs``: "input
    parameter %q type mismatch"); a loop item declared STRING is first turned into a JSON string, so a
    LIST or NUMBER_INTEGER consumer of it fails. ``kfp.local`` passes Python objects through and never
    notices. Returns one message per problem; empty when the pipeline is sound.
    """
    comps = spec["components"]
    problems: list[str] = []
    for dag_name, dag in [("root", spec["root"]), *((n, c) for n, c in comps.items() if "dag" in c)]:
        tasks = dag["dag"]["tasks"]

        def outputs_of(task: str, tasks: dict[str, Any] = tasks) -> dict[str, Any]:
            return comps[tasks[task]["componentRef"]["name"]].get("outputDefinitions", {})

        for task_name, task in tasks.items():
            ref = task["componentRef"]["name"]
            declared = comps[ref].get("inputDefinitions", {})
            for p in _task_problems(task, declared, dag.get("inputDefinitions", {}), outputs_of):
                problems.append(f"{dag_name} / task {task_name} ({ref}): {p}")
        outputs = dag.get("outputDefinitions", {}).get("artifacts", {})
        for name, sel in dag["dag"].get("outputs", {}).get("artifacts", {}).items():
            # a loop's output is the list of its iterations' artifacts: compare the kinds
            want = _artifact_type(outputs.get(name))
            for s in sel["artifactSelectors"]:
                got = _artifact_type(
                    outputs_of(s["producerSubtask"]).get("artifacts", {}).get(s["outputArtifactKey"])
                )
                if got.removeprefix("list of ") != want.removeprefix("list of "):
                    problems.append(
                        f"{dag_name}: output {name!r} is {want} but {s['producerSubtask']} gives {got}"
                    )
    return problems


@dataclass(frozen=True)
class SubmitConfig:
    host: str
    namespace: str = k8s.DEFAULT_NAMESPACE
    token: str | None = None
    experiment: str = "digilut"
    pipeline: str = "training"
    service_account: str = k8s.PIPELINE_SERVICE_ACCOUNT
    cron: str | None = None  # a recurring run on this 6-field cron schedule (KFP/robfig format)
    tag: str | None = None  # tag the compiled YAML must name (None: container_images.image_tag())

    def __post_init__(self) -> None:
        if not self.host.startswith(("http://", "https://")):
            raise ConfigError(
                f"host={self.host!r}: give the KFP API URL, e.g. https://kubeflow.example.org/pipeline"
            )
        if self.pipeline not in ("training", "inference"):
            raise ConfigError(f"pipeline={self.pipeline!r}: choose training or inference")

    @classmethod
    def from_env(cls, **overrides: Any) -> SubmitConfig:
        values = {
            "host": os.environ.get("KFP_HOST", ""),
            "namespace": os.environ.get("KFP_NAMESPACE", k8s.DEFAULT_NAMESPACE),
            "token": os.environ.get("KFP_TOKEN") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def compiled_images(package: str | Path) -> set[str]:
    """The container images a compiled pipeline (KFP YAML) runs."""
    import yaml

    spec = next(yaml.safe_load_all(Path(package).read_text()))
    return {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}


def check_compiled_for(package: str | Path, tag: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``package`` runs only ``REGISTRY/digilut-{base,train}:tag``,
    the images ``make images push TAG=tag`` built and pushed."""
    from digilut.container_images import IMAGE_KINDS, image

    want = {image(kind, tag=tag) for kind in IMAGE_KINDS}  # type: ignore[arg-type]
    got = compiled_images(package)
    if not got or not got <= want:
        wanted_tag = next(iter(want)).rsplit(":", 1)[1]
        found = sorted({ref.rsplit(":", 1)[-1] for ref in got})
        raise ConfigError(
            f"{package} was compiled for {', '.join(sorted(got))}, not for tag {wanted_tag!r} "
            f"({', '.join(sorted(want))}): run `make compile TAG={wanted_tag}` (after `make images push "
            f"TAG={wanted_tag}`), or submit with TAG={found[0] if found else '<tag>'}"
        )


def _recurring_runs_named(client: Any, experiment_id: str, name: str) -> list[str]:
    """Ids of the experiment's recurring runs whose display name is ``name`` (every page)."""
    ids, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id)
        ids += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return ids


def submit_run(cfg: SubmitConfig, params: dict[str, Any], *, package: str | Path | None = None) -> str:
    """Upload the compiled pipeline as a new version and start a run; return its URL.

    The YAML must name the images of ``cfg.tag`` (:func:`check_compiled_for`). With ``cfg.cron`` the
    pipeline's recurring run ``digilut-<pipeline>`` is created with catch-up off (``no_catchup``: a
    paused or late schedule starts one run, not one per missed slot) and any earlier recurring run of
    that name in the experiment is deleted after, so a schedule is replaced, never doubled.
    """
    import kfp

    package = Path(package or COMPILED_DIR / f"{cfg.pipeline}.yaml")
    if not package.is_file():
        raise FileNotFoundError(f"{package}: not compiled; run `make compile` first")
    check_compiled_for(package, cfg.tag)
    client = kfp.Client(host=cfg.host, namespace=cfg.namespace, existing_token=cfg.token)
    name = f"digilut-{cfg.pipeline}"
    version = time.strftime("v%Y%m%d-%H%M%S")
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=name).pipeline_id
    version_id = client.upload_pipeline_version(
        str(package), pipeline_version_name=version, pipeline_id=pipeline_id
    ).pipeline_version_id
    experiment = client.create_experiment(cfg.experiment, namespace=cfg.namespace)
    if cfg.cron:
        earlier = _recurring_runs_named(client, experiment.experiment_id, name)
        run = client.create_recurring_run(
            experiment.experiment_id,
            name,
            cron_expression=cfg.cron,
            no_catchup=True,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=cfg.service_account,
        )
        for old in earlier:
            client.delete_recurring_run(old)
            log.info("replaced recurring run %s (%s) by %s", old, name, run.recurring_run_id)
        url = f"{cfg.host.rstrip('/')}/#/recurringrun/details/{run.recurring_run_id}"
        job = name
    else:
        job = f"{name}-{version}"
        run = client.run_pipeline(
            experiment.experiment_id,
            job,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=cfg.service_account,
        )
        url = f"{cfg.host.rstrip('/')}/#/runs/details/{run.run_id}"
    log.info("submitted %s (%s) -> %s", job, package.name, url)
    return url
