"""What watching a training costs: the same short training, inside one Prefect flow run, with
the trainer's progress sent to Prefect per pushed item (``every``: a log line and a progress-
artifact update per 5 steps, the behaviour before 2026-12-03), once per poll (``latest``, the
default now), and not at all (``none``, the floor).

    python -m bench.progress_overhead --json bench/results/progress-overhead.json
        [--steps 3000] [--data ../shared/data/binarized-mnist/binarized_mnist.npz] [--out runs/bench-progress]

The training is the ``vae-density`` flow's ``base`` model with M = 1 (784-200-200-50, 2 x 50 rows
per step, validation every 1,000 steps), a fast step (~20 ms) where the driver's overhead shows
most; each mode trains the same run from scratch in its own storage. The JSON holds each mode's
training wall and its ratio to ``none``, and the machine.
"""
from __future__ import annotations

import flows  # noqa: F401  (embedded defaults before prefect and ray are imported)

import argparse
import shutil
from pathlib import Path

from prefect import flow

from bench import emit

ROOT = Path(__file__).resolve().parent.parent
MODES = ("every", "latest", "none")


def _counted(inner, calls: list[int]):
    def cb(p: dict) -> None:
        calls[0] += 1
        inner(p)
    return cb


@flow(name="bench-progress-overhead")
def measure(data: Path, out: Path, steps: int) -> dict:
    import ray

    from bench.vae_mnist import base_spec
    from tasks.hw import cpu_label
    from tasks.steps import prefect_progress
    from tasks.train import train
    spec = base_spec(data, out, 1, steps)
    rows = {}
    for mode in MODES:
        storage = out / f"ray-{mode}"
        shutil.rmtree(storage, ignore_errors=True)  # a fresh run each time, not a resume
        calls = [0]
        cb = None if mode == "none" else _counted(prefect_progress(spec), calls)
        print(f"mode {mode}: {steps} steps", flush=True)
        res = train(spec, str(storage.resolve()), on_progress=cb, progress="every" if mode == "every" else "latest")
        rows[mode] = {"train_wall_s": round(res.wall_s, 2), "progress_calls": calls[0],
                      "history_items": len(res.history), "median_items_per_s": round(res.tokens_per_s, 1)}
    ray.shutdown()
    floor = rows["none"]["train_wall_s"]
    for r in rows.values():
        r["wall_over_none"] = round(r["train_wall_s"] / floor, 3)
    return {"bench": "progress_overhead", "cpu": cpu_label(), "steps": steps, "model": spec.model,
            "micro_batch": spec.micro_batch, "num_workers": spec.num_workers, "modes": rows,
            "note": "one run per mode, in the order every, latest, none, in one Prefect flow run (one embedded "
                    "Prefect server); wall = the trainer's own (Ray Train start-up included)"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/binarized-mnist/binarized_mnist.npz")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-progress")
    ap.add_argument("--steps", type=int, default=3_000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not a.data.is_file():
        raise SystemExit(f"{a.data}: no such file; pass --data PATH to binarized_mnist.npz")
    result = measure(a.data.resolve(), a.out.resolve(), a.steps)
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
