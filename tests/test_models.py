"""Tests for fedselect.models: builders, layer groups and weight loading (CPU, no network)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fedselect.models as models
from fedselect.models import (
    WeightsUnavailableError,
    available_models,
    body_param_names,
    build_model,
    head_param_names,
    layer_groups,
    load_weights,
    prefix_spec,
    register_layer_groups,
    register_model,
    resolve_groups,
)

RESNET_GROUPS = ["stem"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)] + ["head"]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 10)


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register models and groups without leaking them into other tests."""
    monkeypatch.setattr(models, "_MODELS", dict(models._MODELS))
    monkeypatch.setattr(models.groups, "_BY_CLASS", dict(models.groups._BY_CLASS))
    monkeypatch.setattr(models.groups, "_BY_ARCH", dict(models.groups._BY_ARCH))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty torch.hub cache, and any real download attempt fails the test."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args: object, **kwargs: object) -> None:
        pytest.fail("the test tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)


def test_available_models() -> None:
    assert available_models() == ["cnn", "efficientnet_lite0", "minilm", "resnet18", "resnet50"]


@pytest.mark.parametrize(("channels", "size", "flat"), [(3, 32, 64 * 5 * 5), (1, 28, 64 * 4 * 4)])
def test_cnn_forward_shape(channels: int, size: int, flat: int) -> None:
    model = build_model("cnn", 10, in_channels=channels, image_size=size)
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)
    assert model.fc1.in_features == flat


def test_cnn_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="image_size"):
        build_model("cnn", 10, image_size=8)


def test_resnet18_forward_shape(resnet: nn.Module) -> None:
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_is_torchvision_architecture(resnet: nn.Module) -> None:
    reference = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    ours = resnet.state_dict()
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in reference)


def test_resnet18_other_in_channels() -> None:
    model = build_model("resnet18", 5, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_rejects_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", bad)  # type: ignore[arg-type]


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match="available models: cnn, efficientnet_lite0, minilm, resnet18"):
        build_model("vgg11", 10)


def _check_partition(model: nn.Module) -> None:
    groups = layer_groups(model)
    named = dict(model.named_parameters())
    flat = [n for g in groups for n in g.param_names]
    assert sorted(flat) == sorted(named)
    assert len(flat) == len(set(flat))
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in model.parameters())
    for g in groups:
        assert g.num_params == sum(named[n].numel() for n in g.param_names)
    assert [g.role for g in groups].count("head") == 1
    assert groups[-1].role == "head"
    assert groups[0].role == "stem"
    assert set(head_param_names(model)) | set(body_param_names(model)) == set(named)
    assert not set(head_param_names(model)) & set(body_param_names(model))


def test_cnn_groups() -> None:
    model = build_model("cnn", 10)
    _check_partition(model)
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["conv1", "conv2", "fc1", "head"]
    assert [g.role for g in groups] == ["stem", "block", "block", "head"]
    assert head_param_names(model) == ("head.weight", "head.bias")


def test_resnet18_groups(resnet: nn.Module) -> None:
    _check_partition(resnet)
    groups = layer_groups(resnet)
    assert [g.name for g in groups] == RESNET_GROUPS
    assert groups[0].param_names == ("conv1.weight", "bn1.weight", "bn1.bias")
    assert head_param_names(resnet) == ("fc.weight", "fc.bias")


def test_layer_groups_unknown_model() -> None:
    with pytest.raises(ValueError, match="no layer groups registered for model type Linear"):
        layer_groups(nn.Linear(2, 2))


def test_prefix_spec_validates_coverage() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    groups = resolve_groups(model, prefix_spec({"first": ["0"], "head": "2"}))
    assert [g.param_names for g in groups] == [("0.weight", "0.bias"), ("2.weight", "2.bias")]
    with pytest.raises(ValueError, match=r"'2\.weight' belongs to no layer group"):
        resolve_groups(model, prefix_spec({"first": ["0"], "head": "1"}))
    with pytest.raises(ValueError, match=r"'0\.weight' belongs to several layer groups"):
        resolve_groups(model, prefix_spec({"first": ["0"], "again": ["0"], "head": "2"}))
    with pytest.raises(ValueError, match="exactly one head"):
        resolve_groups(model, prefix_spec({"first": "0", "head": "2"}, roles={"head": "block"}))


