"""Training throughput: Ray Train + DeepSpeed versus plain single-process PyTorch, one run.

    python -m bench.train_throughput --json FILE [--steps 120] [--data-dir DIR]

Same model (the tiny preset), same data, same global batch (micro batch × 2), same 2 cores:
* ``torch``: one process, ``torch.set_num_threads(2)``, AdamW, a plain loop;
* ``ray_deepspeed``: ``tasks.train.train`` — 2 Ray Train workers × 1 thread, gloo all-reduce,
  a DeepSpeed engine (ZeRO-1) in each, checkpoints as configured.
Tokens = non-pad source + target tokens. The first ``warmup`` steps are not timed.
``ratio`` = torch tokens/s ÷ Ray+DeepSpeed tokens/s (per core; both use 2 cores).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import emit

ROOT = Path(__file__).resolve().parent.parent
FLOPS_PER_TOKEN = 4.3e6  # ~6 x the parameters a token passes through (tiny preset, copy head)


def plain_torch(spec, warmup: int, threads: int) -> dict:
    """The same loop as a Ray worker, in one process with ``threads`` threads, timed the same way
    as the Ray side: tokens/s over windows of 5 steps, the median of the windows after warm-up."""
    import torch

    from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
    from tasks.adapters import split_loss
    from tasks.adapters.seq2seq import load_pairs
    from tasks.train import PROGRESS_EVERY, batch_indices, make_optimizer
    torch.set_num_threads(threads)
    src, tgt, vocab_size = load_pairs(spec.data_dir, spec.vocab_dir, spec.splits, spec.max_src_len)
    torch.manual_seed(spec.seed)
    model = Seq2Seq(Seq2SeqConfig(**{**spec.model, "vocab_size": vocab_size})).train()
    opt = make_optimizer(model.parameters(), spec)  # the trainer's own (fused AdamW)
    gb = spec.micro_batch * spec.num_workers
    tokens, t_last, history = 0, time.perf_counter(), []
    for step in range(spec.steps):
        rows = batch_indices(len(src), step, gb, spec.seed, 0, 1)
        batch = make_batch([src[i] for i in rows], [tgt[i] for i in rows])
        loss, _ = split_loss(model.loss(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int((batch["tgt_ids"] != 0).sum() + batch["src_mask"].sum())
        if (step + 1) % PROGRESS_EVERY == 0:  # the Ray side's progress window (tasks/train.py)
            now = time.perf_counter()
            history.append({"step": step + 1, "tokens_per_s": tokens / (now - t_last)})
            tokens, t_last = 0, now
    rate, n = timed_rate(history, warmup)
    return {"tokens_per_s": rate, "timed_steps": spec.steps - warmup, "final_loss": float(loss.detach()),
            "windows": n, "window_steps": PROGRESS_EVERY}


def matmul_peak_gflops(threads: int, n: int = 2048, reps: int = 20) -> float:
    """This machine's fp32 matmul rate on ``threads`` threads (n x n, best of ``reps``): the peak
    the model FLOP utilisation (MFU) is reported against."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 / best / 1e9


def timed_rate(history: list[dict], warmup: int) -> tuple[float, int]:
    """Both sides' one measure: the median tokens/s of the full PROGRESS_EVERY-step windows that
    start after ``warmup`` (a last partial window, or a validation/resume event, is not one)."""
    from tasks.train import PROGRESS_EVERY
    rates = [h["tokens_per_s"] for h in history
             if "tokens_per_s" in h and h["step"] % PROGRESS_EVERY == 0 and h["step"] - PROGRESS_EVERY >= warmup]
    if not rates:
        raise ValueError(f"no full {PROGRESS_EVERY}-step window after {warmup} warm-up steps; train longer")
    return float(np.median(rates)), len(rates)


def ray_deepspeed(spec, warmup: int, storage: str) -> dict:
    from tasks.train import PROGRESS_EVERY, train
    res = train(spec, storage)
    rate, n = timed_rate(res.history, warmup)
    return {"tokens_per_s": rate, "timed_steps": spec.steps - warmup,
            "windows": n, "window_steps": PROGRESS_EVERY,
            "final_loss": res.final_loss, "wall_s_incl_startup": round(res.wall_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--data-dir", type=Path)
    a = ap.parse_args(argv)
    import flows  # noqa: F401  (embedded defaults)
    from dataclasses import replace

    from models.seq2seq import PRESETS
    from tasks.sample import prepare_training_set
    from tasks.hw import cpu_label
    from tasks.train import TrainSpec
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, vocab_dir = map(str, prepare_training_set(tmp, a.data_dir, n_train=4000, n_dev=100, n_test=10))
        spec = TrainSpec(data_dir=data_dir, vocab_dir=vocab_dir, model=dict(PRESETS["tiny"]), steps=a.steps,
                         micro_batch=a.micro_batch, zero_stage=a.zero_stage, num_workers=2,
                         checkpoint_every=a.steps, seed=0)
        peak = matmul_peak_gflops(cores)
        torch_side = plain_torch(spec, a.warmup, threads=cores)
        ray_side = ray_deepspeed(replace(spec), a.warmup, str(Path(tmp) / "ray"))
    result = {
        "bench": "train_throughput", "model": "tiny (copy head)", "global_batch": a.micro_batch * 2,
        "zero_stage": a.zero_stage, "steps": a.steps, "warmup": a.warmup,
        "data": str(a.data_dir) if a.data_dir else "generated sample",
        "machine": {"cpus": cores, "platform": platform.platform(), "cpu": cpu_label()},
        "timing": "median tokens/s over 5-step windows after warm-up, both sides",
        "torch_tokens_per_s": round(torch_side["tokens_per_s"], 1),
        "ray_deepspeed_tokens_per_s": round(ray_side["tokens_per_s"], 1),
        "torch_tokens_per_s_per_core": round(torch_side["tokens_per_s"] / cores, 1),
        "ray_deepspeed_tokens_per_s_per_core": round(ray_side["tokens_per_s"] / cores, 1),
        "ratio": round(torch_side["tokens_per_s"] / ray_side["tokens_per_s"], 3),
        "flops_per_token": FLOPS_PER_TOKEN,
        "matmul_peak_gflops_fp32": round(peak, 1),
        "mfu": {side: round(r["tokens_per_s"] * FLOPS_PER_TOKEN / (peak * 1e9), 4)
                for side, r in (("torch", torch_side), ("ray_deepspeed", ray_side))},
        "torch": torch_side, "ray_deepspeed": ray_side,
    }
    emit(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
