"""GradLTN: FedSelect's search for each client's personal subnetwork (arXiv 2306.13264, Alg. 1).

GradLTN runs on one client with input theta_0 (the client's current model). Iteration 0 trains with
every (candidate) entry trainable; each iteration i then scores the entries by how far local training
moved them, gamma = |theta_i - theta_0| restricted to the current mask m, keeps the largest ones as the
new m, resets the model to theta_0 and trains again updating only m. The output is the split
u = theta_0 on not-m (shared), v = theta_0 on m (personal), and m.

Training itself is the caller's: ``train(start_state, trainable_mask) -> new_state``, so this module
stays framework-free. The u / v storage helpers at the bottom let a client keep only its personal
values (1-D) plus a bit-packed mask between rounds instead of a whole model copy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedselect.core.masks import (
    Mask,
    PackedTensor,
    State,
    full_mask,
    pack_mask,
    personal_count,
    target_count,
    topk_mask,
    unpack_mask,
    validate_mask,
    validate_same_layout,
)

__all__ = [
    "FRACTION_RULES",
    "RETURN_WEIGHTS",
    "GradLTNResult",
    "GradLTNStep",
    "PersonalPart",
    "TrainFn",
    "final_personal_fraction",
    "gradltn",
    "merge",
    "selection_fractions",
    "split_shared_personal",
]

TrainFn = Callable[[State, Mask], State]

FRACTION_RULES = ("geometric", "per_iteration_of_original", "compounding")
RETURN_WEIGHTS = ("theta0", "thetaL")


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
) -> GradLTNResult:
    """GradLTN, FedSelect Alg. 1: find the personal mask m of one client by gradient-change pruning.

    For i = 0 .. L-1 (L = ``iterations``, the paper's pruning iterations): train from (a fresh copy
    of) theta_0 updating only the entries of m_i (Alg. 1 "train E epochs"; m_0 = all ones, or
    ``prev_mask``), then gamma = |theta_trained - theta_0| restricted to m_i, and m_{i+1} = the exact
    top-k of gamma within m_i per tensor (ties: lower flat index). The model is reset to theta_0
    before every training (Alg. 1's reset), so gamma is the change made by one training run. The
    result's mask is m_L.

    **How p maps to the final personal fraction** (``fraction_rule``; see ``selection_fractions``):
    per tensor of ``n`` entries, selection i keeps ``target_count(n, f_i)`` entries (capped by the
    candidates), f_i = p^(i/L) for ``"geometric"`` (default), p for ``"per_iteration_of_original"``
    and p^i for ``"compounding"``. So the final personal fraction is exactly p (resp. p^L) per
    tensor up to rounding to whole entries. The default keeps the paper's meaning of p (the runs
    are named FedSelect(p) and p is "the personalization rate") while every one of the L
    iterations still refines the mask, as Alg. 1's loop intends. The
    ``"per_iteration_of_original"`` rule follows the paper's text "(1 - p) x 100% of parameters
    are frozen during each iteration": a constant frozen fraction of the *parameters* in every
    iteration, and the runs are named FedSelect(p) for p in {0.25, 0.5, 0.75}, which only spans a
    useful range of personal fractions if p is the personal fraction (compounding with L = 5 would
    give 0.1%, 3.1% and 23.7%). A consequence of that reading: since every selection happens within
    the previous mask, the mask cannot change after the first selection; later trainings only matter
    for ``return_weights="thetaL"``. ``"compounding"`` is the literal lottery-ticket reading of the
    algorithm box (prune r = 1 - p of the current mask every iteration).

    ``return_weights``: ``"theta0"`` (Alg. 1: u and v are theta_0's values) or ``"thetaL"`` (the
    paper's suggested variant: the state after the last training run, trained with m_{L-1}, returned
    whole).

    ``prev_mask`` restricts the search: only its True entries are ever trainable or selectable, and
    a tensor whose ``prev_mask`` has fewer entries than its target keeps them all (so an all-False
    tensor stays shared; this is how callers exclude e.g. biases). Counts are relative to the
    tensor's full size either way.

    ``stop_when_fixed`` (not in the paper): once no remaining selection can change the mask (its
    target count is not below the current count in any tensor) the trainings in between are skipped,
    because with a pure ``train`` they cannot affect the result; with ``"thetaL"`` the last training
    still runs with the fixed mask. Set False to spend exactly L trainings as in the paper's cost.

    Raises ValueError for p outside (0, 1), ``iterations < 1``, an unknown rule or weights choice,
    or a ``train`` result whose keys/shapes differ from theta_0.
    """
    p = _check_p(p)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    iterations = int(iterations)
    fractions = selection_fractions(p, iterations, fraction_rule)
    if return_weights not in RETURN_WEIGHTS:
        raise ValueError(f"return_weights must be one of {RETURN_WEIGHTS}, got {return_weights!r}")
    if prev_mask is not None:
        validate_mask(prev_mask, theta0)
        mask: Mask = {k: v.clone() for k, v in prev_mask.items()}
    else:
        mask = full_mask(theta0)
    numel = {k: v.numel() for k, v in theta0.items()}
    final_targets = {k: target_count(numel[k], fractions[-1]) for k in theta0}

    history: list[GradLTNStep] = []
    last_trained: State | None = None
    i = 0
    while i < iterations:
        trainable_fraction = _fraction(mask)
        # A fresh copy per run: Alg. 1 resets to theta_0, and a caller's train must not be able to
        # corrupt theta_0 for later iterations by updating its input in place.
        trained = train(_clone_state(theta0), {k: v.clone() for k, v in mask.items()})
        validate_same_layout(theta0, trained, "theta0", "train's result")
        last_trained = trained
        new_mask: Mask = {}
        for k, t0 in theta0.items():
            current = mask[k]
            k_target = min(target_count(numel[k], fractions[i]), int(current.sum().item()))
            gamma = (trained[k].detach().to(t0.device) - t0.detach()).abs()
            new_mask[k] = topk_mask(gamma, k_target, within=current)
        mask = new_mask
        history.append(GradLTNStep(i, True, trainable_fraction, _fraction(mask)))
        i += 1
        fixed = all(final_targets[k] >= int(mask[k].sum().item()) for k in mask)
        if stop_when_fixed and fixed and i < iterations:
            # Trainings i .. L-2 only feed selections that keep the mask; skip them.
            for j in range(i, iterations - 1):
                history.append(GradLTNStep(j, False, _fraction(mask), _fraction(mask)))
            if return_weights == "thetaL":
                # The last run defines theta_L; its selection cannot change the (fixed) mask.
                fr = _fraction(mask)
                last_trained = train(_clone_state(theta0), {k: v.clone() for k, v in mask.items()})
                validate_same_layout(theta0, last_trained, "theta0", "train's result")
                history.append(GradLTNStep(iterations - 1, True, fr, fr))
            else:
                history.append(GradLTNStep(iterations - 1, False, _fraction(mask), _fraction(mask)))
            break

    if return_weights == "theta0" or last_trained is None:
        weights = _clone_state(theta0)
    else:
        weights = {k: v.detach() for k, v in last_trained.items()}
    return GradLTNResult(mask=mask, weights=weights, personal_fraction=_fraction(mask), history=history)


def _fraction(mask: Mapping[str, Tensor]) -> float:
    n_true, n_all = personal_count(mask)
    return n_true / n_all if n_all else 0.0


def split_shared_personal(
    state: Mapping[str, Tensor], mask: Mapping[str, Tensor]
) -> tuple[State, dict[str, Tensor]]:
    """Split theta into (u, v) as in Pillutla et al. 2022 Sec. 2 / FedSelect Alg. 1's return.

    Returns ``shared``: a copy of the state whose personal entries are zeroed (so uploading it can
    never leak a personal value), and ``personal``: for every tensor the 1-D tensor of its personal
    entries in row-major order (empty when the tensor has none).
    """
    validate_mask(mask, state)
    shared: State = {}
    personal: dict[str, Tensor] = {}
    for k, t in state.items():
        m = mask[k].to(t.device)
        shared[k] = torch.where(m, torch.zeros((), dtype=t.dtype, device=t.device), t.detach())
        personal[k] = t.detach()[m].clone()
    return shared, personal


def merge(
    state_global: Mapping[str, Tensor], personal_values: Mapping[str, Tensor], mask: Mapping[str, Tensor]
) -> State:
    """theta_k = (u_global, v_k): the global state with the client's personal entries written back.

    Inverse of ``split_shared_personal`` (Pillutla et al. 2022 Sec. 2; FedSelect's broadcast of u).
    ``personal_values[k]`` must hold exactly ``mask[k].sum()`` values; a tensor may be absent from
    ``personal_values`` only if it has no personal entries.
    """
    validate_mask(mask, state_global)
    out: State = {}
    for k, g in state_global.items():
        m = mask[k].to(g.device)
        n_personal = int(m.sum().item())
        t = g.detach().clone()
        if k not in personal_values:
            if n_personal:
                raise ValueError(f"personal values are missing tensor {k!r} ({n_personal} personal entries)")
            out[k] = t
            continue
        vals = personal_values[k]
        if vals.dim() != 1 or vals.numel() != n_personal:
            raise ValueError(
                f"tensor {k!r}: mask has {n_personal} personal entries but {tuple(vals.shape)} values given"
            )
        t[m] = vals.to(dtype=t.dtype, device=t.device)
        out[k] = t
    return out


@dataclass(frozen=True)
class PersonalPart:
    """What a client keeps between rounds: its personal values v_k (1-D per tensor) and packed mask m_k.

    The storage form of Pillutla et al. 2022's v_k for an element-wise FedSelect mask; the shared u is
    re-obtained from the server's global state (``restore``).
    """

    values: dict[str, Tensor]
    packed_mask: dict[str, PackedTensor]

    @classmethod
    def capture(cls, state: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> PersonalPart:
        """Keep v_k (values moved to the CPU) and the bit-packed m_k of a client's state."""
        _, personal = split_shared_personal(state, mask)
        return cls(values={k: v.cpu() for k, v in personal.items()}, packed_mask=pack_mask(mask))

    def mask(self, device: torch.device | str | None = None) -> Mask:
        """The unpacked personal mask m_k."""
        return unpack_mask(self.packed_mask, device=device)

    def restore(self, state_global: Mapping[str, Tensor]) -> tuple[State, Mask]:
        """(theta_k, m_k): the global state with v_k written back, and the mask, on the global's device."""
        device = next(iter(state_global.values())).device if state_global else None
        m = self.mask(device)
        return merge(state_global, self.values, m), m

    def nbytes(self) -> int:
        """Storage bytes: the personal values plus ceil(numel / 8) per packed mask tensor."""
        vals = sum(v.numel() * v.element_size() for v in self.values.values())
        bits = sum((math.prod(pt.shape) + 7) // 8 for pt in self.packed_mask.values())
        return vals + bits
