"""Typed, validated experiment configuration.

One YAML file describes one training run (a study is a set of such runs, see
``workflows/``). The YAML is parsed into frozen dataclasses; every key is checked: an
unknown key, a wrong type or an out-of-range value raises :class:`ConfigError` naming the
dotted key (``train.lr``), before any data is loaded or any model is built.

Algorithm-specific options live under ``algo:`` and are validated against the options
dataclass the algorithm registers (see :mod:`fedselect.registry`).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedselect.dataset_names import accepted_datasets, classify, is_text
from fedselect.deploy_config import DeployConfig
from fedselect.options import ConfigError, build_dataclass, check
from fedselect.registry import validate_algorithm_options

# re-exported: configs and callers raise and catch these; DeployConfig is the ``deploy`` section
__all__ = ["ConfigError", "DeployConfig", "build_dataclass"]


@dataclass(frozen=True)
class PartitionConfig:
    """How the dataset is split over clients (see :mod:`fedselect.data.partition`)."""

    kind: Literal["pathological", "dirichlet", "domain", "column"] = "pathological"
    num_clients: int = 10
    # kind=column: the data column whose values are the clients' domains (a text corpus's column;
    # amazon_reviews has "domain"); clients are spread over its values as kind=domain does
    column: str | None = None
    # pathological (FedRep/FedSelect): s classes per client, samples per class per client
    classes_per_client: int | None = 2
    train_per_class: int | None = 20
    test_per_class: int | None = 100
    # dirichlet label skew
    alpha: float | None = None
    min_train_per_client: int | None = None
    test_per_client: int | None = None
    # dirichlet: mean train samples per client (a class-balanced pool; all samples if unset);
    # domain: at most this many train samples per client
    train_per_client: int | None = None

    def __post_init__(self) -> None:
        check(self.num_clients >= 1, "data.partition.num_clients", "must be >= 1")
        if self.kind == "pathological":
            for key in ("classes_per_client", "train_per_class", "test_per_class"):
                value = getattr(self, key)
                check(value is not None and value >= 1, f"data.partition.{key}",
                       "must be an integer >= 1 for kind=pathological")
            check(self.alpha is None, "data.partition.alpha", "is only used by kind=dirichlet")
        if self.kind == "dirichlet":
            check(self.alpha is not None and self.alpha > 0, "data.partition.alpha",
                   "must be > 0 for kind=dirichlet")
        check((self.kind == "column") == (self.column is not None), "data.partition.column",
              "names the domain column of kind=column, and only of it")

    def partition_params(self) -> dict[str, Any]:
        """The parameters the partitioner of ``kind`` takes (unused keys left out)."""
        if self.kind == "pathological":
            keys = ("num_clients", "classes_per_client", "train_per_class", "test_per_class")
        elif self.kind == "dirichlet":
            keys = ("num_clients", "alpha", "min_train_per_client", "test_per_client", "train_per_client")
        else:
            keys = ("num_clients", "train_per_client", "test_per_client")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where its files are, and how it is partitioned."""

    dataset: str = "cifar10"
    # None: $FEDSELECT_DATA_ROOT, else ./data
    root: str | None = None
    # download with torchvision when files are missing and the network is reachable
    download: bool = True
    # decoded-tensor cache; None: $FEDSELECT_CACHE_DIR, else ~/.cache/fedselect
    cache_dir: str | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    # a partition JSON written by `fedselect partition`; None: computed (and cached) by the run
    partition_file: str | None = None
    # text datasets (amazon_reviews, csv:/jsonl:/parquet:/disk:/hf: corpora): tokens per sample,
    # truncated or padded
    max_length: int = 128
    # text corpora (csv:/jsonl:/parquet:/disk:/hf:): the text and label columns
    text_column: str = "text"
    label_column: str = "label"
    # the label names in order (label id = position); None: the column's ClassLabel names, else
    # its sorted distinct values
    labels: list[str] | None = None
    # a fixed test split: a file of the same format (csv:/jsonl:/parquet:); disk:/hf: use their
    # "test" split when they have one. Without one, test_fraction of each label's rows go to test,
    # drawn with split_seed (fixed across runs, so every method and seed tests on the same rows)
    test_file: str | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    # text files' character encoding (csv:/jsonl:)
    encoding: str = "utf-8"
    # image datasets: resize every batch to this side length (bilinear) before the model; None
    # keeps the stored size. Pretrained ImageNet features need more than CIFAR's 32 pixels.
    image_size: int | None = None

    def __post_init__(self) -> None:
        check(classify(self.dataset) is not None, "data.dataset", f"{self.dataset!r} is unknown: {accepted_datasets()}")
        check(self.max_length >= 8, "data.max_length", "must be >= 8 tokens")
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        check(self.labels is None or len(set(self.labels)) == len(self.labels) >= 2, "data.labels",
              "must list at least two distinct label names")
        check(self.test_file is None or self.dataset.partition(":")[0].lower() in ("csv", "jsonl", "json", "parquet"),
              "data.test_file", "is for csv:/jsonl:/parquet: datasets")
        check(self.image_size is None or self.image_size >= 8, "data.image_size",
               "must be >= 8 pixels, or null to keep the stored size")


