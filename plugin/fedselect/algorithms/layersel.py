"""Selective layer fine-tuning (arXiv 2408.15600) as a two-phase FedML algorithm ``layersel``.

Its difference from FedAvg, on the mask mechanism of :mod:`fedselect.algorithms.base`
(nothing is personal but what ``train.norm_buffers: personal`` keeps home; what changes is which
layers each client trains):

1. planning (the extra round trip): each sampled client takes the loss gradient of the received
   global model on ``score_batches`` local batches (counted as local work) and reports one score
   per selectable layer (squared gradient norm for the paper's method, SNR or RGN for those
   baselines; nothing for position-based strategies);
2. the server picks each client's layers under its budget (:func:`fedselect.core.selection.select_layers`;
   the paper's MILP for ``strategy: ilp``) and sends each client its list;
3. the client trains only those layers for E epochs: every other parameter has
   ``requires_grad=False`` (no gradient work below the lowest selected layer, no weight
   gradients elsewhere) and normalization layers of unselected blocks keep their statistics,
   so unselected layers leave local training bit-identical;
4. the client uploads only the layers it trained; the server averages each layer over the
   clients that trained it (weighted by data size; the paper's Eq. 7) and leaves the others
   unchanged, or with ``aggregation: sampled`` counts every other sampled client as a zero update
   (:func:`fedselect.core.selection_round.trainer_share`).

Every round logs, beside the solve's figures, how many clients train each layer
(``selection_trainers_<layer>``, and ``selection_single_trainer_layers``), the share of the raw
score mass in the always-trained head when it is scored (``selection_required_score_share``) and
each client's unused budget in cost units (``selection_unused_budget_client_<id>`` and its mean).

Candidate layers are the model's ``block`` groups plus the ``head``; the ``stem`` (embeddings)
stays frozen and the head is always trained, as in the paper. Budgets and costs cover the
candidates, the head included (``head_in_budget: false``: the body layers alone, the head on top;
:mod:`fedselect.algorithms.layersel_budget`). Where this implementation and the authors' release
differ, :class:`LayerSelOptions` says so and offers the release's reading.
"""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedselect.core.compute import backward_flops, backward_fraction
from fedselect.core.scores import group_scores
from fedselect.core.selection import SCORE_KIND, SelectionResult
from fedselect.core.selection_round import required_score_share, scale_scores, trainer_share, unused_budget
from fedselect.engine import TrainStats, autocast, client_generator, client_global_rng, freeze_norms
from fedselect.models import LayerGroup, layer_groups
from fedselect.models.flops import forward_flops_by_group
from fedselect.optim import trainable_only
from fedselect.plots import plot_selection_heatmap
from fedselect.registry import register

from .base import BadUpdateError, FedAvgClient, FedAvgServer, Mask, RunArtifacts, RunContext
from .layersel_budget import check_min_trainers, client_budgets, layer_costs, select_round, selectable
from .layersel_options import LayerSelOptions
from .parts import entries_of_params

_SCORE_STREAM = 2000


def candidate_groups(model: torch.nn.Module) -> list[LayerGroup]:
    """The layers selection chooses among, input to output: every block group, then the head."""
    groups = [g for g in layer_groups(model) if g.role in ("block", "head")]
    if not groups or groups[-1].role != "head":
        raise ValueError(f"{type(model).__name__} has no head layer group to always train")
    return groups


