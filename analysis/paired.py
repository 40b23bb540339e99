"""Paired differences between two run variants of a study: "A beats B" as a measured statement.

Runs of the same seed see the same partition (the same clients with the same train/test
splits), so A and B are compared seed by seed and, within a seed, client by client:

- over seeds: per seed, A's final-round (and best-round) mean client accuracy minus B's; the
  mean of these differences and its 95% Student-t interval (n - 1 degrees of freedom). This is
  the conservative statement: seeds are independent repetitions of the whole experiment. With
  one seed the interval is undefined (no spread to estimate), and is reported so.
- over clients: per (seed, client), A's final accuracy on that client's test split minus B's;
  mean and 95% t-interval over these pairs. It treats clients as independent, which they are not
  (a seed's clients share one training run), so the interval is optimistic (too narrow).
- wins: on how many seeds (clients) A's accuracy is higher than B's; ties are not wins.

Pure: numbers in, numbers and text out (the t quantile comes from scipy, which MLflow needs).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedselect.tracking.compare import RunStats

LEVEL = 0.95
CSV_FIELDS: tuple[str, ...] = (
    "a", "b", "seeds",
    "final_diff_mean", "final_diff_ci_low", "final_diff_ci_high", "final_a_wins", "final_ties",
    "best_diff_mean", "best_diff_ci_low", "best_diff_ci_high", "best_a_wins", "best_ties",
    "last_diff_mean", "last_diff_ci_low", "last_diff_ci_high", "last_a_wins", "last_ties",
    "client_pairs", "client_diff_mean", "client_diff_ci_low", "client_diff_ci_high", "client_a_wins",
    "client_ties",
)


class PairedError(ValueError):
    """A variant has two runs of one seed: its runs cannot be paired."""


@dataclass(frozen=True)
class Interval:
    """Mean of n paired differences (A - B) with its Student-t interval; low/high None when n < 2."""

    n: int
    mean: float
    low: float | None
    high: float | None
    wins: int
    ties: int

    @property
    def defined(self) -> bool:
        return self.low is not None


@dataclass(frozen=True)
class SeedResult:
    """What pairing needs of one run: its final and best mean accuracy, per-client final accuracy."""

    final_acc: float
    best_acc: float
    client_acc: Mapping[int, float] = field(default_factory=dict)
    last_acc: float | None = None  # mean accuracy over the run's last few evaluations (RunStats.last_acc)


@dataclass(frozen=True)
class PairedResult:
    """A versus B: differences over seeds (final, best round) and over (seed, client) pairs."""

    a: str
    b: str
    seeds: tuple[str, ...]
    final: Interval
    best: Interval
    clients: Interval | None  # None: no seed has per-client accuracies of both runs
    notes: tuple[str, ...] = ()
    last: Interval | None = None  # over seeds, of the last-evaluations means; None: a run lacks them


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``diffs`` and its two-sided Student-t interval (sample std, n - 1 dof)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no differences to summarize")
    mean = math.fsum(diffs) / n
    wins = sum(d > 0 for d in diffs)
    ties = sum(d == 0 for d in diffs)
    if n < 2:
        return Interval(n=n, mean=mean, low=None, high=None, wins=wins, ties=ties)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(n=n, mean=mean, low=mean - half, high=mean + half, wins=wins, ties=ties)


def paired_difference(a: str, b: str, runs_a: Mapping[str, SeedResult],
                      runs_b: Mapping[str, SeedResult]) -> PairedResult | None:
    """A minus B on their shared seeds (None when they share none); notes say what was left out."""
    seeds = sorted(set(runs_a) & set(runs_b), key=_seed_key)
    notes = []
    for name, runs in ((a, runs_a), (b, runs_b)):
        only = sorted(set(runs) - set(seeds), key=_seed_key)
        if only:
            notes.append(f"{a} vs {b}: seed(s) {', '.join(only)} only in {name}; left out")
    if not seeds:
        return None
    client_diffs = []
    for seed in seeds:
        ca, cb = runs_a[seed].client_acc, runs_b[seed].client_acc
        if not ca or not cb:
            notes.append(f"{a} vs {b}, seed {seed}: no per-client accuracies (acc_per_client/*) logged by "
                         f"{a if not ca else b}; seed left out of the client pairs")
            continue
        shared = sorted(set(ca) & set(cb))
        if len(shared) != len(ca) or len(shared) != len(cb):
            notes.append(f"{a} vs {b}, seed {seed}: the runs evaluated different clients ({len(ca)} vs {len(cb)}); "
                         f"paired the {len(shared)} both evaluated")
        client_diffs += [ca[c] - cb[c] for c in shared]
    return PairedResult(
        a=a, b=b, seeds=tuple(seeds),
        final=t_interval([runs_a[s].final_acc - runs_b[s].final_acc for s in seeds]),
        best=t_interval([runs_a[s].best_acc - runs_b[s].best_acc for s in seeds]),
        clients=t_interval(client_diffs) if client_diffs else None, notes=tuple(notes), last=_last_interval(
            [(runs_a[s].last_acc, runs_b[s].last_acc) for s in seeds]))


def _last_interval(pairs: Sequence[tuple[float | None, float | None]]) -> Interval | None:
    """A minus B of the last-evaluations means over seeds; None when any run lacks them."""
    if any(a is None or b is None for a, b in pairs):
        return None
    return t_interval([a - b for a, b in pairs])


def _seed_key(seed: str) -> tuple[int, str]:
    return (int(seed), "") if seed.isdigit() else (1 << 62, seed)


def seed_results(variant: str, members: Sequence[RunStats]) -> dict[str, SeedResult]:
    """A variant's runs keyed by seed; two runs of one seed are an error naming them."""
    out: dict[str, SeedResult] = {}
    by_seed: dict[str, str] = {}
    for s in members:
        if s.seed in out:
            raise PairedError(f"variant {variant} has two runs of seed {s.seed} ({by_seed[s.seed]} and {s.run_id}): "
                              "cannot pair its runs by seed")
        out[s.seed] = SeedResult(final_acc=s.final_acc, best_acc=s.best_acc, client_acc=dict(s.client_acc),
                                 last_acc=s.last_acc)
        by_seed[s.seed] = s.run_id
    return out


