"""Local work: one definition for every method (docs/ALGORITHMS.md, "Local work").

A round's local work on client k is counted in training sample passes: one forward and one
backward pass of one training sample, whatever part of the model the step updates. "E local
epochs" means E passes over the client's training split, E * n_k sample passes, for every
method (the FedSelect paper, arXiv 2306.13264, Sec. 5: "5 local epochs for all methods").
Methods whose local update has two phases split the E epochs between them rather than
spending E on each; mask search (GradLTN), layer scoring and evaluation-time fine-tuning are
extra work that the run logs beside the accuracy.
"""

from __future__ import annotations

__all__ = ["split_local_epochs"]


def split_local_epochs(total: int, first: int | None, second: int | None) -> tuple[int, int]:
    """(first, second) phase epochs that spend ``total`` local epochs between two phases.

    One given: the other is what is left of ``total``. Both given: taken as they are (the run
    then does other work than ``total`` epochs, which its logged sample passes show). Raises
    ValueError when neither is given, a count is negative, or one exceeds ``total``.
    """
    if first is None and second is None:
        raise ValueError("give the epochs of at least one phase")
    for value in (total, first, second):
        if value is not None and value < 0:
            raise ValueError(f"epochs must be >= 0, got {value}")
    if first is not None and second is not None:
        return first, second
    given = first if first is not None else second
    if given > total:
        raise ValueError(f"{given} epochs for one phase exceed the {total} local epochs (train.local_epochs)")
    return (given, total - given) if first is not None else (total - given, given)