def test_prefix_does_not_match_sibling_names() -> None:
    # "layer1" must not capture "layer10.*": prefixes are matched on whole module names.
    model = nn.Module()
    model.layer1 = nn.Linear(1, 1)
    model.layer10 = nn.Linear(1, 1)
    groups = resolve_groups(model, prefix_spec({"a": "layer1", "head": "layer10"}))
    assert [g.param_names for g in groups] == [
        ("layer1.weight", "layer1.bias"),
        ("layer10.weight", "layer10.bias"),
    ]


@pytest.mark.usefixtures("isolated_registry")
def test_register_model_and_groups_by_arch_attribute() -> None:
    def build_mlp(num_classes: int, *, in_channels: int, image_size: int) -> nn.Module:
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * image_size**2, 8), nn.Linear(8, num_classes)
        )
        model.fedselect_arch = "mlp"
        return model

    register_layer_groups("mlp", prefix_spec({"hidden": "1", "out": "2"}))
    register_model("MLP", build_mlp)
    assert "mlp" in available_models()
    model = build_model("mlp", 3, in_channels=1, image_size=4)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert head_param_names(model) == ("2.weight", "2.bias")
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", build_mlp)
    register_model("mlp", build_mlp, replace=True)


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model("cnn", 10)
    torch.manual_seed(1)
    assert not torch.equal(build_model("cnn", 10).conv1.weight, source.conv1.weight)
    for i, payload in enumerate(
        [source.state_dict(), {"state_dict": source.state_dict()}, {"model": source.state_dict()}]
    ):
        loaded = build_model("cnn", 10, weights=str(_save(payload, tmp_path / f"w{i}.pt")))
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_none_is_random_init() -> None:
    torch.manual_seed(0)
    a = build_model("cnn", 10, weights="none")
    torch.manual_seed(0)
    b = build_model("cnn", 10, weights=None)
    assert torch.equal(a.fc1.weight, b.fc1.weight)


def test_resnet_weights_round_trip_with_batchnorm_buffers(tmp_path: Path, resnet: nn.Module) -> None:
    path = _save(resnet.state_dict(), tmp_path / "r.pt")
    loaded = build_model("resnet18", 10, weights=path)
    assert torch.equal(loaded.bn1.running_var, resnet.bn1.running_var)
    assert torch.equal(loaded.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)


def test_head_shape_mismatch_drops_head_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    source = build_model("cnn", 10)
    path = _save(source.state_dict(), tmp_path / "ten.pt")
    torch.manual_seed(1)
    fresh_head = build_model("cnn", 5).head.weight.detach().clone()
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING, logger="fedselect.models"):
        loaded = build_model("cnn", 5, weights=path)
    assert loaded.head.weight.shape == (5, 512)
    assert torch.equal(loaded.head.weight, fresh_head)
    for name in body_param_names(loaded):
        assert torch.equal(loaded.state_dict()[name], source.state_dict()[name]), name
    assert "dropping head tensors" in caplog.text
    assert "head.weight" in caplog.text


def test_unexpected_key_raises_naming_it(tmp_path: Path) -> None:
    state = build_model("cnn", 10).state_dict()
    state["bogus.weight"] = torch.zeros(1)
    path = _save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"'bogus\.weight'") as info:
        build_model("cnn", 10, weights=path)
    assert str(path) in str(info.value)
    model = build_model("cnn", 10)
    before = model.conv1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'bogus\.weight'"):
        load_weights(model, path)
    assert torch.equal(model.conv1.weight, before), "a rejected checkpoint must leave the model untouched"


def test_checkpoint_without_batchnorm_counters_loads(tmp_path: Path, resnet: nn.Module) -> None:
    state = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = build_model("resnet18", 10, weights=_save(state, tmp_path / "old.pt"))
    assert torch.equal(loaded.layer1[0].bn1.running_mean, resnet.layer1[0].bn1.running_mean)


