"""The CLI's options are the config dataclasses' fields (one generator, digilut.commands.options),
and ``digilut prepare`` / ``digilut split`` run the pipeline's steps on local folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from digilut.boxes import BoxesConfig
from digilut.cli import app
from digilut.commands.options import config_options
from digilut.extract import ExtractConfig
from digilut.labels import LabelConfig
from digilut.manifest import read_manifest
from digilut.predict import PredictConfig
from digilut.split import SplitConfig
from digilut.train_config import TrainConfig

COMMAND_CONFIGS = {
    "prepare": [(ExtractConfig, ""), (LabelConfig, "label_")],
    "split": [(SplitConfig, "")],
    "train": [(TrainConfig, "")],
    "train-folds": [(TrainConfig, "")],
    "predict": [(PredictConfig, "")],
    "boxes": [(BoxesConfig, "")],
}


@pytest.mark.parametrize("name", sorted(COMMAND_CONFIGS))
def test_cli_options_are_the_config_fields(name: str) -> None:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    params = {p.name: p for p in command.params}
    for cls, prefix in COMMAND_CONFIGS[name]:
        for f in dataclasses.fields(cls):
            assert params[prefix + f.name].default == f.default, (name, f.name)


def test_an_option_that_is_also_a_config_field_is_refused() -> None:
    def command(seed: int = 0, **options: object) -> None: ...

    with pytest.raises(TypeError, match="--seed is both a parameter and a config field"):
        config_options(SplitConfig)(command)


def test_help_for_an_option_no_config_has_is_refused() -> None:
    def command(**options: object) -> None: ...

    with pytest.raises(TypeError, match="help for batch_size, which no config has"):
        config_options(PredictConfig, help={"batch_size": "renamed to predict_batch_size"})(command)


def test_prepare_and_split_on_folders(tiny_data: Path, tiny_prepared, tmp_path: Path) -> None:
    runner = CliRunner()
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "images").mkdir(parents=True)
    for slide in sorted((tiny_data / "images").iterdir())[:2]:  # one patient's two slides
        (data / "images" / slide.name).symlink_to(slide)
    (data / "train.csv").write_text((tiny_data / "train.csv").read_text())  # other slides' rows dropped
    args = ["prepare", str(data), str(out), "--workers", "0", "--label-min-overlap", "0.2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2/2 slides ok, 0 failed" in result.output
    m = read_manifest(out, require=("label",))
    assert len(list(out.glob("*.shard"))) == 2 and m["label"].sum() > 0
    assert json.loads((out / "report.json").read_text())["config"]["stride_px"] == 256
    again = runner.invoke(app, args)  # a re-run reuses every slide
    assert again.exit_code == 0 and read_manifest(out).equals(m)
    labelled = tiny_prepared[0] / "manifest.parquet"  # 3 patients
    split_args = ["split", str(labelled), str(out / "split.parquet"), "--test-fraction", "0", "--folds", "2"]
    result = runner.invoke(app, split_args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {"train/0": 2, "train/1": 1}
    assert json.loads((out / "split.json").read_text())["config"]["folds"] == 2
    assert set(read_manifest(out / "split.parquet")["fold"]) == {0, 1}
    result = runner.invoke(app, ["prepare", str(tmp_path / "nowhere"), str(out)])
    assert result.exit_code == 2 and "no images folder" in result.output