class LayerSelClient(FedAvgClient):
    """Scores the global model's layers, then trains only the layers the server assigned."""

    Options = LayerSelOptions
    # estimated backward GFLOPs (core.compute) summed into the record beside the sample passes
    totaled_metrics = (*FedAvgClient.totaled_metrics, "compute_backward")

    freeze_frozen_norms = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = candidate_groups(self.model)
        self.selected: list[str] | None = None  # this round's plan, consumed by the local update
        self.trained: list[str] = []  # the layers of the last local update
        self._forward_flops: list[float] | None = None

    def plan_report(self) -> dict[str, Any]:
        """Phase 1: one score per selectable layer on the current (global) model, or nothing."""
        kind = SCORE_KIND.get(self.options.strategy)
        if kind is None:
            return {}
        groups = selectable(self.groups, self.options.head_in_budget)
        grads = self.layer_gradients(groups)
        params = dict(self.model.named_parameters())
        scores = group_scores({g.name: grads[g.name] for g in groups},
                              {g.name: [params[n].detach() for n in g.param_names] for g in groups}, kind)
        return {"kind": kind, "scores": [float(scores[g.name]) for g in groups]}

    def scoring_batches(self) -> list[torch.Tensor]:
        """The first ``score_batches`` batches of a seeded order of the local training samples.

        In train mode a batch of one sample is left out (BatchNorm cannot normalize it), as local
        training leaves it out, unless it is the client's only sample.
        """
        batch = self.ctx.config.train.batch_size
        generator = client_generator(self.ctx.config.seed, self.id, self.round_idx, _SCORE_STREAM)
        n = self.data.num_train
        order = torch.randperm(n, generator=generator).to(self.data.train_y.device)
        batches = [order[i:i + batch] for i in range(0, n, batch)][:self.options.score_batches]
        if self.options.score_mode == "train" and n > 1:
            batches = [idx for idx in batches if idx.numel() > 1]
        return batches

    def layer_gradients(self, groups: list[LayerGroup]) -> dict[str, list[torch.Tensor]]:
        """Mean loss gradient over the :meth:`scoring_batches`, per group of ``groups``.

        The forward runs in ``score_mode``; in train mode every buffer (BatchNorm statistics) is
        restored afterwards and dropout draws from a generator seeded per (seed, client, round).
        Either way the model the client then trains is exactly the one it received. Every
        sample scored counts as one training sample pass (forward and backward) of local work.
        """
        batches = self.scoring_batches()
        names = [n for g in groups for n in g.param_names]
        train_mode = self.options.score_mode == "train"
        saved = {n: b.detach().clone() for n, b in self.model.named_buffers()} if train_mode else {}
        was_training = self.model.training
        try:
            with client_global_rng(self.ctx.config.seed, self.id, self.round_idx, self.ctx.device,
                                   stream=_SCORE_STREAM), trainable_only(self.model, dict.fromkeys(names)) as params:
                self.set_score_mode(train_mode)
                grads = self.mean_gradients(params, batches)
        finally:
            with torch.no_grad():
                for name, buf in self.model.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])
            self.model.train(was_training)
        self.add_sample_passes(sum(int(idx.numel()) for idx in batches))
        return {g.name: [grads[n] for n in g.param_names] for g in groups}

    def set_score_mode(self, train_mode: bool) -> None:
        """eval: the whole model in eval mode. train: the modes local training would use."""
        if not train_mode:
            self.model.eval()
            return
        self.model.train()
        freeze_norms(self.model, frozen_layers=self.freeze_frozen_norms,
                     all_layers=self.ctx.config.train.norm_stats == "frozen")

    def mean_gradients(self, params: list[tuple[str, torch.nn.Parameter, Any]],
                       batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        for _, param, _ in params:
            param.grad = None
        for idx in batches:
            inputs = self.ctx.transform(self.data.train_x[idx], train=False)
            with autocast(self.ctx.device, self.ctx.config.train.precision):
                loss = F.cross_entropy(self.model(inputs), self.data.train_y[idx]) / len(batches)
            loss.backward()
        grads = {name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for name, p, _ in params}
        for _, param, _ in params:
            param.grad = None
        return grads

    def receive_plan(self, plan: dict[str, Any]) -> None:
        """Phase 2: the server's choice of layers for this round."""
        names = {g.name for g in self.groups}
        layers = plan.get("layers") if isinstance(plan, dict) else None
        if not isinstance(layers, list) or not set(layers) <= names:
            raise ValueError(f"client {self.id}: malformed layer plan {plan!r} (layers must be among {sorted(names)})")
        self.selected = list(layers)

    def local_update(self) -> TrainStats:
        if self.selected is None:
            raise RuntimeError(f"client {self.id}: layer selection trains only after receiving a plan")
        chosen = set(self.selected)
        self.trained = [g.name for g in self.groups if g.name in chosen]
        self.selected = None  # a plan is good for one round
        trainable = {n: None for g in self.groups if g.name in chosen for n in g.param_names}
        return self.train_epochs(self.ctx.config.train.local_epochs, trainable)

    def upload_entries(self) -> list[str]:
        """Only the layers trained this round (their parameters and buffers); the base class leaves
        out entries personal to this client (``train.norm_buffers: personal``: BatchNorm statistics)."""
        chosen = set(self.trained)
        return entries_of_params(self.model, [n for g in self.groups if g.name in chosen for n in g.param_names])

    def forward_flops(self) -> list[float]:
        """Forward FLOPs per sample of every layer group (stem first), counted once."""
        if self._forward_flops is None:
            example = self.ctx.transform(self.data.train_x[:1], train=False)
            by_group = forward_flops_by_group(self.model, example)
            self._forward_flops = [by_group[g.name] for g in layer_groups(self.model)]
        return self._forward_flops

    def algorithm_metrics(self) -> dict[str, float]:
        chosen = set(self.trained)
        trainable = [g.name in chosen for g in layer_groups(self.model)]
        flops = self.forward_flops()
        samples = self.last_train_stats.samples
        return {
            "layers_trained": float(len(chosen)),
            # estimated backward GFLOPs of this local update (core.compute)
            "compute_backward": backward_flops(flops, trainable) * samples / 1e9,
            "backward_fraction": backward_fraction(flops, trainable),
        }

    def initial_personal_mask(self) -> Mask:
        return {}


class LayerSelServer(FedAvgServer):
    """Collects layer scores, solves the selection, averages each layer over its trainers."""

    Options = LayerSelOptions

    # every round's selection, for the artifacts written at the end of the run
    checkpoint_attributes = ("history",)

    def __init__(self, model: torch.nn.Module, args: Any, *, ctx: RunContext) -> None:
        super().__init__(model, args, ctx=ctx)
        self.groups = candidate_groups(model)
        self.costs = layer_costs(self.groups, self.options.cost)
        num_clients = ctx.config.data.partition.num_clients
        check_min_trainers(self.options, num_clients, ctx.config.train.participation)
        self.budgets = client_budgets(self.costs, num_clients, self.options, seed=ctx.config.seed)
        # each candidate's state entries (parameters and their modules' buffers), for aggregation: sampled
        self.group_entries = [entries_of_params(model, g.param_names) for g in self.groups]
        self.history: list[tuple[int, list[int], SelectionResult]] = []
        self._metrics: dict[str, float] = {}
        self._required_share = float("nan")

    # ---- aggregation: which clients' uploads were accepted this round, with their weights -----
    def begin_round(self) -> None:
        super().begin_round()
        self.round_weights: dict[int, float] = {}

    def add_upload(self, num_samples: Any, payload: Any) -> bool:
        accepted = super().add_upload(num_samples, payload)
        if accepted:
            self.round_weights[int(payload["client_id"])] = self._weight(float(num_samples))
        return accepted

    def add_local_upload(self, upload: Any) -> bool:
        accepted = super().add_local_upload(upload)
        if accepted:
            self.round_weights[int(upload.client_id)] = self._weight(float(upload.num_samples))
        return accepted

    def end_round(self) -> OrderedDict[str, torch.Tensor]:
        """Each layer's mean over its trainers (Eq. 7); with ``aggregation: sampled`` the step from the
        old global value scaled by the trainers' share of the accepted clients' weight."""
        old = OrderedDict(self.global_state)
        new_state = super().end_round()
        if self.options.aggregation != "sampled" or not self.history or not self.round_weights:
            return new_state
        _, sampled, result = self.history[-1]
        rows = [row for row, cid in enumerate(sampled) if cid in self.round_weights]
        shares = trainer_share(result.mask[rows], [self.round_weights[sampled[r]] for r in rows])
        for entries, share in zip(self.group_entries, shares, strict=True):
            for name in entries:
                if share < 1.0 and new_state[name].is_floating_point():
                    step = new_state[name].double() - old[name].double()
                    new_state[name] = (old[name].double() + float(share) * step).to(old[name].dtype)
        return new_state

    def needs_plan(self, round_idx: int) -> bool:
        return True

    def plan_round(self, round_idx: int, reports: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        sampled = sorted(reports)
        o = self.options
        scores = self.score_matrix(sampled, reports) if o.strategy in SCORE_KIND else None
        result = select_round(o, self.costs, self.budgets[sampled], scores, seed=self.ctx.config.seed,
                              round_idx=round_idx)
        self.history.append((round_idx, sampled, result))
        self._metrics = self.selection_metrics(sampled, result)
        return {cid: {"layers": [g.name for g, on in zip(self.groups, result.mask[row], strict=True) if on]}
                for row, cid in enumerate(sampled)}

    def selection_metrics(self, sampled: list[int], result: SelectionResult) -> dict[str, float]:
        """The round's logged figures of its selection (module docstring)."""
        mask, o = result.mask, self.options
        trainers = mask.sum(axis=0)
        covered = np.asarray(selectable(list(self.costs), o.head_in_budget), dtype=float)
        unused = unused_budget(mask[:, :covered.size], covered, self.budgets[sampled])
        metrics = {
            "selection_solve_seconds": result.solve_seconds,
            "selection_objective": result.objective,
            "selection_optimal": float(result.status in ("optimal", "heuristic")),
            "selection_layers_mean": float(mask.sum(axis=1).mean()),
            "selection_disagreement": float(sum(k * (len(sampled) - k) for k in trainers)),
            "selection_single_trainer_layers": float((trainers == 1).sum()),
            "selection_unused_budget_mean": float(unused.mean()),
            **{f"selection_trainers_{g.name}": float(k) for g, k in zip(self.groups, trainers, strict=True)},
            **{f"selection_unused_budget_client_{cid}": float(u) for cid, u in zip(sampled, unused, strict=True)},
        }
        if math.isfinite(self._required_share):
            metrics["selection_required_score_share"] = self._required_share
        self._required_share = float("nan")
        return metrics

    def score_matrix(self, sampled: list[int], reports: dict[int, dict[str, Any]]) -> np.ndarray:
        """Clients x selectable layers (the head only with ``head_in_budget``), scaled as asked
        (``normalize_scores``, ``normalize_over``: :func:`fedselect.core.selection_round.scale_scores`)."""
        kind = SCORE_KIND[self.options.strategy]
        expected = len(selectable(self.groups, self.options.head_in_budget))
        rows = []
        for cid in sampled:
            report = reports[cid]
            scores = report.get("scores") if isinstance(report, dict) else None
            if (not isinstance(report, dict) or report.get("kind") != kind or not isinstance(scores, list)
                    or len(scores) != expected
                    or not all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in scores)):
                raise BadUpdateError(f"client {cid} reported malformed {kind} layer scores: {report!r}")
            rows.append(scores)
        matrix = np.asarray(rows, dtype=float)
        required = [expected - 1] if self.options.head_in_budget else []  # the head, scored with it inside
        if required:
            self._required_share = required_score_share(matrix, required)
        over = self.options.normalize_over if self.options.normalize_scores else "none"
        return scale_scores(matrix, over, required)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def run_artifacts(self, out_dir: Path) -> RunArtifacts:
        return RunArtifacts(files=self.write_artifacts(out_dir / "selection"))

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """The selection of every round (CSV, clients x layers) and its heatmap over rounds."""
        out_dir.mkdir(parents=True, exist_ok=True)
        names = [g.name for g in self.groups]
        table = out_dir / "selection.csv"
        with table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "client", *names])
            for round_idx, sampled, result in self.history:
                for row, cid in enumerate(sampled):
                    writer.writerow([round_idx, cid, *result.mask[row].astype(int).tolist()])
        rounds = [r for r, _, _ in self.history]
        share = np.stack([res.mask.mean(axis=0) for _, _, res in self.history], axis=1) if self.history else \
            np.zeros((len(names), 0))
        figure = out_dir / "selection_heatmap.png"
        plot_selection_heatmap(share, figure, layers=names, rounds=rounds,
                               title=f"layers selected ({self.options.strategy}, lambda={self.options.lam:g})")
        return [table, figure]


register("layersel", client=LayerSelClient, server=LayerSelServer,
         summary="selective layer fine-tuning: per-client layers chosen by the server under budgets "
                 "(ILP of arXiv 2408.15600, or Top/Bottom/Both/SNR/RGN/Full/Random)")
