"""Run profiles: named parameter sets of the training pipeline for ``digilut run --profile``.

``full`` is the pipeline's own defaults (a GPU cluster). ``demo`` fits the whole pipeline in a few
minutes on 2 CPU cores (the synthetic ``demo`` slides: small input, few epochs, two folds), and
``tiny`` is the test suite's.
"""

from __future__ import annotations

from typing import Any

from digilut.errors import ConfigError

PROFILES: dict[str, dict[str, Any]] = {
    "full": {},
    "demo": {
        "slides_per_batch": 4,
        "folds": 2,
        "test_fraction": 0.3,
        "input_px": 64,
        "epochs": 3,
        "train_batch_size": 32,
        "lr": 1e-3,
        "patches_per_epoch": 960,
        "max_val_patches": 1000,
        "cpu_threads": 1,  # the two folds train side by side, one core each
        "predict_batch_size": 128,
    },
    "tiny": {
        "slides_per_batch": 2,
        "folds": 2,
        "test_fraction": 0.34,
        "input_px": 64,
        "epochs": 1,
        "train_batch_size": 16,
        "predict_batch_size": 64,
        "stride_px": 256,
        "cpu_threads": 1,
    },
}


def profile_params(name: str, **overrides: Any) -> dict[str, Any]:
    """The pipeline arguments of profile ``name`` with ``overrides`` (None values ignored)."""
    if name not in PROFILES:
        raise ConfigError(f"profile={name!r}: choose one of {', '.join(PROFILES)}")
    return {**PROFILES[name], **{k: v for k, v in overrides.items() if v is not None}}
