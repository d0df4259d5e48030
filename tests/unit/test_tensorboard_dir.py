"""Where a fold's TensorBoard events go: <DIGILUT_TENSORBOARD_LOGDIR>/<run>/fold<k>."""

from __future__ import annotations

import pytest

from digilut.errors import ConfigError
from digilut.tracking import TrackingConfig


def test_logdir_and_tracking_uri_come_from_the_environment() -> None:
    env = {"DIGILUT_TENSORBOARD_LOGDIR": "s3://b/tensorboard/", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    cfg = TrackingConfig.from_env("exp", env)
    assert (cfg.tracking_uri, cfg.experiment, cfg.tensorboard_logdir) == (
        "http://mlflow:5000",
        "exp",
        "s3://b/tensorboard/",
    )
    assert TrackingConfig.from_env("exp", {}).tensorboard_logdir == ""


def test_run_name_is_explicit_else_the_mlflow_parent_run_else_a_fixed_name() -> None:
    cfg = TrackingConfig(tensorboard_logdir="s3://b/tensorboard/")
    assert cfg.tensorboard_dir(2, "abc123") == "s3://b/tensorboard/abc123/fold2"
    assert cfg.tensorboard_dir(0, None) == "s3://b/tensorboard/no-mlflow-run/fold0"
    named = TrackingConfig(tensorboard_logdir="/tmp/tb", tensorboard_run="run-7")
    assert named.tensorboard_dir(1, "abc123") == "/tmp/tb/run-7/fold1"
    assert TrackingConfig().tensorboard_dir(1, "abc123") == ""  # no logdir: events stay with the fold


def test_a_run_name_with_a_slash_is_refused() -> None:
    with pytest.raises(ConfigError, match="one path segment"):
        TrackingConfig(tensorboard_logdir="s3://b/tb", tensorboard_run="../x").tensorboard_dir(0, None)