BUILTIN_MODELS = ("cnn", "efficientnet_lite0", "minilm", "resnet18", "resnet50")
"""Model names known without importing torch (``fedselect.models`` registers these, plugins may add more)."""
NAMED_WEIGHTS = ("none", "imagenet", "pretrained")


def _registered(attribute: str) -> set[str]:
    """Names a loaded ``fedselect.models`` registry knows beyond the built-ins (plugins); never imports it."""
    models = sys.modules.get("fedselect.models")
    registry = getattr(models, "_MODELS", None) if models is not None else None
    if not isinstance(registry, dict):
        return set()
    if attribute == "names":
        return set(registry)
    return {w for registration in registry.values() for w in getattr(registration, "pretrained", {})}


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and which initial weights (none, a local file, or `imagenet`).

    Checked without importing torch: the name's form, ``model.path`` (an existing folder with a
    config.json) and that ``model.weights`` is a known name or an existing file. A ``timm:`` name
    is checked against timm's list only when the model is built.
    """

    # cnn, resnet18, resnet50, efficientnet_lite0, minilm (or a plugin's); hf: any Hugging Face
    # encoder from model.path; timm:<name>: any timm model, e.g. timm:resnet10t
    name: str = "cnn"
    # null: random init (hf: the folder's own weights); none: random init; a state-dict file
    # (torch.save'd or .safetensors); or a named checkpoint: imagenet, pretrained (minilm, hf)
    weights: str | None = None
    # hf only: the local Hugging Face folder (config.json, weights, tokenizer files)
    path: str | None = None
    # hf only: mean (over non-pad tokens) or cls (first token) of the last hidden states; null: mean
    pooling: Literal["mean", "cls"] | None = None

    def __post_init__(self) -> None:
        name = self.name.strip().lower()
        timm_name = name.startswith("timm:")
        known = sorted(set(BUILTIN_MODELS) | _registered("names"))
        check(name == "hf" or (timm_name and bool(name[5:].strip())) or name in known, "model.name",
              f"unknown model {self.name!r}; accepted: {', '.join(known)}, hf (with model.path) or "
              "timm:<name> (any timm model)")
        for key in ("path", "pooling"):
            check(name == "hf" or getattr(self, key) is None, f"model.{key}", f"is only used by model.name hf, "
                  f"not {self.name!r}")
        if name == "hf":
            check(self.path is not None, "model.path", "is required for model.name hf (a local Hugging Face folder)")
            folder = Path(str(self.path)).expanduser()
            check(folder.is_dir(), "model.path", f"folder not found: {folder}")
            check((folder / "config.json").is_file(), "model.path", f"{folder} has no config.json "
                  "(expected a save_pretrained folder)")
        if self.weights is not None:
            label = self.weights.strip().lower()
            named = set(NAMED_WEIGHTS) | _registered("weights")
            check(label in named or Path(self.weights).expanduser().is_file(), "model.weights",
                  f"file not found: {self.weights} (expected null, {', '.join(sorted(named))} or a state-dict file)")


@dataclass(frozen=True)
class TrainConfig:
    """The federated schedule and the local optimizer shared by all algorithms."""

    rounds: int = 5
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    # fraction of clients sampled per round (K in the papers)
    participation: float = 1.0
    augment: bool = True
    # evaluate all clients every `eval_every` rounds (and always after the last round)
    eval_every: int = 1
    # BatchNorm during local training: "batch" normalizes with batch statistics and updates the
    # running ones (PyTorch's train mode); "frozen" always uses the running statistics and never
    # changes them (the affine weights still train), the usual choice when fine-tuning a
    # pretrained network on small, label-skewed client batches
    norm_stats: Literal["batch", "frozen"] = "batch"
    # BatchNorm running statistics between rounds, for every method: "averaged" over the clients
    # like any shared entry, or "personal": kept on each client and never uploaded (FedBN, and
    # the FedSelect authors' code). Entries a method already keeps personal stay personal.
    norm_buffers: Literal["averaged", "personal"] = "averaged"
    # server weights client updates by their training-set size (False: uniform)
    weighted_aggregation: bool = True
    # a client update with NaN/Inf: "error" stops the run naming the client, "drop" skips it (logged)
    on_bad_update: Literal["error", "drop"] = "error"
    # save the run's whole federated state every `checkpoint_every` rounds and after the last
    # one, to <results_dir>/checkpoints/ (0: never); see fedselect.runner.checkpoint
    checkpoint_every: int = 5
    # continue from this run's checkpoint when there is one (false: start over and overwrite it)
    resume: bool = True
    # forward passes in "fp32" or under "bf16" autocast (weights, gradients, optimizer stay fp32);
    # bf16 is for GPUs (docs/GPU.md): faster on tensor cores, not bit-reproducible, CPU runs slower
    precision: Literal["fp32", "bf16"] = "fp32"
    # image batches and convolution weights in channels-last layout (faster convolutions on GPUs)
    channels_last: bool = False
    # replay each training pass's forward and backward from CUDA graphs (docs/GPU.md): a small
    # model's step is bound by kernel launches and Python, not by the GPU. auto: on for images of
    # at most 64 px a side (after data.image_size) on a CUDA device; off on the CPU, for larger
    # images and for text models (whose forward may wait for the host); true: on, an error
    # without CUDA; false: off
    cuda_graphs: bool | Literal["auto"] = "auto"
    # simulation: train a round's clients side by side, their identical training calls as one
    # batched pass over stacked copies of the model (fedselect.client_batching, docs/GPU.md). For
    # GPUs, where one client's small batches leave the device idle; image models only; not bit
    # for bit the same as one client after the other; no CUDA graphs
    client_batching: bool = False
    # with client_batching: at most this many clients per batched call (0: every client of the
    # round that makes the same call); bounds the GPU memory of the stacked copies
    client_batch_max: int = 0

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "train.rounds", "must be >= 1")
        check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 turns checkpoints off)")
        check(self.local_epochs >= 0, "train.local_epochs", "must be >= 0")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(0 < self.participation <= 1, "train.participation", "must be in (0, 1]")
        check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        check(self.client_batch_max >= 0, "train.client_batch_max", "must be >= 0 (0: no limit)")
        check(not self.client_batch_max or self.client_batching, "train.client_batch_max",
              "is set but train.client_batching is false: it limits batched calls only")
        check(not (self.client_batching and self.cuda_graphs is True), "train.client_batching",
              "is true and train.cuda_graphs is true: batched client training replays no CUDA graphs "
              "(set train.cuda_graphs: auto or false)")


@dataclass(frozen=True)
class TrackingConfig:
    """Where results go and how the MLflow run is named."""

    experiment: str = "fedselect"
    results_dir: str = "results"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<results_dir>/mlflow.db
    tracking_uri: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # the MLflow experiment's description (a study sets its own)
    description: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """One federated training run."""

    algorithm: str = "fedavg"
    seed: int = 0
    # auto: CUDA when available, else CPU
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # algorithm-specific options, validated against the algorithm's own options dataclass
    algo: dict[str, Any] = field(default_factory=dict)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # FedML cross-silo deployment (`fedselect serve | join | launch-local`); unused by `run`
    deploy: DeployConfig = field(default_factory=lambda: DeployConfig())

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        check(not (self.train.cuda_graphs is True and self.device == "cpu"), "train.cuda_graphs",
              "is true but device is cpu: CUDA graphs need a CUDA device")
        check(not (self.train.client_batching and is_text(self.data.dataset)), "train.client_batching",
              f"is true but {self.data.dataset!r} is text: batched client training is for image models")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) that :func:`load_config_dict` turns back into this."""
        return dataclasses.asdict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value in YAML syntax: ``0.1``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a deep copy of ``raw`` with each ``key=value`` override applied."""
    result = copy.deepcopy(dict(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def load_config_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Validate a config mapping (plus ``key=value`` overrides) into an :class:`ExperimentConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(raw).__name__}")
    config = build_dataclass(ExperimentConfig, apply_overrides(raw, overrides))
    validate_algorithm_options(config.algorithm, config.algo)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate a YAML config file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        # an empty file (or one of comments only) is a mistake, not a request for every default:
        # a run would train on cifar10 with defaults. `{}` says "all defaults" on purpose
        raise ConfigError(f"config file {path} is empty (or only comments): it sets nothing, and a run "
                          "would train on every default. Write the settings, or `{}` for all defaults")
    try:
        return load_config_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def dump_config(config: ExperimentConfig) -> str:
    """The config as YAML text (round-trips through :func:`load_config_dict`)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
