"""Issue 15, models: a user's own model by name or path (hf folder, timm:<name>, torchvision ResNet
with a weights file), with layer groups and FLOPs per group, and config errors naming the key.

Every model is tiny and built in the test; weights are written to tmp folders, nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fedselect.algorithms.context import RunContext
from fedselect.algorithms.layersel import candidate_groups
from fedselect.cli import main
from fedselect.config import ConfigError, ModelConfig, load_config_dict
from fedselect.data import TokenTransform
from fedselect.engine import ClientDataset
from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_sections
from fedselect.fedml_runtime.simulation import SimulationFlow
from fedselect.models import (
    HFEncoderClassifier,
    build_model,
    build_model_from_config,
    layer_groups,
    pretrained_input_stats,
    tokenizer_for,
    tokenizer_path,
)
from fedselect.models.flops import forward_flops_by_group
from fedselect.models.text import load_minilm_tokenizer, minilm_path
from fedselect.registry import get_algorithm, validate_algorithm_options

from .test_algorithms import make_run, run_flow

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "a", "match", "vote", "atom", "£"]


def write_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 16, distil: bool = False) -> Path:
    """A save_pretrained folder: a randomly initialised tiny BERT (or DistilBERT) and a BERT tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer, DistilBertConfig, DistilBertModel

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    torch.manual_seed(123)
    if distil:
        model: nn.Module = DistilBertModel(DistilBertConfig(
            vocab_size=len(VOCAB), dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden,
            max_position_embeddings=64))
    else:
        model = BertModel(BertConfig(
            vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=64))
    model.save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _check_cover(model: nn.Module) -> None:
    names = [n for g in layer_groups(model) for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))


def _token_ids(folder: Path, texts: list[str]) -> torch.Tensor:
    tokenizer = tokenizer_for(ModelConfig(name="hf", path=str(folder)))
    return tokenizer(texts, max_length=12, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------- hf


@pytest.mark.usefixtures("no_network")
def test_hf_folder_groups_forward_flops_and_pretrained_weights(bert_dir: Path) -> None:
    from transformers import BertModel

    model = build_model("hf", 3, path=str(bert_dir))
    assert isinstance(model, HFEncoderClassifier)
    groups = layer_groups(model)
    assert [(g.name, g.role) for g in groups] == [
        ("embeddings", "stem"), ("layer.0", "block"), ("layer.1", "block"), ("head", "head")]
    _check_cover(model)
    assert groups[-1].param_names == ("classifier.weight", "classifier.bias")  # no pooler: add_pooling_layer=False
    assert [g.name for g in candidate_groups(model)] == ["layer.0", "layer.1", "head"]

    saved = BertModel.from_pretrained(str(bert_dir), local_files_only=True).state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[key]), key

    ids = _token_ids(bert_dir, ["hello world £", "the match", "vote atom a"])
    assert model(ids).shape == (3, 3)
    flops = forward_flops_by_group(model, ids[:1])
    assert set(flops) == {"embeddings", "layer.0", "layer.1", "head"}
    assert flops["layer.0"] > 0 and flops["layer.1"] > 0 and flops["head"] > 0
    assert flops["layer.0"] == flops["layer.1"]
    assert flops["embeddings"] >= 0  # lookups and a norm: no matmul FLOPs


