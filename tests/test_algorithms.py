"""FedAvg and Local on the mask mechanism, driven through FedMLRunner with the simulation flow."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch

from fedselect.algorithms.base import BadUpdateError, FedAvgClient, FedAvgServer, RunContext
from fedselect.algorithms.payload import decode_tensor, encode_upload, payload_nbytes, validate_upload
from fedselect.config import load_config_dict
from fedselect.engine import ImageTransform, client_generator, train_passes
from fedselect.fedml_runtime.runtime import build_fedml_args, fedml_dataset_tuple, fedml_sections
from fedselect.fedml_runtime.simulation import SimulationFlow, sample_clients
from fedselect.models import build_model
from fedselect.registry import available_algorithms, get_algorithm, validate_algorithm_options

from .conftest import synthetic_clients


def make_run(algorithm: str, *, rounds: int = 2, num_clients: int = 3, client_cls=None, algo=None, model_cls=None,
             **train):
    """One run's objects: (config, clients, args, model, init, ctx, trainers, server, flow)."""
    config = load_config_dict({
        "algorithm": algorithm, "seed": 5, "device": "cpu", "algo": algo or {},
        "data": {"partition": {"num_clients": num_clients}},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 8, "lr": 0.05, "momentum": 0.5, **train},
    })
    spec = get_algorithm(algorithm)
    clients = synthetic_clients(num_clients)
    args = build_fedml_args(fedml_sections(config))
    torch.manual_seed(config.seed)
    model = model_cls() if model_cls is not None else build_model("cnn", 3, image_size=16)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = RunContext(config=config, options=validate_algorithm_options(algorithm, config.algo),
                     device=torch.device("cpu"),
                     transform=ImageTransform((0.5,) * 3, (0.25,) * 3, augment=True))
    trainers = [(client_cls or spec.client_cls)(model, args, client_id=c, data=d, ctx=ctx)
                for c, d in enumerate(clients)]
    server = spec.server_cls(model, args, ctx=ctx)
    flow = SimulationFlow(args=args, device="cpu", clients=trainers, server=server, rounds=rounds,
                          participation=config.train.participation, seed=config.seed, progress=False)
    return config, clients, args, model, init, ctx, trainers, server, flow


def run_flow(flow, args, model, clients):
    import fedml

    fedml.FedMLRunner(args, "cpu", fedml_dataset_tuple(clients, 3), model, algorithm_flow=flow).run()
    return flow.results


def test_registry_lists_foundation_algorithms():
    names = available_algorithms()
    assert {"fedavg", "local"} <= set(names)


def test_fedavg_equals_hand_written_fedavg():
    config, clients, args, model, init, ctx, _, server, flow = make_run("fedavg")
    results = run_flow(flow, args, model, clients)
    assert [r.round_idx for r in results] == [0, 1]

    reference = build_model("cnn", 3, image_size=16)
    global_state = {k: v.clone() for k, v in init.items()}
    for round_idx in range(2):
        states, weights = [], []
        for cid, data in enumerate(clients):
            reference.load_state_dict(global_state)
            train_passes(reference, data.train_x, data.train_y, [None], optim=ctx.optim, transform=ctx.transform,
                         generator=client_generator(config.seed, cid, round_idx))
            states.append({k: v.clone() for k, v in reference.state_dict().items()})
            weights.append(data.num_train)
        for key, value in global_state.items():
            if value.is_floating_point():
                stacked = torch.stack([s[key].double() * w for s, w in zip(states, weights, strict=True)])
                global_state[key] = (stacked.sum(0) / sum(weights)).to(value.dtype)
            else:
                global_state[key] = torch.stack([s[key] for s in states]).amax(0)
    for key, value in server.get_model_params().items():
        assert torch.allclose(value.double(), global_state[key].double(), atol=1e-6), key
    # bytes: every client uploads and downloads the whole state once per round
    full = sum(v.numel() * v.element_size() for v in init.values())
    assert results[0].bytes_down == 3 * full
    assert results[0].bytes_up == sum(payload_nbytes(t.get_model_params()) for t in flow.clients)
    assert all(r.evaluation is not None and len(r.evaluation) == 3 for r in results)


