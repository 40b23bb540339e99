"""FedSelect as a FedML algorithm: equals FedAvg when nothing is personal, keeps personal entries home."""

from __future__ import annotations

import pytest
import torch

from fedselect.config import ConfigError, load_config_dict
from fedselect.core.masks import personal_fraction

from .test_algorithms import make_run, run_flow

SMALL = {"gradltn_iterations": 2, "gradltn_epochs": 1}


def test_p_to_zero_equals_fedavg_exactly():
    *_, fedavg_server, fedavg_flow = make_run("fedavg")
    fedavg_flow.run()
    *_, trainers, server, flow = make_run("fedselect", algo={"p": 1e-9, **SMALL})
    results = flow.run()
    assert all(personal_fraction(t.parameter_mask()) == 0.0 for t in trainers)
    for key, value in fedavg_server.get_model_params().items():
        assert torch.equal(server.get_model_params()[key], value), key
    assert results[-1].client_accuracies == fedavg_flow.results[-1].client_accuracies


def test_personal_fraction_is_p_and_personal_entries_stay_home():
    _, clients, args, model, init, _, trainers, server, flow = make_run("fedselect", algo={"p": 0.25, **SMALL})
    results = run_flow(flow, args, model, clients)
    for trainer in trainers:
        mask = trainer.parameter_mask()
        assert abs(personal_fraction(mask) - 0.25) < 0.01
        upload = trainer.get_model_params()
        # partial tensors send exactly their shared entries
        for name, flat in upload["partial"].items():
            assert flat.numel() == int((~mask[name]).sum())
        # the server's broadcast never touches personal entries
        poisoned = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                    for k, v in server.get_model_params().items()}
        trainer.set_model_params(poisoned)
        for name, values in trainer.personal_values.items():
            assert torch.equal(model.state_dict()[name][mask[name]], values)
    assert results[-1].client_metrics[0]["personal_fraction"] == pytest.approx(0.25, abs=0.01)
    assert "personal_fraction_head" in results[-1].client_metrics[0]
    # partial uploads are smaller than FedAvg's
    *_, fedavg_flow = make_run("fedavg")
    assert results[0].bytes_up < fedavg_flow.run()[0].bytes_up


def test_server_keeps_entries_personal_to_all_clients():
    *_, trainers, server, flow = make_run("fedselect", rounds=1, algo={"p": 0.5, **SMALL})
    before = {k: v.clone() for k, v in server.get_model_params().items()}
    flow.run()
    masks = [t.parameter_mask() for t in trainers]
    for name in masks[0]:
        everyone = torch.stack([m[name] for m in masks]).all(0)
        assert torch.equal(server.get_model_params()[name][everyone], before[name][everyone])
        assert torch.equal(server.global_personal_mask[name], torch.stack([m[name] for m in masks]).any(0))


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        *_, server, flow = make_run("fedselect", algo={"p": 0.5, **SMALL})
        results = flow.run()
        runs.append((results[-1].client_accuracies, {k: v.clone() for k, v in server.get_model_params().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_grow_variant_grows_toward_target():
    *_, trainers, _, flow = make_run("fedselect", rounds=3, algo={"p": 0.3, "mask_search": "grow"})
    flow.run()
    fraction = personal_fraction(trainers[0].parameter_mask())
    # first participation takes the snapshot, the next two grow: 1 - 0.7^2 = 0.51
    assert fraction == pytest.approx(0.51, abs=0.01)


@pytest.mark.parametrize(("key", "value"), [("p", 0.0), ("p", 1.0), ("p", -0.5), ("gradltn_iterations", 0),
                                            ("grow_target", 1.5), ("mask_search", "magic")])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"algo.{key}"):
        load_config_dict({"algorithm": "fedselect", "algo": {key: value}})
