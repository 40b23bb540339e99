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

from fedselect.core.aggregate import masked_average
from fedselect.fedml_bridge import fedml_interfaces
from fedselect.options import NoOptions

from .context import Checkpointable, Mask, RunArtifacts, RunContext, resolve_options
from .payload import decode_tensor, validate_upload

_, ServerAggregator = fedml_interfaces()

log = logging.getLogger(__name__)


class BadUpdateError(ValueError):
    """A client upload is malformed or non-finite and must not be averaged in."""


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

    def get_model_params(self) -> OrderedDict[str, torch.Tensor]:
        return self.global_state

    def set_model_params(self, model_parameters: Mapping[str, torch.Tensor]) -> None:
        self.global_state = OrderedDict((k, v) for k, v in model_parameters.items())

    def validate_uploads(self, raw: list[tuple[float, dict[str, Any]]]) -> list[tuple[float, dict[str, Any]]]:
        """Reject (error or drop, per ``train.on_bad_update``) malformed or non-finite uploads."""
        accepted = []
        for num_samples, payload in raw:
            client = payload.get("client_id", "?") if isinstance(payload, Mapping) else "?"
            try:
                weight = _sample_weight(num_samples)
                validate_upload(payload, self.global_state)
            except (KeyError, TypeError, ValueError) as exc:
                if self.ctx.config.train.on_bad_update == "error":
                    raise BadUpdateError(f"rejected update from client {client}: {exc}") from exc
                log.warning("dropping update from client %s: %s", client, exc)
                self.dropped_updates.append((int(client) if str(client).isdigit() else -1, str(exc)))
                continue
            accepted.append((weight, payload))
        return accepted

    def aggregate(self, raw_client_model_or_grad_list: list[tuple[float, dict[str, Any]]]) -> OrderedDict:
        """Each entry becomes the (sample-weighted) mean over the clients that share it.

        Entries no accepted client shares keep their previous global value, so personal
        entries are neither read nor overwritten. Uploads are decoded one tensor at a time, so
        the server never holds every client's full model at once (100 ResNet-18 clients).
        """
        accepted = self.validate_uploads(raw_client_model_or_grad_list)
        if not accepted:
            log.warning("no client update accepted this round; the global model is unchanged")
            return OrderedDict(self.global_state)
        weighted = self.ctx.config.train.weighted_aggregation
        new_state: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.global_personal_mask = {}
        for name, old in self.global_state.items():
            decoded = [(n, decode_tensor(payload, name, old)) for n, payload in accepted]
            if not old.is_floating_point():
                # integer buffers (BatchNorm's num_batches_tracked) are counts, not averages
                sent = [d[0] for _, d in decoded if d is not None]
                new_state[name] = torch.stack(sent).amax(dim=0) if sent else old
                continue
            # a tensor a client did not send at all is personal to it in every entry
            values = [{name: d[0] if d is not None else old} for _, d in decoded]
            masks = [{name: ~d[1] if d is not None else torch.ones_like(old, dtype=torch.bool)} for _, d in decoded]
            weights = [n if weighted else 1.0 for n, _ in decoded]
            averaged, global_mask = masked_average({name: old}, values, masks, weights)
            new_state[name] = averaged[name]
            self.global_personal_mask[name] = global_mask[name]
        return new_state

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