def test_local_trains_alone_and_sends_nothing():
    config, clients, args, model, init, ctx, trainers, server, flow = make_run("local")
    results = run_flow(flow, args, model, clients)
    assert all(r.bytes_up == 0 or r.bytes_up == 16 * 3 for r in results)  # ids and counts only
    # the common initialization is downloaded once, then nothing
    full = sum(v.numel() * v.element_size() for v in init.values())
    assert [r.bytes_down for r in results] == [3 * full, 0]
    # the server's model never moved
    for key, value in server.get_model_params().items():
        assert torch.equal(value, init[key])
    # client 1's model equals training alone for two rounds from the common init
    reference = build_model("cnn", 3, image_size=16)
    reference.load_state_dict(init)
    for round_idx in range(2):
        train_passes(reference, clients[1].train_x, clients[1].train_y, [None], optim=ctx.optim,
                     transform=ctx.transform, generator=client_generator(config.seed, 1, round_idx))
    trainers[1].set_model_params(server.get_model_params())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class HeadPersonalClient(FedAvgClient):
    """FedPer-style: the head stays home (used to test the mechanism, not registered)."""

    def initial_personal_mask(self):
        return self.full_mask(["head.weight", "head.bias"])


def test_personal_entries_never_leave_or_get_overwritten():
    _, clients, args, model, init, _, trainers, server, flow = make_run("fedavg", client_cls=HeadPersonalClient)
    run_flow(flow, args, model, clients)
    upload = trainers[0].get_model_params()
    assert "head.weight" not in upload["tensors"] and "head.weight" not in upload["partial"]
    # the server's head is the initial one: no client ever shared it
    assert torch.equal(server.get_model_params()["head.weight"], init["head.weight"])
    # broadcasting a global model with garbage in the head leaves each client's head intact
    poisoned = OrderedDict((k, v.clone()) for k, v in server.get_model_params().items())
    poisoned["head.weight"].fill_(float("nan"))
    for trainer in trainers:
        trainer.set_model_params(poisoned)
        assert torch.equal(model.state_dict()["head.weight"].flatten(), trainer.personal_values["head.weight"])


def test_elementwise_mask_round_trip_through_upload():
    state = {"w": torch.arange(10.0).view(2, 5), "b": torch.ones(3)}
    mask = {"w": torch.tensor([[True, False, False, True, False], [False] * 5])}
    upload = encode_upload(state, mask, client_id=1, num_samples=4)
    assert upload["partial"]["w"].tolist() == [1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    validate_upload(upload, state)
    values, shared = decode_tensor(upload, "w", state["w"])
    assert torch.equal(shared, ~mask["w"])
    assert torch.equal(values[shared], state["w"][~mask["w"]])
    assert torch.isnan(values[mask["w"]]).all()
    # values (8 floats + 3 floats) + 2 bytes of mask bits + small header
    assert payload_nbytes(upload) >= (8 + 3) * 4 + 2


def test_mismatched_shapes_are_rejected():
    state = {"w": torch.zeros(2, 5)}
    upload = encode_upload({"w": torch.zeros(3, 5)}, {}, client_id=2, num_samples=1)
    with pytest.raises(ValueError, match="'w' has shape"):
        validate_upload(upload, state)
    upload = encode_upload({"w": torch.zeros(2, 5)}, {"w": torch.eye(2, 5, dtype=torch.bool)}, client_id=2,
                           num_samples=1)
    upload["partial"]["w"] = upload["partial"]["w"][:-1]
    with pytest.raises(ValueError, match="shared values"):
        validate_upload(upload, state)


class PoisonedClient(FedAvgClient):
    """Client 1 diverges: a NaN in its trained weights reaches its upload (simulated and wire alike)."""

    def train(self, *args):
        stats = super().train(*args)
        if self.id == 1:
            with torch.no_grad():
                self.model.state_dict(keep_vars=True)["conv1.weight"][0, 0, 0, 0] = float("nan")
        return stats


def test_nan_update_is_rejected_by_default():
    *_, flow = make_run("fedavg", rounds=1, client_cls=PoisonedClient)
    with pytest.raises(BadUpdateError, match="client 1"):
        flow.run()


def test_nan_update_can_be_dropped_and_is_logged():
    *_, server, flow = make_run("fedavg", rounds=1, client_cls=PoisonedClient, on_bad_update="drop")
    results = flow.run()
    assert [c for c, _ in results[0].dropped] == [1]
    assert all(torch.isfinite(v).all() for v in server.get_model_params().values() if v.is_floating_point())


def test_sampling_is_seeded_and_all_clients_are_evaluated():
    assert sample_clients(10, 0.3, 1, 4) == sample_clients(10, 0.3, 1, 4)
    assert len(sample_clients(10, 0.3, 1, 4)) == 3
    assert sample_clients(10, 1.0, 1, 4) == list(range(10))
    *_, flow = make_run("fedavg", rounds=1, participation=0.34)
    result = flow.run()[0]
    assert len(result.sampled) == 1 and len(result.evaluation) == 3


def test_fedavg_server_is_a_fedml_server_aggregator():
    import fedml.core

    assert issubclass(FedAvgServer, fedml.core.ServerAggregator)
    assert issubclass(FedAvgClient, fedml.core.ClientTrainer)
    assert dataclasses.is_dataclass(get_algorithm("fedavg").options_cls)
