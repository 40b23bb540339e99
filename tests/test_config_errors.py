"""Config errors up front (issue 17): one ``fedselect: error:`` line and exit status 2, before data are
loaded or any client can join; never torch's advice to load a file with ``weights_only=False``.

Config-time: an empty config file, an unknown dataset, layer selection's min_trainers against the
clients sampled per round. Model-time: layer selection's budgets against the model's layers (a
probe model built without data where the dataset fixes its shape).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedselect.cli import main
from fedselect.config import ConfigError, load_config, load_config_dict
from fedselect.runner.preflight import preflight, probe_shape

from .conftest import REPO
from .test_cross_silo import tiny_folder  # noqa: F401  (a fixture)

# a budget of 1 % of 3 unit-cost layers: below the always-trained head's cost of 1
INFEASIBLE = {"algorithm": "layersel", "algo": {"budget": 0.01}, "device": "cpu"}


def write(tmp_path: Path, raw: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedselect: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "weights_only" not in err and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------ config-time

@pytest.mark.parametrize("text", ["", "\n\n", "# every key commented out\n# train: {rounds: 3}\n"])
def test_an_empty_config_file_is_an_error_naming_it(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    for command in ("check-config", "run"):
        assert main([command, "--config", str(path)]) == 2
        one_error_line(capsys.readouterr().err, str(path), "is empty")


def test_an_empty_mapping_asks_for_every_default(tmp_path):
    """`{}` is written on purpose: the defaults (an empty file is not, it may be a failed write)."""
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert load_config(path) == load_config_dict({})


def test_min_trainers_above_the_clients_sampled_is_a_config_time_error(tmp_path, capsys):
    raw = {"algorithm": "layersel", "algo": {"min_trainers": 3}, "train": {"participation": 0.5},
           "data": {"partition": {"num_clients": 4}}}
    assert main(["check-config", "--config", str(write(tmp_path, raw))]) == 2
    one_error_line(capsys.readouterr().err, "algo.min_trainers", "2 clients sampled per round")
    with pytest.raises(ConfigError, match="min_trainers"):
        preflight(load_config_dict(raw), model=False)  # no model needed


def test_unknown_dataset_stops_serve_and_join(tmp_path, capsys):
    path = write(tmp_path, {"data": {"dataset": "cifar11"}, "deploy": {"insecure": True}})
    for argv in (["serve"], ["join", "--rank", "1"], ["launch-local"]):
        assert main([*argv, "--config", str(path)]) == 2
        one_error_line(capsys.readouterr().err, "data.dataset", "cifar11")


# ------------------------------------------------------------------------------- model-time

def test_an_infeasible_budget_fails_check_config_and_run_before_data(tmp_path, capsys):
    # data.root is empty and downloads are off: had the run got to its data, it would fail there
    raw = {**INFEASIBLE, "data": {"dataset": "cifar10", "root": str(tmp_path / "no-data"), "download": False}}
    path = write(tmp_path, raw)
    for command in ("check-config", "run"):
        assert main([command, "--config", str(path)]) == 2
        one_error_line(capsys.readouterr().err, "algo.budget", "always-trained head", "model cnn for cifar10")
    # the head outside the budgets: a budget must still pay for the cheapest block layer
    assert main(["check-config", "--config", str(path), "--set", "algo.head_in_budget=false",
                 "--set", "algo.budget=0.1", "--set", "model.name=resnet18"]) == 2
    one_error_line(capsys.readouterr().err, "cheapest selectable layer", "resnet18")
    # feasible: accepted, and the probe leaves the global random state as it was
    state = torch.get_rng_state()
    assert main(["check-config", "--config", str(path), "--set", "algo.budget=0.5"]) == 0
    assert torch.equal(torch.get_rng_state(), state)


def test_probe_shapes_come_from_the_config_alone(tmp_path):
    assert probe_shape(load_config_dict({"data": {"dataset": "mnist"}})).in_channels == 1
    assert probe_shape(load_config_dict({"data": {"dataset": "cifar100", "image_size": 64}})).image_size == 64
    folder = load_config_dict({"data": {"dataset": f"imagefolder:{tmp_path}"}})
    assert probe_shape(folder) is None  # its classes and channels are in the files
    silo = load_config_dict({"data": {"image_size": 16}, "deploy": {
        "client_data": "folder", "client_data_dir": "x", "classes": ["a", "b", "c"], "norm_mean": [0.5],
        "norm_std": [0.2]}})
    assert probe_shape(silo, deployed=True).num_classes == 3 and probe_shape(silo, deployed=True).in_channels == 1


def test_an_infeasible_budget_found_with_the_data_is_a_config_error_too(tmp_path, capsys, tiny_folder):  # noqa: F811
    """An image folder's model shape is known only from its files: the check runs when the model is
    built, and is reported the same way."""
    raw = {**INFEASIBLE, "data": {"dataset": f"imagefolder:{tiny_folder}", "cache_dir": str(tmp_path / "cache"),
                                  "partition": {"num_clients": 2, "train_per_class": 4, "test_per_class": 2}},
           "tracking": {"results_dir": str(tmp_path / "results")}}
    assert main(["run", "--config", str(write(tmp_path, raw)), "--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, "algo.budget")


def test_serve_refuses_an_infeasible_budget_before_it_listens(tmp_path):
    from fedselect.fedml_runtime.grpc_channel import port_open
    from fedselect.runner.processes import free_port_block

    port = free_port_block(3)
    raw = {**INFEASIBLE, "data": {"partition": {"num_clients": 2}},
           "deploy": {"insecure": True, "server_port": port},
           "tracking": {"results_dir": str(tmp_path / "results")}}
    exe = Path(sys.executable).with_name("fedselect")
    proc = subprocess.Popen([str(exe), "serve", "--config", str(write(tmp_path, raw))], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listened = False
    while proc.poll() is None:
        listened = listened or port_open("127.0.0.1", port, timeout=0.2)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    one_error_line(err, "algo.budget")
    assert not listened and "serving" not in out


# ------------------------------------------------------------------- files torch cannot read

def test_a_corrupt_data_cache_is_one_line_naming_the_file(tmp_path, capsys, tiny_folder):  # noqa: F811
    raw = {"data": {"dataset": f"imagefolder:{tiny_folder}", "cache_dir": str(tmp_path / "cache")}}
    path = write(tmp_path, raw)
    assert main(["cache-data", "--config", str(path)]) == 0
    (cache,) = (tmp_path / "cache").glob("*.pt")
    for bad in (os.urandom(256), _pickled_object()):
        cache.write_bytes(bad)
        assert main(["cache-data", "--config", str(path)]) == 2
        one_error_line(capsys.readouterr().err, str(cache), "Delete it")


def _pickled_object() -> bytes:
    """A torch.save file holding a Python object weights_only loading refuses."""
    buf = io.BytesIO()
    torch.save({"format": 1, "x": argparse.Namespace(a=1)}, buf)
    return buf.getvalue()


def test_torch_advice_to_drop_weights_only_never_reaches_the_user(tmp_path, caplog):
    from fedml.core.distributed.communication.message import Message  # noqa: F401  (fedml first)

    from fedselect.fedml_runtime.grpc_channel import decode_message
    from fedselect.models import build_model
    from fedselect.models.weights import load_weights
    from fedselect.runner.checkpoint import CheckpointError, read_checkpoint

    file = tmp_path / "x.pt"
    for bad in (_pickled_object(), os.urandom(100), b""):
        file.write_bytes(bad)
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(file)
        assert str(file) in str(caught.value) and "weights_only" not in str(caught.value)
        with pytest.raises(ValueError) as caught:
            load_weights(build_model("cnn", 3, image_size=16), file)
        assert str(file) in str(caught.value) and "weights_only" not in str(caught.value)
    # a wire message: dropped, logged in our words
    from fedselect.fedml_runtime.grpc_channel import FedSelectChannel
    from fedselect.fedml_runtime.receiver import Incoming

    with pytest.raises(Exception) as caught:
        decode_message(_pickled_object())
    assert "weights_only" in str(caught.value)  # torch's own text, which the channel must not pass on
    channel = FedSelectChannel.__new__(FedSelectChannel)
    channel.dropped_messages = 0
    with caplog.at_level(logging.WARNING):
        assert channel.accept(Incoming(_pickled_object(), 1)) is None
    assert "argparse.Namespace" in caplog.text and "weights_only" not in caplog.text
    assert json.dumps(channel.dropped_messages) == "1"
