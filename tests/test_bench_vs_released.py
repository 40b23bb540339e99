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
