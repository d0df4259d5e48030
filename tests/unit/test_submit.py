"""``digilut submit``: the image tag check and recurring runs, against a fake ``kfp.Client``.

No KFP API server can run here; the fake records the calls ``submit_run`` makes and keeps recurring
runs like the server does (the real ``kfp_server_api`` models are returned), so the tests see what a
second ``--cron`` submission leaves behind.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import kfp
import pytest
from kfp_server_api.models import V2beta1ListRecurringRunsResponse, V2beta1RecurringRun

from digilut.errors import ConfigError
from digilut.ops.kubeflow import COMPILED_DIR, SubmitConfig, compiled_images, submit_run

COMMITTED_TAG = next(iter(compiled_images(COMPILED_DIR / "training.yaml"))).rsplit(":", 1)[1]


class FakeClient:
    """The ``kfp.Client`` methods ``submit_run`` uses; recurring runs are kept per experiment."""

    calls: ClassVar[list[tuple[str, tuple, dict]]] = []
    recurring: ClassVar[dict[str, V2beta1RecurringRun]] = {}
    ids = itertools.count(1)

    def __init__(self, **kwargs):
        self.calls.append(("Client", (), kwargs))

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return SimpleNamespace(
                pipeline_id="p1", pipeline_version_id=f"v{next(self.ids)}", experiment_id="e1", run_id="r1"
            )

        return record

    def get_pipeline_id(self, name):
        return "p1"

    def create_recurring_run(self, experiment_id, job_name, **kwargs):
        self.calls.append(("create_recurring_run", (experiment_id, job_name), kwargs))
        run = V2beta1RecurringRun(
            recurring_run_id=f"rr{next(self.ids)}",
            display_name=job_name,
            experiment_id=experiment_id,
            no_catchup=kwargs.get("no_catchup"),
        )
        self.recurring[run.recurring_run_id] = run
        return run

    def list_recurring_runs(self, page_token="", page_size=10, experiment_id=None, **kwargs):
        runs = [r for r in self.recurring.values() if r.experiment_id == experiment_id]
        start = int(page_token or 0)
        more = start + page_size < len(runs)
        return V2beta1ListRecurringRunsResponse(
            recurring_runs=runs[start : start + page_size],
            total_size=len(runs),
            next_page_token=str(start + page_size) if more else None,
        )

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete_recurring_run", (recurring_run_id,), {}))
        del self.recurring[recurring_run_id]
        return {}


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.calls, FakeClient.recurring = [], {}
    monkeypatch.setattr(kfp, "Client", FakeClient)
    return FakeClient


def cfg(**kw) -> SubmitConfig:
    return SubmitConfig(**{"host": "https://kfp.example.org/pipeline", "tag": COMMITTED_TAG, **kw})


def test_a_second_cron_submission_replaces_the_recurring_run_with_catchup_off(client):
    other = client().create_recurring_run("e1", "someone-elses-schedule")
    for n in range(101):  # more than one page of the listing
        client.recurring[f"x{n}"] = V2beta1RecurringRun(
            recurring_run_id=f"x{n}", display_name="x", experiment_id="e1"
        )
    first = submit_run(cfg(cron="0 0 2 * * *"), {"data_uri": "s3://b/d"})
    second = submit_run(cfg(cron="0 0 3 * * *"), {"data_uri": "s3://b/d"})
    ours = [r for r in client.recurring.values() if r.display_name == "digilut-training"]
    assert len(ours) == 1 and second.endswith(f"/#/recurringrun/details/{ours[0].recurring_run_id}")
    assert first != second and other.recurring_run_id in client.recurring  # another name: kept
    creates = [
        kw for name, _, kw in client.calls if name == "create_recurring_run" and "cron_expression" in kw
    ]
    assert [kw["cron_expression"] for kw in creates] == ["0 0 2 * * *", "0 0 3 * * *"]
    assert all(kw["no_catchup"] is True for kw in creates)
    assert [a for name, a, _ in client.calls if name == "delete_recurring_run"] == [
        (first.rsplit("/", 1)[1],)
    ]


def test_a_one_off_run_leaves_recurring_runs_alone(client):
    submit_run(cfg(cron="0 0 2 * * *"), {"data_uri": "s3://b/d"})
    url = submit_run(cfg(), {"data_uri": "s3://b/d"})
    assert url.endswith("/#/runs/details/r1")
    assert len(client.recurring) == 1
    assert not [c for c in client.calls if c[0] == "delete_recurring_run"]


def test_submit_refuses_yaml_compiled_for_another_tag_before_contacting_kfp(client):
    with pytest.raises(ConfigError, match=rf"make compile TAG=0123456789ab.*submit with TAG={COMMITTED_TAG}"):
        submit_run(cfg(tag="0123456789ab"), {"data_uri": "s3://b/d"})
    assert client.calls == []


def test_submit_takes_the_tag_from_digilut_tag_as_make_exports_it(client, monkeypatch):
    monkeypatch.setenv("DIGILUT_TAG", "0123456789ab")
    with pytest.raises(ConfigError, match="not for tag '0123456789ab'"):
        submit_run(SubmitConfig(host="https://kfp.example.org/pipeline"), {})
    monkeypatch.setenv("DIGILUT_TAG", COMMITTED_TAG)
    submit_run(SubmitConfig(host="https://kfp.example.org/pipeline"), {"data_uri": "s3://b/d"})
    assert [c[0] for c in client.calls][-1] == "run_pipeline"


def test_make_submit_passes_the_same_tag_as_make_compile():
    import subprocess

    out = subprocess.run(
        ["make", "-n", "submit", "DATA_URI=s3://b/d", "TAG=0123456789ab"],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'digilut submit "s3://b/d" --tag "0123456789ab"' in out
