"""train.cuda_graphs: auto (the default) resolves to graphs for image models on CUDA only; true is
refused without CUDA (config and run); hooks a replay would skip are refused; on a GPU, graphed
training matches eager training (these run where CUDA is, e.g. bench/gpu_check)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedselect.algorithms.context import RunContext
from fedselect.config import ConfigError, load_config_dict
from fedselect.cuda_graphs import graph_count, graphed_forward, uses_cuda_graphs
from fedselect.engine import ImageTransform, OptimConfig, train_passes
from fedselect.runner.federation import on_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))


def _data(device: str = "cpu", n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return x.to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def test_cuda_graphs_with_a_cpu_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        load_config_dict({"device": "cpu", "train": {"cuda_graphs": True}})


def test_cuda_graphs_on_a_run_resolved_to_the_cpu_is_an_error() -> None:
    config = load_config_dict({"device": "auto", "train": {"cuda_graphs": True}})
    with pytest.raises(ConfigError, match="train.cuda_graphs.*cpu"):
        on_device(config, _net(), torch.device("cpu"))


@pytest.mark.parametrize(("setting", "device", "image_size", "expected"), [
    ("auto", "cuda", 32, True), ("auto", "cuda:1", 64, True), ("auto", "cpu", 32, False),
    ("auto", "cuda", 96, False), ("auto", "cuda", None, False), (True, "cuda", 224, True),
    (True, "cuda", None, True), (False, "cuda", 32, False),
])
def test_auto_means_small_images_on_cuda(setting, device: str, image_size, expected: bool) -> None:
    assert uses_cuda_graphs(setting, torch.device(device), image_size=image_size) is expected


def test_auto_is_the_default_and_a_cpu_run_trains_eagerly_without_complaint() -> None:
    config = load_config_dict({"device": "cpu"})
    assert config.train.cuda_graphs == "auto"
    on_device(config, _net(), torch.device("cpu"))  # no error: auto is not a demand for CUDA

    def ctx(device: str, image_size: int | None) -> RunContext:
        return RunContext(config=config, options=None, transform=lambda x: x, device=torch.device(device),
                          image_size=image_size)
    assert ctx("cpu", 32).cuda_graphs is False
    assert ctx("cuda", 32).cuda_graphs is True
    assert ctx("cuda", None).cuda_graphs is False  # text


def test_the_input_size_auto_reads_is_the_resized_side_else_the_stored_one() -> None:
    from fedselect.runner.federation import input_image_size

    images = type("D", (), {"train_x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)})()
    assert input_image_size(load_config_dict({}), images) == 32
    assert input_image_size(load_config_dict({"data": {"image_size": 224}}), images) == 224


@pytest.mark.parametrize("value", ["yes", 1, "on"])
def test_a_cuda_graphs_value_other_than_true_false_auto_is_a_config_error(value) -> None:
    with pytest.raises(ConfigError, match="train.cuda_graphs"):
        load_config_dict({"train": {"cuda_graphs": value}})


def test_hooks_on_submodules_are_refused_because_a_replay_skips_them() -> None:
    model = _net()
    model[1].register_forward_hook(lambda *_: None)
    with pytest.raises(ValueError, match="module '1' has hooks"):
        graphed_forward(model)
    model = _net()
    model.register_forward_pre_hook(lambda *_: None)
    with pytest.raises(ValueError, match="pre-hooks"):
        graphed_forward(model)


def _train(model: nn.Module, spec: dict | None, *, graphs: bool, device: str) -> float:
    x, y = _data(device)
    transform = ImageTransform((0.5,) * 3, (0.25,) * 3, augment=True)
    stats = train_passes(model, x, y, [spec, spec], optim=OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-3,
                                                                    batch_size=16),
                         transform=transform, generator=torch.Generator().manual_seed(2), cuda_graphs=graphs)
    return stats.loss_sum


@needs_cuda
@pytest.mark.parametrize("kind", ["whole", "masked", "frozen_head"])
def test_graphed_training_matches_eager_training(kind: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    eager, graphed = _net().cuda(), _net().cuda()
    names = [name for name, _ in eager.named_parameters()]
    gen = torch.Generator().manual_seed(3)
    spec = {"whole": None,
            "masked": {n: (torch.rand(p.shape, generator=gen) < 0.5).cuda() for n, p in eager.named_parameters()},
            "frozen_head": {n: None for n in names[:-2]}}[kind]
    loss_eager = _train(eager, spec, graphs=False, device="cuda")
    loss_graphed = _train(graphed, spec, graphs=True, device="cuda")
    assert loss_graphed == pytest.approx(loss_eager, rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name  # BatchNorm statistics too
    # batches of 16, 16 and 8: two shapes, one graph pair each, reused by the second epoch
    assert graph_count(graphed) == 2


@needs_cuda
def test_the_models_forward_hook_runs_once_per_step_and_replaced_tensors_get_new_graphs() -> None:
    model = _net().cuda()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    _train(model, None, graphs=True, device="cuda")
    assert calls == [16, 16, 8, 16, 16, 8]  # not the capture's warm-up passes
    assert graph_count(model) == 2
    model[5] = nn.Linear(8, 3).cuda()
    _train(model, None, graphs=True, device="cuda")
    assert graph_count(model) == 4


@pytest.mark.parametrize(("algorithm", "algo"), [
    ("fedavg", {}), ("fedrep", {}), ("ditto", {}), ("lotteryfl", {}),
    ("fedselect", {"gradltn_iterations": 2, "gradltn_epochs": 1}),
    ("fedselect", {"mask_search": "grow", "p": 0.25, "maskable": "weights"}),
    ("layersel", {"budget": 0.5}),
])
def test_a_run_reuses_its_graphs_round_after_round(monkeypatch, algorithm: str, algo: dict) -> None:
    """Graph keys (the tensors' storage, trainable pattern, modes, batch shapes) seen in a
    simulated run on CPU: every key of the last round was already needed in the first two, so
    on a GPU no round after the second captures a graph (and memory does not grow)."""
    from fedselect import batched_training, engine
    from fedselect.cuda_graphs import batch_key, pass_key

    from .test_algorithms import make_run, run_flow

    keys_by_round: dict[int, set] = {}
    current = {"round": -1}

    def recording_forward(model: nn.Module):
        key = pass_key(model)

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            keys_by_round.setdefault(current["round"], set()).add(key + batch_key(inputs))
            return model(inputs)
        return forward

    monkeypatch.setattr(engine, "graphed_forward", recording_forward)
    real_train_passes = engine.train_passes
    # a client's training call (fedselect.batched_training.TrainRequest.run_alone), with graphs on
    monkeypatch.setattr(batched_training, "train_passes",
                        lambda *a, **k: real_train_passes(*a, **{**k, "cuda_graphs": True}))
    config, clients, args, model, *_, trainers, server, flow = make_run(algorithm, rounds=4, algo=algo)
    for trainer in trainers:
        update = trainer.local_update

        def tracked(update=update, trainer=trainer):
            current["round"] = trainer.round_idx
            return update()
        trainer.local_update = tracked
    run_flow(flow, args, model, clients)
    assert sorted(keys_by_round) == [0, 1, 2, 3]
    assert keys_by_round[3] <= keys_by_round[0] | keys_by_round[1] | keys_by_round[2]
    assert keys_by_round[3] <= keys_by_round[1] | keys_by_round[2]


def test_at_most_max_graphs_per_model_are_kept_least_recently_used_first(monkeypatch) -> None:
    from fedselect import cuda_graphs

    captured = []

    def fake_capture(model, params, sample):
        captured.append(sample.shape[0])
        return lambda inputs, *params: inputs.sum(1)

    monkeypatch.setattr(cuda_graphs, "_capture", fake_capture)
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS_PER_MODEL", 3)
    model = nn.Linear(4, 2)
    forward = graphed_forward(model)
    for n in (1, 2, 3, 1, 4, 2, 1):  # 1 is used again before 4 arrives, so 2 is the one dropped
        forward(torch.zeros(n, 4))
    assert captured == [1, 2, 3, 4, 2]
    assert graph_count(model) == 3
