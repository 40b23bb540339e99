"""One federation built from a config: data, partition, model, transform, run context, clients, server.

Every runtime builds through here: the single-process simulation (:func:`build_federation`),
the cross-silo server and clients (:func:`initial_model_and_context` for data they describe
rather than hold) and the benches. So a pretrained model's input statistics, the seeded
initialization and the resolved algorithm options are the same wherever a run happens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedselect.algorithms.base import FedAvgClient, FedAvgServer
from fedselect.algorithms.context import RunContext
from fedselect.config import ExperimentConfig
from fedselect.cpu_pooling import use_channels_last_max_pool, use_channels_last_stems
from fedselect.data import (
    ImageData,
    Partition,
    TextData,
    TextFileOptions,
    TokenTransform,
    load_dataset,
    make_partition,
    partition_key,
)
from fedselect.dataset_names import classify
from fedselect.engine import ClientDataset, ImageTransform, configure_device
from fedselect.models import build_model_from_config, pretrained_input_stats
from fedselect.models.text import tokenizer_path
from fedselect.options import ConfigError, check
from fedselect.registry import AlgorithmSpec, get_algorithm, validate_algorithm_options


def resolve_algorithm(config: ExperimentConfig) -> tuple[AlgorithmSpec, Any]:
    """The configured algorithm and its options, resolved once (every default filled in)."""
    return get_algorithm(config.algorithm), validate_algorithm_options(config.algorithm, config.algo)


def partition_spec(config: ExperimentConfig) -> dict[str, Any]:
    """What identifies a partition: every method of a study with the same spec shares it."""
    p = config.data.partition
    column = {"column": p.column} if p.column is not None else {}
    return {"kind": p.kind, "seed": config.seed, **p.partition_params(), **column}


def default_partition_path(config: ExperimentConfig) -> Path:
    key = partition_key(config.data.dataset, partition_spec(config))
    # a corpus named by its path (csv:/data/x.csv) gives a file name without its slashes
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.data.dataset).strip("_")[-60:]
    return Path(config.tracking.results_dir) / "partitions" / f"{stem}-{key}.json"


def load_data(config: ExperimentConfig) -> ImageData | TextData:
    """The configured dataset: images (decoded tensors) or text (token ids, by the model's tokenizer)."""
    data = config.data
    kind = classify(data.dataset)
    if kind is not None and kind[0] == "text_file":
        column = data.partition.column if data.partition.kind == "column" else None
        options = TextFileOptions(text_column=data.text_column, label_column=data.label_column,
                                  labels=tuple(data.labels) if data.labels else None, test_file=data.test_file,
                                  test_fraction=data.test_fraction, split_seed=data.split_seed,
                                  encoding=data.encoding, domain_column=column)
        return load_dataset(data.dataset, data.root, cache_dir=data.cache_dir, options=options,
                            tokenizer_folder=tokenizer_path(config.model), max_length=data.max_length)
    if kind is not None and kind[0] == "text":
        if data.partition.kind == "column" and data.partition.column != "domain":
            raise ConfigError(f"config key 'data.partition.column': {data.dataset} has one column to split "
                              f"by, 'domain' (got {data.partition.column!r})")
        return load_dataset(data.dataset, data.root, download=data.download, cache_dir=data.cache_dir,
                            max_length=data.max_length, tokenizer_path=tokenizer_path(config.model))
    return load_dataset(data.dataset, data.root, download=data.download, cache_dir=data.cache_dir)


def data_transform(config: ExperimentConfig, data: ImageData | TextData) -> Callable[..., torch.Tensor]:
    """What turns a stored batch into model input: normalization (+ augmentation, resize) or nothing for tokens.

    Images are normalized with the statistics pretrained weights were trained with, if the model
    declares them, else with the dataset's own.
    """
    if isinstance(data, TextData):
        return TokenTransform()
    return image_transform(config, data.mean, data.std)


def image_transform(config: ExperimentConfig, data_mean: Sequence[float], data_std: Sequence[float]) -> ImageTransform:
    """The config's image transform; the data's (mean, std) count only where the weights declare none."""
    mean, std = pretrained_input_stats(config.model.name, config.model.weights) or (data_mean, data_std)
    return ImageTransform(tuple(mean), tuple(std), augment=config.train.augment, resize=config.data.image_size,
                          channels_last=config.train.channels_last)


def on_device(config: ExperimentConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The run's model on its device, in the configured memory layout, with the device set up for it."""
    check(device.type == "cuda" or config.train.cuda_graphs is not True, "train.cuda_graphs",
          f"is true but the run's device is {device.type} (device: {config.device}): CUDA graphs need a CUDA device")
    configure_device(device)
    model = model.to(device)
    # same bits, faster (fedselect.cpu_pooling); their layout checks cannot run under vmap, so
    # not for batched clients (a CPU run batches only to be checked against one client at a time)
    if device.type == "cpu" and not config.train.client_batching:
        use_channels_last_max_pool(model)
        if not config.train.channels_last:  # a channels-last model's layout is its own
            use_channels_last_stems(model)
    return model.to(memory_format=torch.channels_last) if config.train.channels_last else model


def build_run_model(config: ExperimentConfig, data: ImageData | TextData) -> torch.nn.Module:
    """The configured model for ``data`` (random init seeded by the caller, or loaded weights)."""
    shape = {} if isinstance(data, TextData) else {"in_channels": data.in_channels,
                                                   "image_size": config.data.image_size or data.image_size}
    return build_model_from_config(config.model, data.num_classes, **shape)


def compute_partition(config: ExperimentConfig, data: ImageData | TextData) -> Partition:
    """A new partition of ``data`` for the config's spec and seed (deterministic).

    A ``domain`` partition splits by the samples' domains (one product category per client for
    the Amazon reviews), a ``column`` partition the same way by a corpus column's values (the
    loader made them the domains), every other kind by their labels.
    """
    kind = config.data.partition.kind
    if kind in ("domain", "column"):
        if not isinstance(data, TextData):
            raise ConfigError(f"config key 'data.partition.kind': {kind!r} needs a text dataset with domains "
                              f"(amazon_reviews, or a corpus's column); {config.data.dataset!r} has none")
        train, test = data.train_domains.numpy(), data.test_domains.numpy()
    else:
        train, test = data.train_y.numpy(), data.test_y.numpy()
    partition = make_partition(data.name, kind, train, test, seed=config.seed,
                               **config.data.partition.partition_params())
    if kind == "column":  # the domain partitioner's result, recorded as what it is
        partition.kind = "column"
        partition.spec = {**partition.spec, "kind": "column", "column": config.data.partition.column}
    return partition


def get_partition(config: ExperimentConfig, data: ImageData | TextData) -> Partition:
    """The configured partition file, else the cached one for this spec, else a new one (saved)."""
    if config.data.partition_file:
        try:
            partition = Partition.load(config.data.partition_file)
            spec = partition_spec(config)
            if partition.dataset != data.name or any(partition.spec.get(k) != v for k, v in spec.items()):
                raise ValueError(f"partition file {config.data.partition_file} was made for {partition.dataset} "
                                 f"{partition.spec}, the config asks for {data.name} {spec}")
            partition.validate(len(data.train_y), len(data.test_y), num_clients=config.data.partition.num_clients,
                               source=config.data.partition_file)
        except ValueError as exc:
            raise ConfigError(f"config key 'data.partition_file': {exc}") from None
        return partition
    path = default_partition_path(config)
    if path.exists():
        try:
            partition = Partition.load(path)
            partition.validate(len(data.train_y), len(data.test_y), num_clients=config.data.partition.num_clients,
                               source=path)
        except ValueError as exc:
            raise ConfigError(f"{exc} (a cached partition: delete it and it is computed again)") from None
        return partition
    partition = compute_partition(config, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    partition.save(path)
    return partition


def client_split(data: ImageData | TextData, partition: Partition, cid: int) -> ClientDataset:
    """Client ``cid``'s own rows of ``data`` (copies: the rest of a shared dataset can be dropped)."""
    tr = torch.as_tensor(np.asarray(partition.train_indices[cid]), dtype=torch.long)
    te = torch.as_tensor(np.asarray(partition.test_indices[cid]), dtype=torch.long)
    return ClientDataset(data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te])


def client_datasets(data: ImageData | TextData, partition: Partition, device: torch.device) -> list[ClientDataset]:
    return [client_split(data, partition, cid).to(device) for cid in range(partition.num_clients)]


def text_model_and_context(config: ExperimentConfig, options: Any, device: torch.device, *,
                           num_classes: int) -> tuple[torch.nn.Module, RunContext]:
    """The seeded initial text model (token ids in) and its run context: what a cross-silo process builds
    from the clients' text descriptors."""
    torch.manual_seed(config.seed)
    model = on_device(config, build_model_from_config(config.model, num_classes), device)
    return model, RunContext(config=config, options=options, device=device, transform=TokenTransform())


def initial_model_and_context(config: ExperimentConfig, options: Any, device: torch.device, *, num_classes: int,
                              in_channels: int, image_size: int, mean: Sequence[float],
                              std: Sequence[float]) -> tuple[torch.nn.Module, RunContext]:
    """The seeded initial model and the run context for image data of this shape and statistics:
    what a cross-silo process builds from the clients' descriptors, as the simulation does from the data."""
    torch.manual_seed(config.seed)
    side = config.data.image_size or image_size  # what the model sees, after any resize
    model = on_device(config, build_model_from_config(config.model, num_classes, in_channels=in_channels,
                                                      image_size=side), device)
    ctx = RunContext(config=config, options=options, device=device, transform=image_transform(config, mean, std),
                     image_size=side)
    return model, ctx


@dataclass
class Federation:
    """Everything a simulated run trains: one model shared by all client trainers, and the server."""

    config: ExperimentConfig
    spec: AlgorithmSpec
    options: Any
    device: torch.device
    data: ImageData | TextData
    partition: Partition
    client_data: list[ClientDataset]
    model: torch.nn.Module
    ctx: RunContext
    clients: list[FedAvgClient]
    server: FedAvgServer

    @property
    def partition_key(self) -> str:
        return partition_key(self.data.name, partition_spec(self.config))


def input_image_size(config: ExperimentConfig, data: ImageData | TextData) -> int | None:
    """The side of the images the model sees (``data.image_size`` when set, else the stored one); None for text."""
    if isinstance(data, TextData):
        return None
    return config.data.image_size or int(data.train_x.shape[-1])


def build_participants(config: ExperimentConfig, model: torch.nn.Module, client_data: Sequence[ClientDataset], *,
                       device: torch.device, args: Any, transform: Callable[..., torch.Tensor],
                       algorithm: tuple[AlgorithmSpec, Any] | None = None, image_size: int | None = None
                       ) -> tuple[RunContext, list[FedAvgClient], FedAvgServer]:
    """The algorithm's client trainers (one per dataset, all on ``model``) and server, sharing one context.

    ``algorithm``: the already resolved :func:`resolve_algorithm` result, else it is resolved here.
    ``image_size``: the model's input side (None for text; :func:`input_image_size`).
    """
    spec, options = algorithm or resolve_algorithm(config)
    ctx = RunContext(config=config, options=options, device=device, transform=transform, image_size=image_size)
    clients = [spec.client_cls(model, args, client_id=cid, data=d, ctx=ctx) for cid, d in enumerate(client_data)]
    return ctx, clients, spec.server_cls(model, args, ctx=ctx)


def build_federation(config: ExperimentConfig, device: torch.device, args: Any, *,
                     data: ImageData | TextData | None = None,
                     algorithm: tuple[AlgorithmSpec, Any] | None = None) -> Federation:
    """Config -> data, partition, seeded model, transform, context, clients and server (simulation).

    ``algorithm``: the already resolved :func:`resolve_algorithm` result, else it is resolved here.
    """
    spec, options = algorithm = algorithm or resolve_algorithm(config)
    data = data if data is not None else load_data(config)
    partition = get_partition(config, data)
    client_data = client_datasets(data, partition, device)
    torch.manual_seed(config.seed)
    model = on_device(config, build_run_model(config, data), device)
    ctx, clients, server = build_participants(config, model, client_data, device=device, args=args,
                                              transform=data_transform(config, data), algorithm=algorithm,
                                              image_size=input_image_size(config, data))
    return Federation(config, spec, options, device, data, partition, client_data, model, ctx, clients, server)
