"""What one cross-silo client holds and tells the server: its own data and a descriptor of it.

A client loads only its rows: its entry of the configured partition, or its own ImageFolder
tree (``deploy.client_data: folder``). The server checks that all descriptors agree on what a
federation must share (:data:`SHARED_DATA_KEYS`) and that every client trains the server's
config (:func:`training_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from fedselect.config import ExperimentConfig
from fedselect.data import TextData, load_image_dataset, partition_key
from fedselect.engine import ClientDataset
from fedselect.fedml_runtime.messages import FederationError
from fedselect.options import ConfigError

from .federation import client_split, get_partition, load_data, partition_spec

# descriptor keys every client of one federation must agree on
SHARED_DATA_KEYS = ("dataset", "modality", "partition_key", "classes", "in_channels", "image_shape", "max_length",
                    "mean", "std")


def training_fingerprint(config: ExperimentConfig) -> str:
    """What server and clients must share beyond the data: algorithm, options, model, schedule, seed."""
    d = config.to_dict()
    keys = ("algorithm", "seed", "algo", "model", "train")
    return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def load_silo_data(config: ExperimentConfig, client_id: int, device: torch.device) -> tuple[ClientDataset,
                                                                                                 dict[str, Any]]:
    """This client's own data (on ``device``) and its descriptor for the server."""
    d = config.deploy
    if d.client_data == "folder":
        own, data = folder_data(config, client_id)
        mean, std, classes, key = list(d.norm_mean), list(d.norm_std), list(d.classes), None
        if len(mean) != data.in_channels:
            raise ConfigError(f"config key 'deploy.norm_mean' has {len(mean)} values, the images in "
                              f"{d.client_data_dir} have {data.in_channels} channels")
    else:
        data = load_data(config)
        partition = get_partition(config, data)
        if partition.num_clients != config.data.partition.num_clients:
            raise ConfigError(f"the partition has {partition.num_clients} clients, the config "
                              f"{config.data.partition.num_clients}")
        # only this client's rows are kept; the rest of a shared dataset is dropped here
        own = client_split(data, partition, client_id)
        text = isinstance(data, TextData)  # token ids: no channels, image size or pixel statistics
        mean, std = ([], []) if text else (list(data.mean), list(data.std))
        classes, key = list(data.classes), partition_key(data.name, partition_spec(config))
    text = own.train_x.dim() == 2
    descriptor = {
        "training": training_fingerprint(config), "modality": "text" if text else "image",
        "dataset": config.data.dataset, "partition_key": key, "classes": classes,
        "in_channels": None if text else int(own.train_x.shape[1]),
        "image_shape": None if text else [int(own.train_x.shape[2]), int(own.train_x.shape[3])],
        "max_length": int(own.train_x.shape[1]) if text else None,
        "mean": mean, "std": std, "num_train": own.num_train, "num_test": own.num_test,
        "train_class_counts": np.bincount(own.train_y.numpy(), minlength=len(classes)).tolist(),
        "test_class_counts": np.bincount(own.test_y.numpy(), minlength=len(classes)).tolist(),
    }
    return own.to(device), descriptor


def folder_data(config: ExperimentConfig, client_id: int) -> tuple[ClientDataset, Any]:
    """This client's ImageFolder tree, labels indexed by ``deploy.classes`` (whatever subset it holds)."""
    d = config.deploy
    folder = str(d.client_data_dir).format(rank=client_id + 1, client=client_id)
    data = load_image_dataset(f"imagefolder:{folder}", cache_dir=config.data.cache_dir)
    label = {name: i for i, name in enumerate(d.classes)}
    unknown = sorted(set(data.classes) - set(label))
    if unknown:
        raise ConfigError(f"{folder} has class folders {unknown} not in config key 'deploy.classes'")
    remap = torch.tensor([label[name] for name in data.classes], dtype=torch.long)
    return ClientDataset(data.train_x, remap[data.train_y], data.test_x, remap[data.test_y]), data


def check_descriptors(descriptors: dict[int, dict[str, Any]], training: str | None = None) -> dict[str, Any]:
    """What all clients agree on (else an error naming the first client that differs); each must also
    train what the server's config says (``training``: :func:`training_fingerprint`)."""
    for cid, d in sorted(descriptors.items()):
        if training is not None and d.get("training") != training:
            raise FederationError(f"client {cid} (rank {cid + 1}) runs another training config than the server "
                                  "(algorithm, seed, algo, model or train differ): use the same config file")
    first, *rest = sorted(descriptors)
    common = {k: descriptors[first][k] for k in SHARED_DATA_KEYS}
    for cid in rest:
        for key in SHARED_DATA_KEYS:
            if descriptors[cid][key] != common[key]:
                raise FederationError(f"client {cid}'s data differ from client {first}'s in '{key}': "
                                      f"{descriptors[cid][key]!r} vs {common[key]!r}")
    return common