def paired_results(pairs: Sequence[tuple[str, str]],
                   groups: Mapping[str, Sequence[RunStats]]) -> tuple[list[PairedResult], list[str]]:
    """The study's ``paired:`` pairs computed on the selected runs; notes for pairs left out."""
    results, notes = [], []
    for a, b in pairs:
        missing = [name for name in (a, b) if name not in groups]
        if missing:
            notes.append(f"{a} vs {b}: no runs of {' or '.join(missing)} in the selection; pair left out")
            continue
        result = paired_difference(a, b, seed_results(a, groups[a]), seed_results(b, groups[b]))
        if result is None:
            notes.append(f"{a} vs {b}: no seed has runs of both; pair left out")
            continue
        results.append(result)
        notes += result.notes
    return results, notes


# ----------------------------------------------------------------------------------- output


def _pp(value: float) -> str:
    return f"{100 * value:+.2f}"


def _interval_cell(iv: Interval, unit: str) -> str:
    if not iv.defined:
        return f"{_pp(iv.mean)} (interval undefined: 1 {unit})"
    return f"{_pp(iv.mean)} [{_pp(iv.low)}, {_pp(iv.high)}]"


def _wins_cell(iv: Interval) -> str:
    return f"{iv.wins}/{iv.n}" + (f" ({iv.ties} tied)" if iv.ties else "")


PAIRED_EXPLANATION = (
    "Δ = A − B in percentage points of mean client accuracy, paired by seed (same seed: same partition and "
    "clients). CI over seeds: 95% Student-t interval of the mean per-seed difference (n − 1 degrees of freedom), "
    "the conservative one; if it excludes 0, A's lead holds beyond seed-to-seed variation (undefined with one "
    "seed). CI over clients: the same over (seed, client) pairs of final per-client accuracy, treating clients as "
    "independent, hence optimistic (too narrow). Last evals: the same over seeds of each run's mean accuracy over "
    "its last few evaluated rounds (the summary's column). Wins: seeds (clients) where A's accuracy is higher."
)


def paired_markdown(results: Sequence[PairedResult], notes: Sequence[str] = ()) -> list[str]:
    """The "Paired differences" section (heading, explanation, table, notes); [] without pairs or notes."""
    if not results and not notes:
        return []
    lines = ["## Paired differences", "", PAIRED_EXPLANATION, ""]
    if results:
        has_last = all(r.last is not None for r in results)
        last_header = ["last-evals Δ (pp) [95% CI over seeds]", "A wins (seeds, last evals)"] if has_last else []
        header = ["A", "B", "seeds", "final Δ (pp) [95% CI over seeds]", "A wins (seeds)", *last_header,
                  "best-round Δ (pp) [95% CI over seeds]", "final Δ (pp) [95% CI over clients, optimistic]",
                  "A wins (clients)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in results:
            clients = r.clients
            last = [_interval_cell(r.last, "seed"), _wins_cell(r.last)] if has_last else []
            cells = [r.a, r.b, str(len(r.seeds)), _interval_cell(r.final, "seed"), _wins_cell(r.final), *last,
                     _interval_cell(r.best, "seed"), "" if clients is None else _interval_cell(clients, "client"),
                     "" if clients is None else _wins_cell(clients)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Note: {n}" for n in notes]
    return lines


def _interval_fields(prefix: str, iv: Interval | None) -> dict[str, float | int | None]:
    if iv is None:
        return {}
    return {f"{prefix}_diff_mean": iv.mean, f"{prefix}_diff_ci_low": iv.low, f"{prefix}_diff_ci_high": iv.high,
            f"{prefix}_a_wins": iv.wins, f"{prefix}_ties": iv.ties}


def paired_csv(results: Sequence[PairedResult]) -> str:
    """One row per pair with the columns of :data:`CSV_FIELDS`; differences as fractions, "" = undefined."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = {"a": r.a, "b": r.b, "seeds": len(r.seeds), **_interval_fields("final", r.final),
               **_interval_fields("best", r.best), **_interval_fields("last", r.last),
               **_interval_fields("client", r.clients),
               "client_pairs": 0 if r.clients is None else r.clients.n}
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CSV_FIELDS})
    return buf.getvalue()
