"""Shared fixtures. GPU tests skip here, in one place."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: tiny CPU models run faster so and do not stall on a
    busy 2-core machine (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic DigiLut dataset (3 patients, 6 slides) made once per test session."""
    from digilut.synth import synth_dataset
    from digilut.synth_plan import SynthConfig

    out = tmp_path_factory.mktemp("tiny_data")
    synth_dataset(out, SynthConfig(patients=3, seed=1, size="tiny", positive_fraction=0.7))
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tiny_data, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_data`` extracted and labelled at stride 256 (in process)."""
    from digilut.extract import ExtractConfig
    from digilut.steps.prepare import prepare_step

    out = tmp_path_factory.mktemp("tiny_prepared")
    report = prepare_step(tiny_data, out, ExtractConfig(), workers=0)
    return out, report
