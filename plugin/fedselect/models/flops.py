"""Forward FLOPs per layer group, counted by torch's FlopCounterMode on one example input."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedselect.models.groups import layer_groups


def forward_flops_by_group(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """FLOPs of one forward pass of ``example`` (a batch of one) attributed to each layer group.

    FlopCounterMode counts per module, nested modules included in their parents. A group's
    count is the sum over the outermost modules that hold parameters of that group only, so
    parameter-free work inside a block (attention products, activations) counts for its block,
    and work in the root module (pooling) counts for no group.
    """
    groups = layer_groups(model)
    owner = {p: g.name for g in groups for p in g.param_names}
    params_under: dict[str, set[str]] = {}
    for module_name, module in model.named_modules():
        names = {f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters()}
        params_under[module_name] = {owner[n] for n in names if n in owner}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    root = type(model).__name__
    totals = {g.name: 0.0 for g in groups}
    for counted, ops in counter.get_flop_counts().items():
        if counted == "Global" or not counted.startswith(root + "."):
            continue
        name = counted[len(root) + 1:]
        owners = params_under.get(name, set())
        parent = name.rpartition(".")[0]
        if len(owners) == 1 and len(params_under.get(parent, set())) != 1:
            totals[next(iter(owners))] += float(sum(ops.values()))
    return totals
