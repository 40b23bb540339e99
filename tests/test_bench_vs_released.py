"""bench/fedselect_vs_released.py --repeat: each side-by-side run's ratio, and their median and range."""

from __future__ import annotations

import sys

import pytest

from .conftest import load_bench


def _load():
    return load_bench("fedselect_vs_released.py", "vs_released_bench")


def test_repeats_report_each_pair_and_the_median_ratio(capsys):
    module = _load()
    run = lambda rel, ours: {"released": {"s_per_round": rel, "ms_per_train_pass": rel / 800 * 1000},  # noqa: E731
                             "ours": {"s_per_round": ours, "ms_per_train_pass": ours / 600 * 1000}}
    figures = module.print_repeats([run(20.0, 10.0), run(24.0, 16.0), run(18.0, 10.0), {"released": {}, "ours": None}])
    assert figures["ratio_median"] == pytest.approx(1.8) and figures["ratio_min"] == pytest.approx(1.5)
    assert figures["ratio_max"] == pytest.approx(2.0)
    assert figures["per_pass_ratio_median"] == pytest.approx(1.8 * 600 / 800)
    out = capsys.readouterr().out
    assert "median 1.80 (range 1.50-2.00)" in out and out.count("\n") >= 5


def test_repeat_below_one_is_a_usage_error(monkeypatch):
    module = _load()
    monkeypatch.setattr(sys, "argv", ["fedselect_vs_released.py", "--repeat", "0", "--sides", "ours"])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2


def _rounds(passes: list[int], seconds: list[float]) -> dict:
    return {"rounds": [{"round": i, "train_passes": p, "seconds": s, "cpu_seconds": s, "eval_passes": 2000,
                        "eval_seconds": 1.0, "mask_seconds": 0.5, "train_seconds": 0.5 * s, "other_seconds": 0.1}
                       for i, (p, s) in enumerate(zip(passes, seconds, strict=True))],
            "hwm_total_kb": 1024, "hwm_rounds_kb": 1024, "rss_after_setup_kb": 1024, "setup_seconds": 1.0}


def test_ratios_count_only_rounds_of_equal_work():
    """Ours skips the empty personal pass in rounds 0-1; the released code skips aggregation in its
    last round: neither kind of round may enter the per-round ratio."""
    report = load_bench("vs_released_report.py", "vs_released_report_module")
    results = {"released": _rounds([800] * 5, [15.0, 22.0, 21.0, 20.0, 14.0]),
               "ours": _rounds([400, 400, 800, 800, 800], [4.0, 7.0, 10.0, 11.0, 11.0])}
    assert report.equal_work_rounds(results) == [2, 3]
    sums = report.pair_summaries(results)
    assert sums["released"]["s_per_round"] == pytest.approx(20.5) and sums["ours"]["s_per_round"] == pytest.approx(10.5)
    assert sums["ours"]["train_passes_per_round"] == sums["released"]["train_passes_per_round"] == 800
    three = {side: {**res, "rounds": res["rounds"][:3]} for side, res in results.items()}
    assert report.equal_work_rounds(three) == []  # round 1 differs, round 2 is the last
    assert report.pair_summaries(three)["ours"]["s_per_round"] == pytest.approx(8.5)  # fallback: rounds 1-2
    # one side alone: its rounds of full work, neither first nor last (ours: as in the pair)
    assert report.equal_work_rounds({"ours": results["ours"], "released": None}) == [2, 3]
    assert report.equal_work_rounds({"released": results["released"], "ours": None}) == [1, 2, 3]
    assert report.equal_work_rounds({"ours": None, "released": None}) == []


def test_a_search_is_timed_without_the_training_calls_it_makes():
    """GradLTN's search counts as mask update less its trainings, which count as training."""
    import time

    measure = load_bench("vs_released_measure.py", "bench_vs_released_measure")
    clock = measure.RoundClock(counter=None)
    train = measure.timed(lambda: time.sleep(0.05), lambda: None, clock.add_train_time)

    def search():
        train()
        train()
        time.sleep(0.02)

    measure.timed_around(search, lambda: None, lambda: clock.train_total, clock.add_mask_time)()
    assert 0.1 <= clock.train_s[0] < 0.15
    assert 0.02 <= clock.mask_s[0] < 0.05
