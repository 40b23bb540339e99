"""GradLTN: FedSelect's search for each client's personal subnetwork (arXiv 2306.13264, Alg. 1).

GradLTN runs on one client with input theta_0 (the client's current model). Iteration 0 trains with
every (candidate) entry trainable; each iteration i then scores the entries by how far local training
moved them, gamma = |theta_i - theta_0| restricted to the current mask m, keeps the largest ones as the
new m, resets the model to theta_0 and trains again updating only m. The output is the split
u = theta_0 on not-m (shared), v = theta_0 on m (personal), and m.

Training itself is the caller's: ``train(start_state, trainable_mask) -> new_state``, so this module
stays framework-free. (How a client then keeps only its personal values, 1-D, plus a bit-packed mask
between rounds is :class:`fedselect.algorithms.base.FedAvgClient`'s.)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedselect.core.masks import (
    Mask,
    State,
    full_mask,
    target_count,
    true_counts,
    validate_mask,
    validate_same_layout,
)
from fedselect.core.topk import topk_abs_change, topk_mask_global, topk_masks

__all__ = [
    "FRACTION_RULES",
    "RETURN_WEIGHTS",
    "TOPK_SCOPES",
    "GradLTNResult",
    "GradLTNStep",
    "TrainFn",
    "final_personal_fraction",
    "gradltn",
    "selection_fractions",
]

TrainFn = Callable[[State, Mask], State]

FRACTION_RULES = ("geometric", "per_iteration_of_original", "compounding")
RETURN_WEIGHTS = ("theta0", "thetaL")
TOPK_SCOPES = ("tensor", "model")


@dataclass(frozen=True)
class GradLTNStep:
    """One GradLTN iteration: whether it trained, the trainable fraction, the fraction selected after."""

    iteration: int
    trained: bool
    trainable_fraction: float
    personal_fraction: float

    def as_dict(self) -> dict[str, float]:
        """Flat numeric form for metric loggers."""
        return {
            "iteration": float(self.iteration),
            "trained": float(self.trained),
            "trainable_fraction": self.trainable_fraction,
            "personal_fraction": self.personal_fraction,
        }


@dataclass(frozen=True)
class GradLTNResult:
    """Output of ``gradltn``: the personal mask m, the weights (theta_0 or theta_L), |m| / |theta|."""

    mask: Mask
    weights: State
    personal_fraction: float
    history: list[GradLTNStep] = field(default_factory=list)


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 < float(p) < 1.0):
        raise ValueError(f"p must be in (0, 1) (exclusive), got p={p!r}")
    return float(p)


def selection_fractions(p: float, iterations: int, fraction_rule: str) -> list[float]:
    """Fraction of each tensor kept personal after selection 1..L of FedSelect Alg. 1 (L = iterations).

    * ``"geometric"`` (default): ``[p^(1/L), p^(2/L), ..., p]`` -- iterative pruning toward the target
      as in lottery-ticket search (Frankle & Carbin 2019, Sec. 2 "iterative pruning"): every
      selection prunes the same share of the previous mask, the mask keeps changing over all L
      iterations, and the final personal fraction is exactly p.
    * ``"per_iteration_of_original"``: ``[p, p, ..., p]`` -- every selection keeps p of the tensor's
      original size, i.e. "(1 - p) x 100% of parameters are frozen during each iteration".
    * ``"compounding"``: ``[p, p^2, ..., p^L]`` -- every selection keeps the largest p fraction of the
      previous mask (the algorithm box read with r = 1 - p of the *current* mask pruned, as in
      lottery-ticket iterative pruning).

    The default keeps the paper's meaning of p (the runs are named FedSelect(p) and p is "the
    personalization rate") while every one of the L iterations still refines the mask, as Alg. 1's
    loop intends. ``"per_iteration_of_original"`` is the paper's literal text "(1 - p) x 100% of
    parameters are frozen during each iteration": a constant frozen fraction of the *parameters* in
    every iteration; the runs use p in {0.25, 0.5, 0.75}, which only spans a useful range of personal
    fractions if p is the personal fraction (compounding with L = 5 would give 0.1%, 3.1% and 23.7%).
    Under that reading every selection happens within the previous mask, so the mask cannot change
    after the first selection; later trainings only matter for ``return_weights="thetaL"``.
    """
    p = _check_p(p)
    if fraction_rule == "geometric":
        return [p ** ((i + 1) / iterations) for i in range(iterations)]
    if fraction_rule == "per_iteration_of_original":
        return [p] * iterations
    if fraction_rule == "compounding":
        return [p ** (i + 1) for i in range(iterations)]
    raise ValueError(f"fraction_rule must be one of {FRACTION_RULES}, got {fraction_rule!r}")


def final_personal_fraction(p: float, iterations: int, fraction_rule: str = "geometric") -> float:
    """Nominal personal fraction after GradLTN (FedSelect Alg. 1): p, or p^L for ``"compounding"``.

    Per tensor the personal count is exactly ``target_count(numel, this)`` (nearest integer, halves
    up), capped by the candidate entries when ``prev_mask`` restricts the search.
    """
    return selection_fractions(p, iterations, fraction_rule)[-1]


def _clone_state(state: Mapping[str, Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def gradltn(
    theta0: Mapping[str, Tensor],
    train: TrainFn,
    *,
    p: float,
    iterations: int,
    fraction_rule: str = "geometric",
    return_weights: str = "theta0",
    prev_mask: Mapping[str, Tensor] | None = None,
    stop_when_fixed: bool = True,
    topk_scope: str = "tensor",
    copy_inputs: bool = True,
) -> GradLTNResult:
    """GradLTN, FedSelect Alg. 1: find the personal mask m of one client by gradient-change pruning.

    For i = 0 .. L-1 (L = ``iterations``, the paper's pruning iterations): train from (a fresh copy
    of) theta_0 updating only the entries of m_i (Alg. 1 "train E epochs"; m_0 = all ones, or
    ``prev_mask``), then gamma = |theta_trained - theta_0| restricted to m_i, and m_{i+1} = the exact
    top-k of gamma within m_i (Alg. 1's "largest (1 - r) fraction of gamma"; ties: lower flat
    index). The model is reset to theta_0 before every training (Alg. 1's reset), so gamma is the
    change made by one training run. The result's mask is m_L.

    **Scope of the top-k** (``topk_scope``, one of ``TOPK_SCOPES``): Alg. 1's selection line does
    not say over which set the largest fraction is taken. ``"tensor"`` (default; layer-wise, as in
    the released code and layer-wise lottery-ticket pruning) keeps ``target_count(n, f_i)`` of each
    tensor's own ``n`` entries. ``"model"`` (global pruning, the other common reading; Frankle &
    Carbin 2019 Sec. 4 prune globally for deep nets) keeps the ``target_count(N, f_i)`` largest
    gamma over all N entries of the model at once (capped by the candidates; ties: earlier tensor in
    theta_0's key order, then lower flat index; see ``topk_mask_global``), so layers that move more
    get a larger personal share.

    **How p maps to the final personal fraction** (``fraction_rule``; the readings and their sources
    are in ``selection_fractions``): selection i keeps ``target_count(n, f_i)`` entries per tensor
    (``"model"``: of the whole model), capped by the candidates, f_i = p^(i/L) for ``"geometric"``
    (default), p for ``"per_iteration_of_original"`` and p^i for ``"compounding"``. So the final
    personal fraction is exactly p (resp. p^L) up to rounding to whole entries.

    ``return_weights``: ``"theta0"`` (Alg. 1: u and v are theta_0's values) or ``"thetaL"`` (the
    paper's suggested variant: theta_L, the state of a training run from theta_0 with the final
    mask m_L, returned whole). The last of the L runs is reused when it was trained with exactly
    m_L (a fixed mask); otherwise -- whenever the last selection changed the mask, e.g. always with
    ``"geometric"`` -- ``"thetaL"`` costs one extra training ``train(theta_0, m_L)``, recorded in
    ``history`` as a trained step with ``iteration = L``.

    ``prev_mask`` restricts the search: only its True entries are ever trainable or selectable, and
    a tensor (``"model"``: the model) whose ``prev_mask`` has fewer entries than its target keeps
    them all (so an all-False tensor stays shared; this is how callers exclude e.g. biases). Counts
    are relative to the full size either way.

    ``stop_when_fixed`` (not in the paper): once no remaining selection can change the mask (its
    final target count is not below the current count in any tensor, or for ``"model"`` in the
    whole model) the trainings in between are skipped, because with a pure ``train`` they cannot
    affect the result; with ``"thetaL"`` the last training still runs with the fixed mask (= m_L).
    Set False to spend exactly L trainings as in the paper's cost.

    ``copy_inputs``: every training gets a fresh copy of theta_0 and of the mask, so that a
    ``train`` that updates its inputs in place cannot corrupt theta_0 (or the mask) for later
    iterations. A ``train`` that only reads them (FedSelect's client: it copies theta_0 into its
    model) may pass False and save both copies per training.

    Raises ValueError for p outside (0, 1), ``iterations < 1``, an unknown rule, weights choice or
    scope, or a ``train`` result whose keys/shapes differ from theta_0.
    """
    fractions = _check_options(p, iterations, fraction_rule, return_weights, topk_scope)
    iterations = len(fractions)
    if copy_inputs:
        train = _on_copies(train)
    if prev_mask is not None:
        validate_mask(prev_mask, theta0)
        mask: Mask = {k: v.clone() for k, v in prev_mask.items()}
        counts = true_counts(mask)
    else:
        mask = full_mask(theta0)
        counts = {k: v.numel() for k, v in theta0.items()}
    # True entries per tensor are known from here on without counting them: a selection keeps
    # exactly its k (on a GPU each count would be a host synchronisation, on a CPU a pass)
    total = sum(t.numel() for t in theta0.values())

    def fraction() -> float:
        return sum(counts.values()) / total if total else 0.0

    history: list[GradLTNStep] = []
    last_trained: State | None = None
    last_mask: Mask | None = None  # the mask last_trained was trained with
    i = 0
    while i < iterations:
        trainable_fraction = fraction()
        last_trained, last_mask = _train_run(theta0, train, mask), mask
        mask, counts = _select(theta0, last_trained, mask, counts, fractions[i], topk_scope)
        history.append(GradLTNStep(i, True, trainable_fraction, fraction()))
        i += 1
        if stop_when_fixed and i < iterations and _is_fixed(counts, theta0, fractions[-1], topk_scope):
            # Trainings i .. L-1 only feed selections that keep the mask; skip them (for "thetaL" the
            # last one runs below, with the fixed mask, which is m_L).
            fr = fraction()
            history.extend(GradLTNStep(j, False, fr, fr) for j in range(i, iterations - 1))
            if return_weights == "thetaL":
                last_trained, last_mask = _train_run(theta0, train, mask), mask
            history.append(GradLTNStep(iterations - 1, return_weights == "thetaL", fr, fr))
            break

    if return_weights == "theta0" or last_trained is None:
        return GradLTNResult(mask, _clone_state(theta0), fraction(), history)
    return _theta_l_result(theta0, train, mask, fraction(), last_trained, last_mask, history, iterations)


def _check_options(p: float, iterations: int, fraction_rule: str, return_weights: str,
                   topk_scope: str) -> list[float]:
    """gradltn's arguments checked; the selection fractions f_0 .. f_{L-1} (L = ``iterations``)."""
    p = _check_p(p)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if return_weights not in RETURN_WEIGHTS:
        raise ValueError(f"return_weights must be one of {RETURN_WEIGHTS}, got {return_weights!r}")
    if topk_scope not in TOPK_SCOPES:
        raise ValueError(f"topk_scope must be one of {TOPK_SCOPES}, got {topk_scope!r}")
    return list(selection_fractions(p, int(iterations), fraction_rule))


def _theta_l_result(theta0: Mapping[str, Tensor], train: TrainFn, mask: Mask, fraction: float,
                    last_trained: State, last_mask: Mask | None, history: list[GradLTNStep],
                    iterations: int) -> GradLTNResult:
    """``return_weights: thetaL``: theta_L is a training with the final mask m_L (the last run's, if it
    used exactly m_L; else one more run, recorded as step L). ``fraction``: m_L's personal fraction."""
    if last_mask is None or not _same_mask(last_mask, mask):
        # the loop's last run used m_{L-1}, which differs from m_L
        last_trained = _train_run(theta0, train, mask)
        history.append(GradLTNStep(iterations, True, fraction, fraction))
    weights = {k: v.detach() for k, v in last_trained.items()}
    return GradLTNResult(mask=mask, weights=weights, personal_fraction=fraction, history=history)


def _on_copies(train: TrainFn) -> TrainFn:
    """``train`` given a fresh copy of its start state and mask on every call (Alg. 1 resets to
    theta_0 before every training; a ``train`` updating its inputs in place must not move it)."""
    return lambda start, mask: train(_clone_state(start), {k: v.clone() for k, v in mask.items()})


def _train_run(theta0: Mapping[str, Tensor], train: TrainFn, mask: Mapping[str, Tensor]) -> State:
    """One "train E epochs" of Alg. 1 from theta_0 updating only ``mask``; result layout-checked."""
    trained = train(theta0, mask)
    validate_same_layout(theta0, trained, "theta0", "train's result")
    return trained


def _select(
    theta0: Mapping[str, Tensor],
    trained: Mapping[str, Tensor],
    mask: Mapping[str, Tensor],
    counts: Mapping[str, int],
    fraction: float,
    topk_scope: str,
) -> tuple[Mask, dict[str, int]]:
    """Alg. 1's selection: the largest ``fraction`` of gamma = |trained - theta_0| within ``mask``
    (whose True entries per tensor are ``counts``); the new mask and its counts."""

    def gamma(k: str) -> Tensor:
        t0 = theta0[k]
        return (trained[k].detach().to(t0.device) - t0.detach()).abs()

    if topk_scope == "model":
        total = sum(t.numel() for t in theta0.values())
        k_target = min(target_count(total, fraction), sum(counts.values()))
        chosen = topk_mask_global({k: gamma(k) for k in theta0}, k_target, within=mask)
        return chosen, true_counts(chosen)
    ks = {k: min(target_count(t0.numel(), fraction), counts[k]) for k, t0 in theta0.items()}
    if any(t.device.type != "cpu" for t in theta0.values()):
        # on a GPU all tensors in one selection (fedselect.core.topk_radix)
        return topk_masks(list(theta0), gamma, ks, mask), ks
    # on the CPU one tensor at a time (peak memory: one extra tensor at most)
    return {k: topk_abs_change(trained[k], t0, ks[k], within=mask[k], candidates=counts[k])
            for k, t0 in theta0.items()}, ks


def _is_fixed(
    counts: Mapping[str, int], theta0: Mapping[str, Tensor], final_fraction: float, topk_scope: str
) -> bool:
    """True when no later selection can change the mask whose True entries per tensor are ``counts``:
    no count is above its final target.

    Targets never grow over the iterations (every rule's f_i is non-increasing), so a selection
    whose target is at least the current count keeps every candidate, i.e. returns the mask.
    """
    if topk_scope == "model":
        total = sum(t.numel() for t in theta0.values())
        return target_count(total, final_fraction) >= sum(counts.values())
    return all(target_count(theta0[k].numel(), final_fraction) >= counts[k] for k in counts)


def _same_mask(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    if any(a[k].shape != b[k].shape for k in a):
        return False
    # one host synchronisation for the whole comparison
    return not a or not bool(torch.stack([(a[k] != b[k].to(a[k].device)).any() for k in a]).any())
