"""AdamW step cost on the CPU: torch's default loop, foreach, and the fused kernel, on what the
trainer hands the optimizer (one flat partition under ZeRO-1/2) and on a model's own tensors.

    python -m bench.optimizer_step --json FILE [--threads 1] [--reps 50]

The trainer's workers run one thread each, so ``--threads 1`` is the default. Times are the
median of ``reps`` steps after 5 warm-up steps; the baseline (torch's default) is measured in the
same run, the same way.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import emit

VAE_SHAPES = [(200, 784), (200,), (200, 200), (200,), (100, 200), (100,), (200, 50), (200,), (200, 200), (200,),
              (784, 200), (784,)]  # the vae-density base model (784-200-200-50), 1.1M parameters


def step_ms(shapes, reps: int, **kw) -> float:
    import torch
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = torch.optim.AdamW(params, lr=1e-3, **kw)
    for _ in range(5):
        opt.step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    import torch

    from tasks.hw import cpu_label
    torch.set_num_threads(a.threads)
    cases = {"flat 1.1M (ZeRO-0 / one rank)": [(1_100_000,)], "flat 550k (ZeRO-1 partition of 2 ranks)": [(550_000,)],
             "VAE base tensors (1.1M in 12)": VAE_SHAPES}
    rows = []
    for name, shapes in cases.items():
        r = {"case": name, "default_ms": step_ms(shapes, a.reps), "foreach_ms": step_ms(shapes, a.reps, foreach=True),
             "fused_ms": step_ms(shapes, a.reps, fused=True)}
        r["default_over_fused"] = r["default_ms"] / r["fused_ms"]
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        print(rows[-1], flush=True)
    result = {"bench": "optimizer_step", "cpu": cpu_label(), "threads": a.threads, "reps": a.reps, "results": rows}
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
