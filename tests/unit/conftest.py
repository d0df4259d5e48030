"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local sqlite MLflow tracking store with experiment ``digilut`` (created once per module:
    MLflow's schema migration takes seconds)."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("digilut", artifact_location=str(tmp / "artifacts"))
    return uri
