"""tasks/train_budget.py: the step plan that fits a wall-clock budget (pure; the real-Ray run
that stops inside its budget is in tests/test_train.py)."""
import pytest

from tasks.train_budget import StepBudget, fit_steps


def test_no_budget_keeps_the_cap():
    assert fit_steps(100, 0, 10.0, 10.0, 0.0, 0.0, 5000) == 5000
    assert StepBudget(0.0, 5000, 5000).due(100) is False


def test_the_plan_is_what_fits_in_the_time_left():
    # 100 steps in 10 s (0.1 s/step), 60 s budget, 10 s used, 5 s kept back -> 450 more steps
    assert fit_steps(100, 0, 10.0, 10.0, 60.0, 5.0, 100_000) == 550
    # a resumed attempt: its own pace (200 steps since step 300 in 10 s: 0.05 s/step), the
    # earlier attempts' 30 s count against the budget -> 20 s left -> 400 more
    assert fit_steps(500, 300, 10.0, 40.0, 60.0, 0.0, 100_000) == 900


def test_the_plan_never_exceeds_the_cap_nor_goes_below_what_is_done():
    assert fit_steps(100, 0, 10.0, 10.0, 1e9, 0.0, 700) == 700
    assert fit_steps(100, 0, 10.0, 70.0, 60.0, 0.0, 700) == 100     # over budget: stop now
    assert fit_steps(100, 0, 10.0, 55.0, 60.0, 8.0, 700) == 100     # the reserve does not fit
    assert fit_steps(800, 0, 10.0, 10.0, 60.0, 0.0, 700) == 700     # already past the cap
    assert fit_steps(0, 0, 0.0, 0.0, 60.0, 0.0, 700) == 700         # nothing measured yet


def test_state_survives_a_resume():
    b = StepBudget(60.0, 1000, 1000, spent_before_s=5.0)
    b.total = 640
    s = b.state(12.5)
    assert s == {"plan_total": 640, "loop_s": pytest.approx(17.5)}
    r = StepBudget.resume(60.0, 1000, s)
    assert (r.total, r.spent_before_s, r.budget_s, r.cap) == (640, 17.5, 60.0, 1000)
    fresh = StepBudget.resume(60.0, 1000, None)  # a checkpoint from before the budget existed
    assert (fresh.total, fresh.spent_before_s) == (1000, 0.0)


def test_replan_takes_rank_zeros_plan_on_every_rank():
    import torch
    seen = []

    def reduce(t):  # what an all-reduce SUM over two ranks gives: rank 0's value, rank 1's zero
        seen.append(int(t.item()))
        return t + torch.zeros_like(t)

    b0, b1 = StepBudget(60.0, 100_000, 100_000), StepBudget(60.0, 100_000, 100_000)
    mine = b0.replan(100, 0, 10.0, 0, reduce)
    assert mine == 600 and b0.total == 600
    b1.replan(100, 0, 10.0, 1, lambda t: t + mine)  # rank 1 contributes 0 and receives rank 0's plan
    assert b1.total == 600 and seen == [600]
    assert b0.due(150) and not b0.due(149) and not b0.due(600)
