"""Any Hugging Face encoder from a local folder (``model: {name: hf, path: DIR, pooling: mean|cls}``).

The folder is what ``save_pretrained`` writes (or a Hub snapshot copied by hand): ``config.json``,
the weights (``model.safetensors`` or ``pytorch_model.bin``) and the tokenizer files. Everything is
read with ``local_files_only=True`` under :func:`fedselect.models.text.hf_offline`: nothing is ever
downloaded. The encoder is ``transformers.AutoModel`` for the folder's config, wrapped like MiniLM
(:class:`fedselect.models.text.MiniLMClassifier`): pooling (mean over non-pad tokens, or the first
token) and a linear head for the dataset's classes. A BERT-style pooler is left out where the model
class accepts ``add_pooling_layer=False`` (mean/first-token pooling never uses it).

Weights: ``null`` or ``pretrained``: the folder's own weights (the head is new); ``none``: random
init from the folder's config (seeded by the caller); a file: a state dict of the whole classifier
(``backbone.*`` and ``classifier.*``, e.g. one saved after a run), loaded by
:func:`fedselect.models.load_weights`.

Layer groups, found from the module tree rather than written per architecture:

* the encoder layers are the ``nn.ModuleList`` under the backbone with ``config.num_hidden_layers``
  entries (the largest such list by parameter count; the largest list of any length when none has
  that many): one block group ``layer.<i>`` per entry;
* ``embeddings`` (the stem, frozen by layer selection): every backbone parameter registered before
  the first layer (word/position/type embeddings and their norm);
* ``head``: the classifier, plus any backbone parameter registered after the last layer (a final
  norm, a pooler the model insists on): the group that is always trained.

Encoder-decoder models (T5, BART) are refused: their AutoModel needs decoder inputs; an encoder-only
checkpoint of them is a different folder.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedselect.models.groups import GroupSpec, register_layer_groups, spec_from_assignment
from fedselect.models.text import POOLINGS, MiniLMClassifier, hf_offline, load_minilm_tokenizer
from fedselect.options import ConfigError

__all__ = ["HFEncoderClassifier", "build_hf", "check_hf_folder", "hf_group_spec", "hf_layer_list"]

logger = logging.getLogger(__name__)

_SPEC_CACHE = "_fedselect_group_spec"
_PRETRAINED = ("pretrained",)


class HFEncoderClassifier(MiniLMClassifier):
    """A Hugging Face encoder from a local folder with pooling and a linear head (see the module docstring).

    Attributes:
        source: The folder the encoder came from.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, hidden_size: int, pad_id: int,
                 pooling: str, source: Path) -> None:
        super().__init__(backbone, num_classes, hidden_size=hidden_size, pad_id=pad_id, pooling=pooling)
        self.source = source


def check_hf_folder(path: str | os.PathLike[str] | None) -> Path:
    """The folder of ``model.path``, checked to exist and to hold a ``config.json``.

    Raises:
        ConfigError: Unset, missing, or no config.json (the message names ``model.path``).
    """
    if path is None:
        raise ConfigError("config key 'model.path' is required for model.name hf (a local Hugging Face folder)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"config key 'model.path' folder not found: {folder} (resolved: {folder.resolve()})")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"config key 'model.path' {folder} has no config.json (expected a save_pretrained folder)")
    return folder


def hf_layer_list(backbone: nn.Module, num_layers: int | None) -> str:
    """Module name (under ``backbone``) of the encoder's list of layers (see the module docstring).

    Raises:
        ValueError: The backbone has no non-empty ``nn.ModuleList``.
    """
    candidates = [(name, module) for name, module in backbone.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0 and name]
    if not candidates:
        raise ValueError(f"cannot find the encoder layers of {type(backbone).__name__}: it has no nn.ModuleList")
    exact = [c for c in candidates if num_layers is not None and len(c[1]) == num_layers]

    def size(candidate: tuple[str, nn.Module]) -> int:
        return sum(p.numel() for p in candidate[1].parameters())

    return max(exact or candidates, key=size)[0]


def hf_group_spec(model: nn.Module) -> tuple[GroupSpec, ...]:
    """``embeddings``, ``layer.0`` .. ``layer.<n-1>``, ``head`` (computed once per model, then cached)."""
    cached = model.__dict__.get(_SPEC_CACHE)
    if cached is not None:
        return cached
    config = getattr(model.backbone, "config", None)
    layers = f"backbone.{hf_layer_list(model.backbone, getattr(config, 'num_hidden_layers', None))}"
    count = len(model.get_submodule(layers))
    assignment: dict[str, str] = {}
    seen_layer = False
    for name, _ in model.named_parameters():
        if name.startswith(layers + "."):
            assignment[name] = f"layer.{name[len(layers) + 1:].split('.', 1)[0]}"
            seen_layer = True
        elif name.startswith("backbone.") and not seen_layer:
            assignment[name] = "embeddings"
        else:
            assignment[name] = "head"
    order = ["embeddings", *(f"layer.{i}" for i in range(count)), "head"]
    roles = {g: "stem" if g == "embeddings" else "head" if g == "head" else "block" for g in order}
    spec = spec_from_assignment(model, assignment, order, roles)
    model.__dict__[_SPEC_CACHE] = spec
    return spec


register_layer_groups(HFEncoderClassifier, hf_group_spec)


def _read_config(transformers: Any, folder: Path) -> Any:
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"config key 'model.path' {folder}: transformers cannot read its config.json "
                          f"({exc})") from exc
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"config key 'model.path' {folder} holds an encoder-decoder model "
                          f"({config.model_type}); name hf takes encoder-only models (BERT, RoBERTa, ...)")
    return config


