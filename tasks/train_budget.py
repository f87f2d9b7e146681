"""A wall-clock budget for the training loop: the ranks re-plan how many steps fit.

``TrainSpec.max_train_s > 0`` turns it on. Every ``interval`` steps rank 0 measures the loop's
time so far (steps, validation passes and checkpoints, plus the time earlier attempts spent before
a resume), divides this attempt's time by its steps, and plans ``done + left / per_step`` steps,
never more than ``spec.steps`` and never fewer than are done. ``left`` keeps back a reserve for
the final validation pass and checkpoint (the last ones' walls). The plan reaches every rank by
an all-reduce (rank 0's value, zeros elsewhere), so all ranks stop at the same step and the
replicas stay identical. The LR schedule decays to the *planned* count, so a run cut by its
budget still ends at the bottom of its schedule, not half-way down it (a plain deadline would).

How often: every 1% of the current plan, at most every ``check_every`` (50) steps. A re-plan
that shortens the run lowers the LR at once and the schedule still ends at its bottom; what a
late slowdown can cut off is only the stretch since the last check, at most ~1% of the plan. With
a fixed 50-step check a 250-step run re-planned every fifth of itself: one slow checkpoint before
the last check made it stop at once with the LR still at 17% of its peak (a CI failure). The
all-reduce a check costs is well under a millisecond on gloo.

Why not size the steps in advance: a probe's per-step cost on a shared 2-core machine was 12% to
28% lower than a long run's (bench/results/vae-mnist.json), so runs sized by a probe overran the
30-minute budget. The plan and the loop's time are saved in the checkpoint, so a resumed run
keeps both. What counts: the loop only; start-up (Ray, the worker group, DeepSpeed's engine,
~20 s here) and evaluation come on top.
"""
from __future__ import annotations

from dataclasses import dataclass


def fit_steps(done: int, start: int, attempt_s: float, spent_s: float, budget_s: float,
              reserve_s: float, cap: int) -> int:
    """The step count that ends inside ``budget_s``: ``done`` steps so far, of which this attempt
    ran ``done - start`` in ``attempt_s`` seconds; ``spent_s`` seconds of the budget are used
    (earlier attempts included); ``reserve_s`` is kept back for the last validation and
    checkpoint. Between ``done`` (stop now) and ``cap`` (never above it)."""
    if budget_s <= 0:
        return cap
    if done <= start or attempt_s <= 0:
        return cap
    per_step = attempt_s / (done - start)
    left = budget_s - spent_s - reserve_s
    if left <= 0:
        return min(done, cap)
    return min(cap, max(done, done + int(left / per_step)))


@dataclass
class StepBudget:
    """The planned step count of one attempt and the loop time it has used."""

    budget_s: float        # 0: off (the plan stays at ``cap``)
    cap: int               # spec.steps: the most steps the run may take
    total: int             # the plan the LR schedule decays to; starts at ``cap`` or the checkpoint's
    spent_before_s: float = 0.0  # loop seconds of the attempts before this one
    check_every: int = 50
    last_val_s: float = 0.0   # the last validation pass's wall ...
    last_ckpt_s: float = 0.0  # ... and the last checkpoint's: kept back for the final ones

    @property
    def reserve_s(self) -> float:
        return self.last_val_s + self.last_ckpt_s

    def state(self, attempt_s: float) -> dict:
        """What a checkpoint keeps: the plan and the loop seconds used so far."""
        return {"plan_total": self.total, "loop_s": self.spent_before_s + attempt_s}

    @classmethod
    def resume(cls, budget_s: float, cap: int, client: dict | None, check_every: int = 50) -> "StepBudget":
        client = client or {}
        return cls(budget_s, cap, int(client.get("plan_total", cap)), float(client.get("loop_s", 0.0)), check_every)

    @property
    def interval(self) -> int:
        """Steps between checks: 1% of the plan, at least 1, at most ``check_every``. Every rank
        holds the same plan, so every rank checks at the same steps."""
        return max(1, min(self.check_every, self.total // 100))

    def due(self, done: int) -> bool:
        return self.budget_s > 0 and done % self.interval == 0 and done < self.total

    def replan(self, done: int, start: int, attempt_s: float, rank: int, reduce) -> int:
        """Rank 0's plan, shared by all-reduce; returns (and keeps) the agreed total."""
        import torch
        mine = fit_steps(done, start, attempt_s, self.spent_before_s + attempt_s, self.budget_s,
                         self.reserve_s, self.cap) if rank == 0 else 0
        self.total = int(reduce(torch.tensor([mine], dtype=torch.int64)).item())
        return self.total
