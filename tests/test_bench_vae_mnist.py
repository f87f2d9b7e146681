"""bench.vae_mnist's budget sizing: the probe line and the step count that fits a budget."""
import pytest

from bench.vae_mnist import budget_steps, cost_from_walls


def test_cost_from_walls_recovers_the_line():
    fixed, per = 23.0, 0.0216
    c = cost_from_walls({3000: fixed + 3000 * per, 1000: fixed + 1000 * per})
    assert c["per_step_ms"] == pytest.approx(21.6, abs=1e-3)
    assert c["fixed_s"] == pytest.approx(23.0, abs=1e-2)


def test_cost_from_walls_refuses_a_busy_probe():
    with pytest.raises(ValueError, match="busy"):
        cost_from_walls({1000: 50.0, 3000: 49.0})
    with pytest.raises(ValueError, match="two probe"):
        cost_from_walls({1000: 50.0})


def test_budget_steps_fits_and_rounds_down_to_whole_validations():
    cost = {"per_step_ms": 21.618, "fixed_s": 23.34}
    n = budget_steps(cost, 28 * 60)
    assert n % 1000 == 0
    assert cost["fixed_s"] + n * cost["per_step_ms"] / 1e3 <= 28 * 60
    assert cost["fixed_s"] + (n + 1000) * cost["per_step_ms"] / 1e3 > 28 * 60
    assert n == 76_000  # (1680 - 23.34) / 0.021618 = 76,633 -> 76,000
    with pytest.raises(SystemExit, match="larger budget"):
        budget_steps(cost, 30.0)