def _backbone_kwargs(transformers: Any, config: Any) -> dict[str, Any]:
    """``add_pooling_layer=False`` where the config's model class takes it (see the module docstring)."""
    model_class = transformers.MODEL_MAPPING.get(type(config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def _pad_id(config: Any, folder: Path) -> int:
    if getattr(config, "pad_token_id", None) is not None:
        return int(config.pad_token_id)
    try:
        pad = load_minilm_tokenizer(folder).pad_token_id
    except (OSError, ValueError):
        pad = None
    if pad is None:
        raise ConfigError(f"config key 'model.path' {folder}: neither config.json nor the tokenizer names a pad "
                          "token; the classifier needs one to mask padding")
    return int(pad)


def _pretrained_backbone(transformers: Any, folder: Path, kwargs: dict[str, Any]) -> nn.Module:
    try:
        backbone, info = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key 'model.path' {folder}: cannot load its weights ({exc}); "
                          "weights: none builds the encoder from config.json with random init") from exc
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(f"the checkpoint in {folder} does not fit {type(backbone).__name__}: "
                         f"missing {missing[:3]} ({len(missing)} in all), mismatched {mismatched[:3]}")
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        logger.info("ignoring %d checkpoint tensors the encoder does not use (e.g. %s)", len(unexpected), unexpected[0])
    return backbone


def build_hf(num_classes: int, *, path: str | os.PathLike[str] | None, pooling: str | None = None,
             weights: str | os.PathLike[str] | None = None) -> HFEncoderClassifier:
    """The encoder of the folder ``path`` with ``pooling`` and a head of ``num_classes``.

    Args:
        num_classes: Output width of the head.
        path: The Hugging Face folder (``model.path``).
        pooling: ``"mean"`` (default) or ``"cls"``.
        weights: ``None`` or ``"pretrained"``: the folder's weights; anything else (``"none"``, a
            state-dict file loaded afterwards by the caller): random init from the folder's config.

    Raises:
        ConfigError: A bad ``model.path`` or ``model.pooling``.
        ValueError: The folder's checkpoint does not fit its own config.
    """
    pooling = pooling or "mean"
    if pooling not in POOLINGS:
        raise ConfigError(f"config key 'model.pooling' must be one of {list(POOLINGS)}, got {pooling!r}")
    folder = check_hf_folder(path)
    pretrained = weights is None or str(weights).strip().lower() in _PRETRAINED
    with hf_offline() as transformers:
        config = _read_config(transformers, folder)
        kwargs = _backbone_kwargs(transformers, config)
        if pretrained:
            backbone = _pretrained_backbone(transformers, folder, kwargs)
        else:
            backbone = transformers.AutoModel.from_config(config, dtype=torch.float32, **kwargs)
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        raise ConfigError(f"config key 'model.path' {folder}: config.json has no hidden_size")
    return HFEncoderClassifier(backbone.float(), num_classes, hidden_size=int(hidden), pad_id=_pad_id(config, folder),
                               pooling=pooling, source=folder)