def test_hf_pooling_none_weights_and_weights_file(bert_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mean = build_model("hf", 2, path=str(bert_dir)).eval()
    torch.manual_seed(0)
    cls = build_model("hf", 2, path=str(bert_dir), pooling="cls").eval()
    assert cls.pooling == "cls" and mean.pooling == "mean"
    ids = _token_ids(bert_dir, ["hello world the match", "a"])
    with torch.no_grad():
        expected = cls.classifier(cls.backbone(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0])
        assert torch.allclose(cls(ids), expected)
        assert not torch.allclose(cls(ids), mean(ids))

    torch.manual_seed(1)
    random = build_model("hf", 2, path=str(bert_dir), weights="none")
    torch.manual_seed(1)
    again = build_model("hf", 2, path=str(bert_dir), weights="none")
    key = "backbone.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(random.state_dict()[key], again.state_dict()[key])
    assert not torch.equal(random.state_dict()[key], mean.state_dict()[key])

    file = tmp_path / "classifier.pt"
    torch.save(random.state_dict(), file)
    loaded = build_model_from_config(ModelConfig(name="hf", path=str(bert_dir), weights=str(file)), 2)
    for name, value in random.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_hf_groups_found_for_another_layout(tmp_path: Path) -> None:
    folder = write_tiny_bert(tmp_path / "distil", layers=3, distil=True)
    model = build_model("hf", 4, path=str(folder), pooling="cls")
    assert [g.name for g in layer_groups(model)] == ["embeddings", "layer.0", "layer.1", "layer.2", "head"]
    assert layer_groups(model)[1].param_names[0].startswith("backbone.transformer.layer.0.")
    _check_cover(model)
    assert model(_token_ids(folder, ["hello", "vote"])).shape == (2, 4)


def test_tokenizer_for_hf_minilm_and_image_models(bert_dir: Path) -> None:
    tokenizer = tokenizer_for(ModelConfig(name="hf", path=str(bert_dir)))
    assert tokenizer("hello £")["input_ids"] == [2, 5, 12, 3]
    assert tokenizer.pad_token_id == 0
    assert tokenizer_path(ModelConfig(name="hf", path=str(bert_dir))) == bert_dir

    minilm = ModelConfig(name="minilm", weights="pretrained")
    assert tokenizer_path(minilm) == minilm_path()
    text = "Great value £20 café"
    assert tokenizer_for(minilm)(text)["input_ids"] == load_minilm_tokenizer()(text)["input_ids"]

    with pytest.raises(ConfigError, match=r"'model\.name' 'timm:resnet10t' takes images, not text; .*minilm, hf"):
        tokenizer_for(ModelConfig(name="timm:resnet10t"))


def _text_clients(folder: Path, num_clients: int = 3) -> list[ClientDataset]:
    """Each client's label is the topic word in its texts (learnable), 12 train and 6 test texts."""
    words = ["match", "vote", "atom"]

    def split(n: int, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = [(i + cid) % 3 for i in range(n)]
        ids = _token_ids(folder, [f"the {words[y]} hello {'world ' * (i % 3)}" for i, y in enumerate(labels)])
        return ids, torch.tensor(labels)

    return [ClientDataset(*split(12, cid), *split(6, cid)) for cid in range(num_clients)]


def test_layer_selection_runs_on_an_hf_encoder(bert_dir: Path) -> None:
    config = load_config_dict({
        "algorithm": "layersel", "seed": 5, "device": "cpu", "algo": {"strategy": "top", "budget": 0.5},
        "data": {"partition": {"num_clients": 3}}, "model": {"name": "hf", "path": str(bert_dir)},
        "train": {"rounds": 1, "local_epochs": 1, "batch_size": 4, "lr": 0.05},
    })
    clients = _text_clients(bert_dir)
    args = build_fedml_args(fedml_sections(config))
    torch.manual_seed(config.seed)
    model = build_model_from_config(config.model, 3)
    stem = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("backbone.embeddings.")}
    spec = get_algorithm("layersel")
    ctx = RunContext(config=config, options=validate_algorithm_options("layersel", config.algo),
                     device=torch.device("cpu"), transform=TokenTransform())
    trainers = [spec.client_cls(model, args, client_id=c, data=d, ctx=ctx) for c, d in enumerate(clients)]
    server = spec.server_cls(model, args, ctx=ctx)
    flow = SimulationFlow(args=args, device="cpu", clients=trainers, server=server, rounds=1,
                          participation=1.0, seed=config.seed, progress=False)
    result = run_flow(flow, args, model, clients)[0]
    assert trainers[0].forward_flops()[1] > 0  # layer.0
    for metrics in result.client_metrics.values():
        assert metrics["layers_trained"] >= 1 and metrics["compute_backward"] > 0
        assert 0 < metrics["backward_fraction"] < 1
    assert all(torch.equal(server.get_model_params()[n], v) for n, v in stem.items())  # embeddings stay frozen


def test_layer_selection_runs_on_a_timm_model() -> None:
    _, clients, args, model, *_, flow = make_run("layersel", rounds=1, algo={"strategy": "top", "budget": 0.5},
                                                 model_cls=lambda: build_model("timm:resnet10t", 3, image_size=16))
    result = run_flow(flow, args, model, clients)[0]
    assert [g.name for g in candidate_groups(model)] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]
    assert all(m["compute_backward"] > 0 for m in result.client_metrics.values())


