"""Shared fixtures. GPU tests skip here, in one place."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic DigiLut dataset (3 patients, 6 slides) made once per test session."""
    from digilut.synth import SynthConfig, synth_dataset

    out = tmp_path_factory.mktemp("tiny_data")
    synth_dataset(out, SynthConfig(patients=3, seed=1, size="tiny", positive_fraction=0.7))
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tiny_data, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_data`` extracted and labelled at stride 256 (in process)."""
    from digilut.extract import ExtractConfig, prepare_dataset

    out = tmp_path_factory.mktemp("tiny_prepared")
    report = prepare_dataset(tiny_data, out, ExtractConfig(), workers=0)
    return out, report
