"""The VAE base step through the real trainer (Ray Train + DeepSpeed, 2 workers): loop time per
step for several (ZeRO stage, rows per worker), one after the other in one run.

    python -m bench.trainer_step --json FILE [--steps 2000] [--samples 1] [--configs 1:50,1:100]

Shows where a small model's step goes on a 2-core machine: if doubling the rows barely moves the
step time, the step is overhead-bound (all-reduce, optimizer, engine) and a larger batch is
nearly free. ``ms_per_step`` is the whole loop (validations every 1,000 steps and the final
checkpoint included) over its steps; ``median_items_per_s`` the median of the 5-step progress
windows after step 200 (``bench.train_throughput.timed_rate``). This machine drifts ±15% between runs: compare configs of one run.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from bench import emit

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/binarized-mnist/binarized_mnist.npz")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--configs", default="1:50,1:100", help="comma-separated ZERO:ROWS_PER_WORKER")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-trainer-step")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    import flows  # noqa: F401  (embedded defaults)

    from bench.train_throughput import timed_rate
    from bench.vae_mnist import base_spec
    from tasks.hw import cpu_label
    from tasks.train import train
    rows = []
    for c in a.configs.split(","):
        zero, mb = map(int, c.split(":"))
        spec = replace(base_spec(a.data, a.out / f"m{a.samples}", a.samples, a.steps), zero_stage=zero,
                       micro_batch=mb, checkpoint_every=a.steps)
        with tempfile.TemporaryDirectory() as tmp:
            r = train(spec, tmp)
        rate, _ = timed_rate(r.history, warmup=200)  # bench.train_throughput's one measure
        rows.append({"zero_stage": zero, "rows_per_worker": mb, "steps": r.steps, "loop_s": round(r.loop_s, 1),
                     "ms_per_step": round(1000 * r.loop_s / r.steps, 2),
                     "median_items_per_s": round(rate), "final_loss": round(r.final_loss, 3)})
        print(rows[-1], flush=True)
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["step_time_vs_first"] = round(r["ms_per_step"] / base, 3)
    result = {"bench": "trainer_step", "cpu": cpu_label(), "samples": a.samples, "steps": a.steps,
              "workers": 2, "results": rows}
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