# ---------------------------------------------------------------- timm


def test_timm_random_weights_saved_and_reloaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model("timm:resnet10t", 5)
    assert [(g.name, g.role) for g in layer_groups(source)] == [
        ("stem", "stem"), ("layer1.0", "block"), ("layer2.0", "block"), ("layer3.0", "block"),
        ("layer4.0", "block"), ("head", "head")]
    _check_cover(source)
    file = tmp_path / "resnet10t.pt"
    torch.save(source.state_dict(), file)
    torch.manual_seed(1)
    loaded = build_model("timm:resnet10t", 5, weights=str(file))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    from safetensors.torch import save_file

    safe = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(safe))
    other_head = build_model("timm:resnet10t", 3, weights=str(safe))  # 5-class head dropped, body kept
    assert torch.equal(other_head.state_dict()["layer4.0.conv1.weight"], source.state_dict()["layer4.0.conv1.weight"])
    assert other_head.fc.weight.shape == (3, 512)

    flops = forward_flops_by_group(loaded, torch.randn(1, 3, 32, 32))
    assert all(value > 0 for value in flops.values()), flops
    assert pretrained_input_stats("timm:resnet10t", str(file)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert pretrained_input_stats("timm:resnet10t", None) is None


def test_timm_vit_groups_are_stem_blocks_head() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, embed_dim=24, num_heads=2, num_classes=4)
    vit.fedselect_arch = "timm"
    groups = layer_groups(vit)
    assert [(g.name, g.role) for g in groups] == [
        ("stem", "stem"), ("blocks.0", "block"), ("blocks.1", "block"), ("blocks.2", "block"), ("head", "head")]
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(groups[0].param_names)
    assert "norm.weight" in groups[-2].param_names  # timm's matcher puts the final norm with the last block
    assert groups[-1].param_names == ("head.weight", "head.bias")
    _check_cover(vit)
    flops = forward_flops_by_group(vit, torch.randn(1, 3, 32, 32))
    assert all(flops[f"blocks.{i}"] > 0 for i in range(3)) and flops["head"] > 0 and flops["stem"] > 0


def test_timm_vit_by_name_fits_the_image_size() -> None:
    model = build_model("timm:vit_tiny_patch16_224", 4, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert [g.name for g in layer_groups(model)][:2] == ["stem", "blocks.0"]


def test_unknown_timm_model_lists_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"'model\.name' unknown timm model 'resnet10x'; close matches: .*resnet10t"):
        build_model("timm:resnet10x", 5)
    with pytest.raises(ValueError, match="'timm:resnet10t' has no 'imagenet' weights; it accepts: none or a local"):
        build_model("timm:resnet10t", 5, weights="imagenet")


# ---------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_weights_file_round_trip(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet_like = getattr(torchvision.models, name)(weights=None).state_dict()  # a 1000-class torchvision file
    file = tmp_path / f"{name}.pth"
    torch.save(imagenet_like, file)
    model = build_model(name, 10, weights=str(file))
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, imagenet_like[key]), key
    assert model.fc.weight.shape[0] == 10
    blocks = {"resnet18": 8, "resnet50": 16}[name]
    assert [g.name for g in layer_groups(model)][:2] == ["stem", "layer1.0"]
    assert len(layer_groups(model)) == blocks + 2
    again = tmp_path / "again.pt"
    torch.save(model.state_dict(), again)
    reloaded = build_model(name, 10, weights=str(again))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- config errors


