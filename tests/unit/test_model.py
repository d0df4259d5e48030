"""Patch classifier construction, backbone initialisation (none, ImageNet, state dicts) and model files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torchvision

from digilut.errors import ConfigError
from digilut.files import file_sha256
from digilut.model import (
    ModelFileError,
    ModelSpec,
    build_model,
    load_model,
    save_model,
    select_device,
)
from digilut.weights import cached_imagenet_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny CPU models: one thread is faster


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_classifier_gives_one_logit_per_patch() -> None:
    for hidden in (0, 32):
        model = build_model(ModelSpec("resnet18", hidden_units=hidden, input_px=64), "none").eval()
        assert model(torch.zeros(3, 3, 64, 64)).shape == (3,)


def test_auto_weights_fall_back_to_random_init_with_a_warning(
    empty_torch_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert cached_imagenet_weights("resnet18") is None
    with caplog.at_level(logging.WARNING, logger="digilut.weights"):
        model = build_model(ModelSpec(), "auto")
    assert "RANDOM INITIALISATION" in caplog.text and str(empty_torch_home) in caplog.text
    assert model.init.label == "random" and model.init.words.startswith("random initialisation")


def test_imagenet_weights_are_downloaded_and_offline_fail_with_a_clear_error(
    empty_torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the real download path, through a proxy that refuses connections: what an offline pod sees
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(ConfigError, match=r"downloading them failed .*BAKE_IMAGENET_WEIGHTS"):
        build_model(ModelSpec(), "imagenet")


def test_cached_torchvision_file_is_used_without_download(empty_torch_home: Path) -> None:
    reference = torchvision.models.resnet18()
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    empty_torch_home.mkdir(parents=True)
    torch.save(reference.state_dict(), empty_torch_home / name)
    assert cached_imagenet_weights("resnet18") == empty_torch_home / name
    for weights in ("auto", "imagenet"):  # the baked file is found in $TORCH_HOME and recorded so
        model = build_model(ModelSpec(), weights)
        torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight)
        assert model.init.kind == "imagenet" and model.init.source == str(empty_torch_home / name)
        assert model.init.label == "imagenet" and "ImageNet" in model.init.words


def test_local_weights_file_must_fit_the_architecture(tmp_path: Path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    model = build_model(ModelSpec("resnet34", input_px=64), str(path))
    assert model.spec.arch == "resnet34"
    assert model.init.label == f"file:{file_sha256(path)[:12]}" and not model.init.unexpected
    with pytest.raises(ConfigError, match=r"layer1\.2\.conv1\.weight has no place in a resnet18"):
        build_model(ModelSpec("resnet18"), str(path))
    with pytest.raises(ConfigError, match=r"conv1\.weight has shape .*expects"):
        build_model(ModelSpec("resnet50"), str(path))
    with pytest.raises(ConfigError, match="nor an existing file"):
        build_model(ModelSpec(), str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(
    ("prefix", "wrap"),
    [("", None), ("module.", "state_dict"), ("backbone.", "model"), ("module.encoder_q.", "state_dict")],
)
def test_prefixed_self_supervised_checkpoints_load_into_the_backbone(
    tmp_path: Path, prefix: str, wrap: str | None
) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    if prefix == "module.encoder_q.":  # MoCo: a key encoder and a projection head beside the query
        state |= {"module.encoder_k." + k: torch.zeros_like(v) for k, v in reference.state_dict().items()}
        state["module.encoder_q.fc.0.weight"] = torch.zeros(128, 512)
    extra = {"projector.0.weight": torch.zeros(8, 512)}
    path = tmp_path / "ssl.ckpt"
    torch.save({wrap: state | extra, "epoch": 3} if wrap else state | extra, path)
    model = build_model(ModelSpec(input_px=64), str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.init.prefix == prefix and model.init.missing == ()
    assert "projector.0.weight" in model.init.unexpected


def test_partial_checkpoint_reports_missing_keys_and_foreign_ones_are_refused(tmp_path: Path) -> None:
    full = torchvision.models.resnet18().state_dict()
    state = {k: v for k, v in full.items() if not k.startswith("layer4")}
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    init = build_model(ModelSpec(input_px=64), str(path)).init
    assert "layer4.1.conv2.weight" in init.missing and "missing" in init.words
    assert init.tracking_params()["init_missing_keys"] == len(init.missing) > 0
    vit = {"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "cls_token": torch.zeros(1, 1, 8)}
    torch.save(vit, path)
    with pytest.raises(ConfigError, match="none of its 2 keys fits the backbone"):
        build_model(ModelSpec(input_px=64), str(path))
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="safetensors"):
        build_model(ModelSpec(input_px=64), str(tmp_path / "w.safetensors"))


def test_model_file_roundtrip_predicts_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(hidden_units=16, input_px=64), "none").eval()
    path = save_model(tmp_path / "m.pt", model, {"fold": 2})
    loaded = load_model(path, torch.device("cpu"))
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), model(x))
    assert loaded.spec == model.spec and loaded.meta == {"fold": 2} and not loaded.model.training


def test_bad_model_files_raise_model_file_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "none.pt", torch.device("cpu"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"junk\.pt"):
        load_model(tmp_path / "junk.pt", torch.device("cpu"))
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match="not a digilut model"):
        load_model(tmp_path / "other.pt", torch.device("cpu"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "vgg16"}, "arch='vgg16'"),
        ({"dropout": 1.0}, "dropout"),
        ({"input_px": 16}, "input_px=16"),
        ({"hidden_units": -1}, "hidden_units"),
    ],
)
def test_model_spec_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="bogus"):
        select_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            select_device("cuda")
