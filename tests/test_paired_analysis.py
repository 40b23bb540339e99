"""Paired differences (analysis/paired.py) on synthetic numbers: t-intervals, pairing by seed and
client, what is left out and why, and the Markdown/CSV output."""

from __future__ import annotations

import csv
import io

import pytest

from analysis.paired import (
    CSV_FIELDS,
    PairedError,
    SeedResult,
    paired_csv,
    paired_difference,
    paired_markdown,
    paired_results,
    seed_results,
    t_interval,
    t_quantile,
)
from fedselect.tracking.compare import RunStats


def _stats(group: str, seed: str, final: float, clients: dict[int, float] | None = None) -> RunStats:
    return RunStats(run_id=f"{group}-{seed}", run_name=f"{group}-seed{seed}", group=group, algorithm="fedavg",
                    seed=seed, status="FINISHED", final_acc=final, best_acc=final + 0.01, client_spread=0.0,
                    bytes_up_per_client_round=1.0, bytes_down_per_client_round=1.0, wall_seconds=1.0,
                    compute_backward=None, tracking_uri="sqlite:///x.db", client_acc=clients or {})


def test_t_quantiles_match_the_tables():
    # two-sided 95%: the 0.975 quantile
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9600, abs=1e-3)


def test_t_interval_mean_sample_std_and_wins():
    iv = t_interval([0.01, 0.02, 0.03])  # mean 0.02, sample std 0.01, se 0.01 / sqrt(3)
    half = 4.302653 * 0.01 / 3 ** 0.5
    assert iv.n == 3 and iv.mean == pytest.approx(0.02) and iv.defined
    assert (iv.low, iv.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert (iv.wins, iv.ties) == (3, 0)
    mixed = t_interval([0.1, -0.1, 0.0, 0.2])
    assert (mixed.wins, mixed.ties) == (2, 1) and mixed.low < 0 < mixed.high


def test_one_difference_has_no_interval():
    iv = t_interval([0.05])
    assert iv.mean == 0.05 and iv.low is None and iv.high is None and not iv.defined
    with pytest.raises(ValueError, match="no differences"):
        t_interval([])


def test_paired_difference_pairs_seeds_and_clients():
    a = {"0": SeedResult(0.80, 0.82, {0: 0.7, 1: 0.9}), "1": SeedResult(0.60, 0.70, {0: 0.5, 1: 0.7}),
         "2": SeedResult(0.90, 0.90, {0: 0.9, 1: 0.9})}
    b = {"0": SeedResult(0.70, 0.75, {0: 0.6, 1: 0.8}), "1": SeedResult(0.65, 0.65, {0: 0.6, 1: 0.7})}
    result = paired_difference("A", "B", a, b)
    assert result.seeds == ("0", "1")
    assert result.final.n == 2 and result.final.mean == pytest.approx((0.10 - 0.05) / 2)
    assert (result.final.wins, result.best.wins) == (1, 2)
    assert result.best.mean == pytest.approx((0.07 + 0.05) / 2)
    # clients: 0.1, 0.1 (seed 0), -0.1, 0.0 (seed 1)
    assert result.clients.n == 4 and result.clients.mean == pytest.approx(0.025)
    assert (result.clients.wins, result.clients.ties) == (2, 1)
    assert result.notes == ("A vs B: seed(s) 2 only in A; left out",)


def test_clients_missing_or_different_are_noted():
    a = {"0": SeedResult(0.8, 0.8, {0: 0.8, 1: 0.8, 2: 0.8}), "1": SeedResult(0.8, 0.8, {})}
    b = {"0": SeedResult(0.7, 0.7, {0: 0.7, 1: 0.7}), "1": SeedResult(0.7, 0.7, {0: 0.7})}
    result = paired_difference("A", "B", a, b)
    assert result.clients.n == 2 and result.clients.mean == pytest.approx(0.1)
    assert any("evaluated different clients (3 vs 2); paired the 2" in n for n in result.notes)
    assert any("seed 1: no per-client accuracies (acc_per_client/*) logged by A" in n for n in result.notes)
    no_clients = paired_difference("A", "B", {"0": SeedResult(0.8, 0.8)}, {"0": SeedResult(0.7, 0.7)})
    assert no_clients.clients is None and not no_clients.final.defined
    assert paired_difference("A", "B", {"0": SeedResult(0.8, 0.8)}, {"1": SeedResult(0.7, 0.7)}) is None


def test_paired_results_from_run_stats():
    groups = {"a": [_stats("a", "0", 0.8, {0: 0.8}), _stats("a", "1", 0.9, {0: 0.9})],
              "b": [_stats("b", "0", 0.7, {0: 0.7}), _stats("b", "1", 0.7, {0: 0.7})],
              "c": [_stats("c", "5", 0.5)]}
    results, notes = paired_results([("a", "b"), ("a", "c"), ("a", "zzz")], groups)
    assert [(r.a, r.b) for r in results] == [("a", "b")]
    assert results[0].final.mean == pytest.approx(0.15) and results[0].clients.n == 2
    assert notes == ["a vs c: no seed has runs of both; pair left out",
                     "a vs zzz: no runs of zzz in the selection; pair left out"]
    with pytest.raises(PairedError, match="variant a has two runs of seed 0"):
        seed_results("a", [_stats("a", "0", 0.8), _stats("a", "0", 0.9)])


def test_markdown_and_csv_say_undefined_for_one_seed():
    one_seed = paired_difference("A", "B", {"0": SeedResult(0.80, 0.85, {0: 0.8, 1: 0.8})},
                                 {"0": SeedResult(0.75, 0.85, {0: 0.7, 1: 0.8})})
    lines = paired_markdown([one_seed], ["something left out"])
    assert lines[0] == "## Paired differences" and "Student-t" in lines[2] and "optimistic" in lines[2]
    row = next(line for line in lines if line.startswith("| A | B | 1 |"))
    assert row == ("| A | B | 1 | +5.00 (interval undefined: 1 seed) | 1/1 | +0.00 (interval undefined: 1 seed) "
                   "| +5.00 [-58.53, +68.53] | 1/2 (1 tied) |")
    assert lines[-1] == "Note: something left out"
    assert paired_markdown([]) == []
    rows = list(csv.DictReader(io.StringIO(paired_csv([one_seed]))))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert rows[0]["final_diff_mean"] == str(one_seed.final.mean)
    assert rows[0]["final_diff_ci_low"] == "" and rows[0]["final_diff_ci_high"] == ""
    assert rows[0]["best_ties"] == "1" and rows[0]["client_pairs"] == "2"