def _config(model: dict[str, object]) -> None:
    load_config_dict({"model": model})


@pytest.mark.parametrize(("model", "message"), [
    ({"name": "vgg11"}, r"config key 'model\.name' unknown model 'vgg11'; accepted: cnn, .*resnet50, hf \(with "
                        r"model\.path\) or timm:<name>"),
    ({"name": "timm:"}, r"config key 'model\.name' unknown model 'timm:'"),
    ({"name": "hf"}, r"config key 'model\.path' is required for model\.name hf"),
    ({"name": "hf", "path": "/nonexistent/folder"}, r"config key 'model\.path' folder not found: /nonexistent/folder"),
    ({"name": "cnn", "pooling": "cls"}, r"config key 'model\.pooling' is only used by model\.name hf, not 'cnn'"),
    ({"name": "resnet18", "path": "."}, r"config key 'model\.path' is only used by model\.name hf"),
    ({"name": "resnet18", "weights": "missing.pt"}, r"config key 'model\.weights' file not found: missing\.pt"),
])
def test_bad_model_config_names_the_key(model: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _config(model)
    assert "\n" not in str(info.value)


def test_config_knows_the_builtins_and_a_plugin_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedselect import models
    from fedselect.config import BUILTIN_MODELS

    assert set(BUILTIN_MODELS) <= set(models.available_models())
    monkeypatch.setattr(models, "_MODELS", dict(models._MODELS))
    with pytest.raises(ConfigError, match="unknown model 'mymlp'"):
        _config({"name": "mymlp"})
    models.register_model("mymlp", lambda num_classes, **_: nn.Linear(4, num_classes),
                          pretrained={"simclr": lambda: {}})
    assert load_config_dict({"model": {"name": "mymlp", "weights": "simclr"}}).model.weights == "simclr"


def test_hf_config_checks_folder_and_pooling(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model\.path' .* has no config\.json"):
        _config({"name": "hf", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"'model\.pooling' must be one of \['mean', 'cls'\], got 'max'"):
        _config({"name": "hf", "path": str(bert_dir), "pooling": "max"})
    config = load_config_dict({"model": {"name": "hf", "path": str(bert_dir), "pooling": "cls"}})
    assert config.model.pooling == "cls" and config.model.weights is None
    assert load_config_dict({"model": {"name": "timm:resnet10t"}}).model.name == "timm:resnet10t"


def test_build_errors_name_the_key(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model\.path' is required"):
        build_model("hf", 2)
    with pytest.raises(ConfigError, match=r"'model\.path' folder not found"):
        build_model("hf", 2, path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"'model\.pooling' is only used by model\.name hf"):
        build_model("cnn", 2, pooling="mean")
    with pytest.raises(ConfigError, match=r"'model\.pooling' must be one of"):
        build_model("hf", 2, path=str(bert_dir), pooling="max")
    with pytest.raises(ConfigError, match=r"'model\.name' unknown model 'vgg11'; .*timm:<name>"):
        build_model("vgg11", 2)


def test_check_config_prints_one_error_line(tmp_path: Path, bert_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: hf\n  path: /nonexistent/folder\n", encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(["check-config", "--config", str(bad)]) == 2
    assert err.getvalue().count("\n") == 1
    assert "fedselect: error:" in err.getvalue() and "'model.path' folder not found" in err.getvalue()
    good = tmp_path / "good.yaml"
    good.write_text(f"model:\n  name: hf\n  path: {bert_dir}\n  pooling: mean\n", encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check-config", "--config", str(good)]) == 0
    assert f"path: {bert_dir}" in out.getvalue()
