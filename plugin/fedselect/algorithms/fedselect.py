"""FedSelect (Tamirisa et al., arXiv 2306.13264): a learned element-wise personal mask.

Its difference from FedAvg, on the mask mechanism of :mod:`fedselect.algorithms.base`:

* mask: each sampled client searches its personal entries with GradLTN (paper Alg. 1;
  :func:`fedselect.core.gradltn.gradltn`) on its current model theta_k = global values on
  shared entries + its personal values, every ``search_every`` of its participations; or,
  as in the authors' released code, grows the mask online (``mask_search: grow``;
  :func:`fedselect.core.topk.grow_mask`).
* local schedule: LocalAlt (Pillutla et al. 2022; :func:`fedselect.algorithms.parts.train_localalt`),
  per epoch one pass over the personal entries v, then one over the shared entries u.
* server: unchanged: each entry averaged over the clients that share it (paper Alg. 2).

Defaults follow the paper's Table 1 setting: L = 5 GradLTN iterations of E = 5 epochs,
LocalAlt for ``train.local_epochs`` (5) epochs, u and v taken from theta_0. Where the paper
leaves a choice open, the option and its default are documented in
:mod:`fedselect.algorithms.fedselect_options` and in docs/ALGORITHMS.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedselect.core.gradltn import gradltn
from fedselect.core.masks import counted_fraction, iou_matrix, personal_fraction
from fedselect.core.topk import grow_mask
from fedselect.engine import TrainStats, restore_state, snapshot_state
from fedselect.models import head_param_names, layer_groups
from fedselect.plots import plot_iou_heatmap
from fedselect.registry import register

from .base import FedAvgClient, FedAvgServer, Mask, RunArtifacts, State
from .fedselect_options import FedSelectOptions
from .parts import train_localalt

# random-number streams of the calls within one round (LocalAlt uses FedAvg's stream 0)
_GRADLTN_STREAM = 1000


class FedSelectClient(FedAvgClient):
    """FedSelect's client: GradLTN (or growth) picks the mask, LocalAlt trains u and v."""

    Options = FedSelectOptions

    checkpoint_attributes = ("participations", "last_search_fraction", "grow_snapshot")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.participations = 0
        self.last_search_fraction = 0.0
        # grow variant only: the maskable values when the mask last grew (a full copy, by design
        # of that variant; GradLTN needs none)
        self.grow_snapshot: State | None = None

    def maskable_names(self) -> list[str]:
        names = [n for n, _ in self.model.named_parameters()]
        return names if self.options.maskable == "all" else [n for n in names if n.endswith("weight")]

    def initial_personal_mask(self) -> Mask:
        # before its first search a client has nothing personal (BatchNorm statistics follow
        # train.norm_buffers, added by the base class)
        return {}

    def parameter_mask(self) -> Mask:
        """The personal mask over every parameter tensor (all False where nothing is personal)."""
        mask = self.personal_mask
        return {n: mask.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in self.model.named_parameters()}

    def buffer_mask(self) -> Mask:
        parameters = {n for n, _ in self.model.named_parameters()}
        return {n: m for n, m in self.personal_mask.items() if n not in parameters}

    def local_update(self) -> TrainStats:
        opts = self.options
        if opts.mask_search == "gradltn" and self.participations % opts.search_every == 0:
            self.run_gradltn()
        stats = train_localalt(self, self.parameter_mask(), opts.localalt_epoch)
        if opts.mask_search == "grow":
            self.grow()
        self.participations += 1
        return stats

    def run_gradltn(self) -> None:
        """GradLTN (paper Alg. 1) from the current model; leaves theta_0 (or theta_L) loaded."""
        opts = self.options
        names = self.maskable_names()
        theta0 = snapshot_state(self.model, names)
        buffers0 = snapshot_state(self.model, [n for n, _ in self.model.named_buffers()])
        calls = 0

        def train(start: State, trainable: Mask) -> State:
            nonlocal calls
            restore_state(self.model, {**start, **buffers0})
            self.train_epochs(opts.gradltn_epochs, trainable, stream=_GRADLTN_STREAM + calls)
            calls += 1
            return snapshot_state(self.model, names)

        result = gradltn(theta0, train, p=opts.p, iterations=opts.gradltn_iterations,
                         fraction_rule=opts.fraction_rule, return_weights=opts.return_weights,
                         topk_scope=opts.topk_scope, copy_inputs=False)  # train() only reads them
        # Alg. 1's reset: continue from theta_0 (or theta_L) with the statistics of theta_0
        restore_state(self.model, {**result.weights, **buffers0})
        self.personal_mask = {**result.mask, **self.buffer_mask()}
        self.last_search_fraction = result.personal_fraction

    def grow(self) -> None:
        """The released code's online growth, every ``grow_every`` participations."""
        opts = self.options
        params = dict(self.model.named_parameters())
        names = self.maskable_names()
        current = {n: params[n].detach() for n in names}
        if self.grow_snapshot is None:
            self.grow_snapshot = {n: v.clone() for n, v in current.items()}
            return
        if (self.participations + 1) % opts.grow_every:
            return
        mask = self.parameter_mask()
        # the change since the last growth, in the snapshot's own storage: then - now, whose
        # magnitude (all grow_mask reads) equals that of now - then bit for bit
        snapshot = self.grow_snapshot
        change = {n: snapshot[n].sub_(current[n]) for n in names}
        grown = grow_mask({n: mask[n] for n in names}, change, rate=opts.p, target_fraction=opts.grow_target)
        self.personal_mask = {**mask, **grown, **self.buffer_mask()}
        for n in names:  # the snapshot moves to now
            snapshot[n].copy_(current[n])

    @classmethod
    def federation_artifacts(cls, clients: Sequence[FedAvgClient], out_dir: Path) -> RunArtifacts:
        """Clients' personal-mask IoU (whole model and final linear layer) as CSV + heatmap, their
        mean off-diagonal overlap and every client's personal fraction for the run record."""
        out_dir = out_dir / "masks"
        out_dir.mkdir(parents=True, exist_ok=True)
        masks = [c.parameter_mask() for c in clients]
        head_weights = [n for n in head_param_names(clients[0].model) if n.endswith("weight")]
        artifacts = RunArtifacts(record={"personal_fraction": [personal_fraction(m) for m in masks]})
        for label, keys in (("model", None), ("head", head_weights)):
            matrix = iou_matrix(masks, keys=keys)
            np.savetxt(out_dir / f"mask_iou_{label}.csv", matrix, delimiter=",", fmt="%.6f")
            title = "mask IoU, whole model" if keys is None else "mask IoU, final linear layer"
            plot_iou_heatmap(matrix, out_dir / f"mask_iou_{label}.png", title=title)
            artifacts.files += [out_dir / f"mask_iou_{label}.csv", out_dir / f"mask_iou_{label}.png"]
            off_diagonal = matrix[~np.eye(len(masks), dtype=bool)]
            artifacts.record[f"mask_iou_{label}_mean"] = float(off_diagonal.mean()) if off_diagonal.size else 1.0
        return artifacts

    def algorithm_metrics(self) -> dict[str, float]:
        # from the counts kept with the mask: no pass over the mask per round
        counts = self.personal_counts
        sizes = {n: p.numel() for n, p in self.model.named_parameters()}
        metrics = {"personal_fraction": counted_fraction(counts, sizes)}
        metrics.update({f"personal_fraction_{g.name}": counted_fraction(counts, sizes, g.param_names)
                        for g in layer_groups(self.model)})
        return metrics


register("fedselect", client=FedSelectClient, server=FedAvgServer)
