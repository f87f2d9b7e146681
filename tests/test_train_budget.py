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


def _simulate(budget: StepBudget, step_s: float, stall_at: int, stall_s: float) -> tuple[int, float, float]:
    """The training loop's order on a fake clock: a step, the re-plan if due, then (at
    ``stall_at``) a slow checkpoint. Returns the steps run and the LR factor of the last step
    (the schedule of tasks/train.py without warm-up: 1 - step / plan, floored at 0.05), and the
    loop's seconds."""
    t, done, lr = 0.0, 0, 1.0
    while done < budget.total:
        lr = max(0.05, 1 - done / max(1, budget.total))
        t += step_s
        done += 1
        if budget.due(done):
            budget.replan(done, 0, t, 0, lambda x: x)
        if done == stall_at:
            t += stall_s
    return done, lr, t


def test_a_late_slow_checkpoint_does_not_cut_the_schedule_short():
    """8 s budget at 30 steps/s (a 240-step plan), then a 1.7 s stall after step 150 (a
    checkpoint under load): the run re-plans to fewer steps and its last step is still at the
    bottom of the schedule. A fixed 50-step check found the time spent at step 200 and stopped
    there with the LR at 17% of its peak (the CI failure of tests/test_train.py, in miniature)."""
    fixed_interval = type("Fixed", (StepBudget,), {"interval": property(lambda self: self.check_every)})
    steps_old, lr_old, _ = _simulate(fixed_interval(8.0, 100_000, 100_000), 1 / 30, 150, 1.7)
    assert steps_old == 200 and lr_old > 0.1, (steps_old, lr_old)  # what the fixed check did
    b = StepBudget(8.0, 100_000, 100_000)
    steps, lr, t = _simulate(b, 1 / 30, 150, 1.7)
    assert lr < 0.06, (steps, lr)
    assert 150 < steps < 200 and t <= 8.0 + 2 / 30, (steps, t)  # the stall's steps are given back
    assert b.interval == max(1, b.total // 100) < 50


def test_checks_come_every_percent_of_the_plan_at_most_every_fifty_steps():
    b = StepBudget(60.0, 100_000, 100_000)
    assert b.interval == 50 and b.due(50) and not b.due(49)
    b.total = 2500
    assert b.interval == 25 and b.due(75) and not b.due(60)
    b.total = 90
    assert b.interval == 1 and b.due(89) and not b.due(90)
