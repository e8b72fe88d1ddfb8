"""The A/B test, by simulation: calibrated under A/A, powered as it promises."""

from __future__ import annotations

import pytest

from aimesh_recommend import stats

BASE_RATE = 0.10


def test_aa_false_positive_rate_is_at_most_five_percent() -> None:
    n = stats.required_exposures(BASE_RATE)
    assert stats.simulate(BASE_RATE, 0.0, n, runs=100_000, seed=1) <= 0.05


def test_power_on_a_five_percent_lift_at_the_reported_sample_size() -> None:
    n = stats.required_exposures(BASE_RATE)
    assert stats.simulate(BASE_RATE, stats.DETECTABLE_LIFT, n, runs=20_000, seed=2) >= 0.8


def test_verdicts() -> None:
    clear = stats.compare(stats.Variant("v1", 10_000, 1_000), stats.Variant("v2", 10_000, 1_200))
    assert (clear.verdict, clear.winner) == ("v2 better", "v2")
    assert clear.p_value < 0.001
    worse = stats.compare(stats.Variant("v1", 10_000, 1_200), stats.Variant("v2", 10_000, 1_000))
    assert worse.verdict == "v1 better"
    close = stats.compare(stats.Variant("v1", 1_000, 100), stats.Variant("v2", 1_000, 105))
    assert (close.verdict, close.winner) == ("not significant yet", "")
    assert close.required_exposures == stats.required_exposures(0.1)
    empty = stats.compare(stats.Variant("v1", 0, 0), stats.Variant("v2", 0, 0))
    assert empty.p_value == 1.0 and empty.required_exposures == 0


def test_wilson_interval_holds_the_rate() -> None:
    low, high = stats.wilson_interval(100, 1000)
    assert low < 0.1 < high
    assert stats.wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("base", [0.02, 0.3])
def test_required_exposures_shrink_as_the_rate_grows(base: float) -> None:
    assert stats.required_exposures(base) > 0
    assert stats.required_exposures(0.02) > stats.required_exposures(0.3)
