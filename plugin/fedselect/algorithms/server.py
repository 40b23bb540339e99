"""FedAvg's server on the mask mechanism: each entry averaged over the clients that share it."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedselect.core.aggregate import MaskedMean
from fedselect.fedml_bridge import fedml_interfaces
from fedselect.options import NoOptions

from .context import Checkpointable, Mask, RunArtifacts, RunContext, resolve_options
from .payload import LocalUpload, decode_tensor, validate_upload

_, ServerAggregator = fedml_interfaces()

log = logging.getLogger(__name__)


class BadUpdateError(ValueError):
    """A client upload is malformed or non-finite and must not be averaged in."""


def _check_finite_shared(upload: LocalUpload) -> None:
    """ValueError naming the first tensor with a non-finite shared entry.

    First one plain sum per whole tensor, read back with one host synchronisation: when every
    sum is finite, so is every entry, shared or not. Otherwise (a NaN or Inf somewhere, perhaps
    only in personal entries, or a float32 sum that overflowed) the shared entries are summed in
    float64, and only an upload that still fails is searched entry by entry.
    """
    names = [n for n, v in upload.state.items() if v.is_floating_point() and upload.kind(n) != "personal"]
    if not names:
        return
    if bool(torch.isfinite(torch.stack([upload.state[n].detach().sum() for n in names])).all()):
        return
    sums = torch.stack([_shared(upload, n).sum(dtype=torch.float64) for n in names])
    if bool(torch.isfinite(sums).all()):
        return
    for name in names:  # (a float64 tensor's sum may overflow with every entry finite: then accepted)
        if not bool(torch.isfinite(_shared(upload, name)).all()):
            raise ValueError(f"non-finite values in '{name}'")


def _shared(upload: LocalUpload, name: str) -> torch.Tensor:
    """The tensor with its personal entries zeroed (never read: NaN there stays home)."""
    value = upload.state[name].detach()
    return value if upload.kind(name) == "whole" else torch.where(upload.personal_mask[name], 0.0, value)


def _sample_weight(num_samples: Any) -> float:
    """An upload's averaging weight: a finite, positive sample count."""
    try:
        weight = float(num_samples)
    except (TypeError, ValueError):
        raise ValueError(f"sample count {num_samples!r} is not a number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"sample count {num_samples!r} must be finite and > 0")
    return weight


class FedAvgServer(Checkpointable, ServerAggregator):
    """Server of the mask mechanism: entry-wise (weighted) average over the clients sharing it.

    Its hooks (planning, round metrics, artifacts) are declared here with FedAvg's behaviour.
    """

    checkpoint_attributes = ("global_state", "global_personal_mask", "dropped_updates")
    # the options of an algorithm whose server has its own (layer selection), as on its client
    Options: ClassVar[type] = NoOptions

    def __init__(self, model: nn.Module, args: Any, *, ctx: RunContext) -> None:
        super().__init__(model, args)
        self.ctx = ctx
        self.options = resolve_options(ctx, type(self).Options)
        self.global_state: OrderedDict[str, torch.Tensor] = OrderedDict(
            (k, v.detach().clone()) for k, v in model.state_dict().items())
        self.dropped_updates: list[tuple[int, str]] = []
        # m_G: entries personal to at least one client of the last round (FedSelect's global mask)
        self.global_personal_mask: Mask = {}
        self.begin_round()

    def get_model_params(self) -> OrderedDict[str, torch.Tensor]:
        return self.global_state

    def set_model_params(self, model_parameters: Mapping[str, torch.Tensor]) -> None:
        self.global_state = OrderedDict((k, v) for k, v in model_parameters.items())

    # ---- the round's running average: uploads are added as they arrive ------------------
    def begin_round(self) -> None:
        """Start this round's average (:class:`MaskedMean`): nothing of an upload is kept but its sums."""
        self._mean = MaskedMean(self.global_state)
        self._accepted = 0

    def add_upload(self, num_samples: Any, payload: Any) -> bool:
        """Validate a wire upload (:func:`validate_upload`) and add it; False when it was dropped."""
        client = payload.get("client_id", "?") if isinstance(payload, Mapping) else "?"
        try:
            weight = _sample_weight(num_samples)
            validate_upload(payload, self.global_state)
        except (KeyError, TypeError, ValueError) as exc:
            return self._reject(client, exc)
        for name, old in self.global_state.items():
            decoded = decode_tensor(payload, name, old)
            if decoded is None:
                self._mean.skip(name)
            else:
                self._mean.add(name, decoded[0], None if name in payload["tensors"] else decoded[1],
                               self._weight(weight))
        self._accepted += 1
        return True

    def add_local_upload(self, upload: LocalUpload) -> bool:
        """Add a simulated client's live state (no encoding); False when it was dropped.

        Checked like a wire upload where it can differ from one: the sample count, tensor names,
        and finiteness of the shared entries (one host synchronisation for the whole upload).
        """
        try:
            weight = _sample_weight(upload.num_samples)
            unknown = sorted(set(upload.state) - set(self.global_state))
            if unknown:
                raise ValueError(f"upload has tensor '{unknown[0]}' that the global model lacks")
            _check_finite_shared(upload)
        except ValueError as exc:
            return self._reject(upload.client_id, exc)
        for name in self.global_state:
            kind = upload.kind(name) if name in upload.state else "personal"
            if kind == "personal":
                self._mean.skip(name)
            elif kind == "whole":
                self._mean.add(name, upload.state[name].detach(), None, self._weight(weight))
            else:
                self._mean.add_personal(name, upload.state[name].detach(), upload.personal_mask[name],
                                        self._weight(weight))
        self._accepted += 1
        return True

    def end_round(self) -> OrderedDict[str, torch.Tensor]:
        """The round's new global state (set by the runtime after ``on_after_aggregation``).

        Each entry is the (sample-weighted) mean over the accepted clients that share it; entries no
        accepted client shares keep their previous global value, so personal entries are neither
        read nor overwritten.
        """
        if not self._accepted:
            log.warning("no client update accepted this round; the global model is unchanged")
            return OrderedDict(self.global_state)
        new_state, self.global_personal_mask = self._mean.result()
        self._mean = MaskedMean(self.global_state)  # drop the float64 sums between rounds
        return OrderedDict((name, new_state[name]) for name in self.global_state)

    def aggregate(self, raw_client_model_or_grad_list: list[tuple[float, dict[str, Any]]]) -> OrderedDict:
        """FedML's list interface (cross-silo): each wire upload added in turn, then the mean."""
        self.begin_round()
        for num_samples, payload in raw_client_model_or_grad_list:
            self.add_upload(num_samples, payload)
        return self.end_round()

    def _weight(self, num_samples: float) -> float:
        return num_samples if self.ctx.config.train.weighted_aggregation else 1.0

    def _reject(self, client: Any, exc: Exception) -> bool:
        """Per ``train.on_bad_update``: raise, or log and record the dropped update."""
        if self.ctx.config.train.on_bad_update == "error":
            raise BadUpdateError(f"rejected update from client {client}: {exc}") from exc
        log.warning("dropping update from client %s: %s", client, exc)
        self.dropped_updates.append((int(client) if str(client).isdigit() else -1, str(exc)))
        return False

    # ---- hooks an algorithm overrides -------------------------------------------------
    def needs_plan(self, round_idx: int) -> bool:
        """Whether round ``round_idx`` starts with a planning exchange (clients' plan_report up,
        :meth:`plan_round`'s plans down). FedAvg: never."""
        return False

    def plan_round(self, round_idx: int, reports: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """One JSON-safe plan per reporting client, from their reports."""
        return {cid: {} for cid in reports}

    def round_metrics(self) -> dict[str, float]:
        """Server-side figures of the round just aggregated, to log (layer selection: its solve)."""
        return {}

    def run_artifacts(self, out_dir: Path) -> RunArtifacts:
        """Files and record fields the server writes at the end of a run (layer selection: the
        selection of every round)."""
        return RunArtifacts()

    def test(self, test_data: Any, device: Any, args: Any) -> None:
        """The server holds no data: evaluation happens on every client's own test split."""
        return None
