"""Backward compute of training a subset of layers (layer selection's cost accounting).

For a chain of layer groups g = 0 (input side) .. L-1 (output side) with forward cost f_g per
sample, backpropagation through a group costs about f_g for the gradient with respect to its
input and about f_g for the gradient with respect to its weights (each is one product of the
same size as the forward one). The weight gradient is needed only where the group is trained;
the input gradient only above the lowest trained group, since below it nothing needs a gradient
and autograd stops there. This is the saving selective fine-tuning claims (arXiv 2408.15600,
Sec. 3: "clients only need to compute gradients of the selected layers"), made explicit.
"""

from __future__ import annotations

from collections.abc import Sequence


def backward_flops(forward_flops: Sequence[float], trainable: Sequence[bool]) -> float:
    """Backward FLOPs per sample when only the ``trainable`` groups are updated.

    sum_g [g trainable] f_g (weight gradients) + sum_{g > lowest trainable} f_g (input gradients).
    Zero when nothing is trainable.
    """
    if len(forward_flops) != len(trainable):
        raise ValueError(f"{len(forward_flops)} forward costs but {len(trainable)} trainable flags")
    trained = [g for g, on in enumerate(trainable) if on]
    if not trained:
        return 0.0
    lowest = trained[0]
    weight_grads = sum(float(forward_flops[g]) for g in trained)
    input_grads = sum(float(f) for f in forward_flops[lowest + 1:])
    return weight_grads + input_grads


def backward_fraction(forward_flops: Sequence[float], trainable: Sequence[bool]) -> float:
    """Backward FLOPs of training ``trainable`` relative to training every group."""
    full = backward_flops(forward_flops, [True] * len(forward_flops))
    return backward_flops(forward_flops, trainable) / full if full > 0 else 0.0