def test_missing_key_raises_naming_it(tmp_path: Path) -> None:
    state = build_model("cnn", 10).state_dict()
    del state["conv2.bias"]
    path = _save(state, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"'conv2\.bias' missing from weights file .*short\.pt"):
        build_model("cnn", 10, weights=path)


def test_missing_head_key_is_not_excused(tmp_path: Path) -> None:
    state = build_model("cnn", 10).state_dict()
    del state["head.bias"]
    with pytest.raises(ValueError, match=r"'head\.bias' missing"):
        build_model("cnn", 10, weights=_save(state, tmp_path / "nohead.pt"))


def test_body_shape_mismatch_raises_naming_key(tmp_path: Path) -> None:
    path = _save(build_model("cnn", 10, in_channels=1).state_dict(), tmp_path / "gray.pt")
    with pytest.raises(
        ValueError, match=r"shape mismatch for key 'conv1\.weight' in weights file .*gray\.pt"
    ):
        build_model("cnn", 10, weights=path)


def test_not_a_checkpoint_raises(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file .*junk.pt"):
        build_model("cnn", 10, weights=path)
    with pytest.raises(TypeError, match="'conv1.weight'"):
        build_model("cnn", 10, weights=_save({"conv1.weight": 3}, tmp_path / "int.pt"))


def test_missing_file_raises_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "w.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_model("cnn", 10, weights=str(path))


@pytest.mark.usefixtures("offline_hub")
def test_imagenet_offline_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    probes: list[str] = []
    monkeypatch.setattr(models, "network_available", lambda host, *a, **k: probes.append(host) or False)
    with pytest.raises(WeightsUnavailableError, match="local state_dict file"):
        build_model("resnet18", 10, weights="imagenet")
    assert probes == ["download.pytorch.org"]


def test_imagenet_download_failure_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(models, "network_available", lambda *a, **k: True)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", broken)
    with pytest.raises(WeightsUnavailableError, match="connection reset"):
        build_model("resnet18", 10, weights="imagenet")


def test_imagenet_loads_body_and_drops_1000_way_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    imagenet_like = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(models, "network_available", lambda *a, **k: True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: imagenet_like)
    model = build_model("resnet18", 10, weights="ImageNet")
    assert model.fc.out_features == 10
    assert torch.equal(model.layer3[0].downsample[0].weight, imagenet_like["layer3.0.downsample.0.weight"])
    with pytest.raises(ValueError, match=r"'conv1\.weight' in resnet18 'imagenet' weights"):
        build_model("resnet18", 10, in_channels=1, weights="imagenet")


def test_imagenet_not_offered_by_cnn() -> None:
    with pytest.raises(ValueError, match="model 'cnn' has no 'imagenet' weights"):
        build_model("cnn", 10, weights="imagenet")


def test_pretrained_weights_bring_their_input_normalization():
    from fedselect.models import IMAGENET_STATS, INCEPTION_STATS, pretrained_input_stats

    assert pretrained_input_stats("efficientnet_lite0", "imagenet") == INCEPTION_STATS
    assert pretrained_input_stats("ResNet18", "ImageNet") == IMAGENET_STATS
    # random init or a weights file: the data's own statistics
    assert pretrained_input_stats("efficientnet_lite0", None) is None
    assert pretrained_input_stats("resnet18", "some/file.pt") is None
    assert pretrained_input_stats("cnn", "none") is None


def test_run_transform_normalizes_with_the_pretrained_statistics():
    from types import SimpleNamespace

    from fedselect.config import load_config
    from fedselect.runner.federation import data_transform

    from .conftest import REPO

    data = SimpleNamespace(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    smoke = REPO / "configs" / "smoke.yaml"
    pretrained = load_config(smoke, ["model.name=efficientnet_lite0", "model.weights=imagenet", "data.image_size=64"])
    transform = data_transform(pretrained, data)
    assert transform.mean.flatten().tolist() == [0.5] * 3 and transform.resize == 64
    scratch = data_transform(load_config(smoke, ["model.name=efficientnet_lite0"]), data)
    assert torch.allclose(scratch.mean.flatten(), torch.tensor(data.mean)) and scratch.resize is None
