"""Attention core speed: forward+backward time and peak memory vs sequence length, causal.

    .venv/bin/python -m bench.attention --json bench/results/attention.json --threads 2
    .venv/bin/python -m bench.attention --json /tmp/a.json --lengths 256,512 --impls sdpa,vq,performer

q, k, v are given (no projections): batch 1, 8 heads, head dim 64. The baseline is torch SDPA
with ``is_causal=True`` (no explicit mask), measured in the same run; vq is
:func:`models.attention_vq.vq_attention` (S = 512 codes, block_len 512; ``vq`` the two-block
causal window of the default, ``vq1`` one block), performer is
:func:`models.attention_performer.performer_attention` (m = 256 features), window is
:func:`models.attention_window.window_attention` (w = 128, blocked, O(T·w)). The
``--linear-lengths`` (default 64k) are measured for the linear-time impls only. Every (impl, T)
point runs in a fresh subprocess: its peak memory is the ru_maxrss growth (CUDA: the
max_memory_allocated growth) over a baseline taken after imports and input allocation; its
time is the median of ``--repeat`` runs after a warm-up, with the minor page faults per call.
``--allocator heap`` runs every point with glibc's freed blocks kept for reuse (``ALLOCATORS``),
as a caching allocator would: with the default, tensors over 32 MB (8 heads × 64 × 16k tokens
in fp32) are page-faulted in afresh at every call. ``IMPLS`` is the table of contenders:
add an entry (setup, run) to benchmark another kind. Prints one JSON object; writes a log-log
plot of time vs T.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench import emit

ROOT = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM = 8, 64
WINDOW = 128  # the window impl's w (keys per query, the query included)
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class Impl:
    """A contender: ``setup(device, dtype)`` builds its fixed state once, ``run(q, k, v, state)``
    is the causal attention core timed forward+backward."""

    setup: Callable[[torch.device, torch.dtype], object]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def _vq_setup(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(HEADS, 512, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def _vq_run(q, k, v, codebook):
    from models.attention_vq import vq_attention
    return vq_attention(q, k, v, codebook, block_len=512, causal=True)


def _vq1_run(q, k, v, codebook):
    """vq with a one-block explicit window (prev_block=False): S + L = 1,024 scores per query
    instead of S + 2L = 1,536 (fewer computed: the kernel skips the causal triangle's empty
    corner); counting the GEMM passes of forward and backward, the FLOP ceiling against causal
    SDPA is ~4.6× at 8k and ~18× at 32k (two-block vq: ~2.9× and ~12×)."""
    from models.attention_vq import vq_attention
    return vq_attention(q, k, v, codebook, block_len=512, causal=True, prev_block=False)


def _window_run(q, k, v, _):
    from models.attention_window import window_attention
    return window_attention(q, k, v, WINDOW)


def _performer_setup(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from models.attention_performer import orthogonal_gaussian
    return orthogonal_gaussian(256, HEAD_DIM, torch.Generator().manual_seed(1)).to(device, dtype)


def _performer_run(q, k, v, proj):
    from models.attention_performer import performer_attention
    return performer_attention(q, k, v, proj, causal=True)


IMPLS: dict[str, Impl] = {
    "sdpa": Impl(lambda device, dtype: None, lambda q, k, v, _: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "vq": Impl(_vq_setup, _vq_run),
    "vq1": Impl(_vq_setup, _vq1_run),
    "performer": Impl(_performer_setup, _performer_run),
    "window": Impl(lambda device, dtype: None, _window_run),
}
LINEAR_ONLY_LENGTHS = (65536,)  # measured for the linear-time impls only (SDPA's T x T is the point)
LINEAR_IMPLS = frozenset({"vq", "vq1", "performer", "window"})


# --------------------------------------------------------------------------- one point
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# glibc malloc hands every block over its mmap threshold (at most 32 MB) back to the kernel on
# free, so each fresh tensor above it is page-faulted in again, call after call (at 32k tokens one
# (1, 8, T, 64) fp32 tensor is 64 MB). "heap" keeps freed blocks of any size for reuse (no mmap,
# no trimming), as a caching allocator (jemalloc/tcmalloc, the usual advice for PyTorch on CPU)
# would; every impl of a run gets the same setting.
ALLOCATORS = {"default": {}, "heap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}}


def allocator_env(name: str) -> dict[str, str]:
    """What the point subprocesses' allocator sees: the inherited malloc settings (MALLOC_*,
    GLIBC_TUNABLES, LD_PRELOAD such as jemalloc) with ``ALLOCATORS[name]`` laid over them."""
    inherited = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**inherited, **ALLOCATORS[name]}


def mmapped_bytes(mib: int = 64) -> int:
    """Bytes glibc holds in mmapped blocks while a ``mib`` MiB tensor is alive (mallinfo2's
    hblkhd): the tensor's size under glibc's defaults, 0 when large blocks come from the heap."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    x = torch.empty(mib * 2 ** 20 // 4)
    held = libc.mallinfo2().hblkhd
    del x
    return held


def make_inputs(seq_len: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The benchmark's q, k, v (1, HEADS, T, HEAD_DIM), requiring grad, and the output gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=g).to(device, dtype).requires_grad_(True)
               for _ in range(3))
    return q, k, v, torch.randn(1, HEADS, seq_len, HEAD_DIM, generator=g).to(device, dtype)


def fwd_bwd_seconds(spec: Impl, state: object, q, k, v, grad, device: torch.device) -> float:
    """One timed forward+backward of ``spec`` (the input gradients cleared after)."""
    t0 = time.perf_counter()
    spec.run(q, k, v, state).backward(grad)
    _sync(device)
    q.grad = k.grad = v.grad = None
    return time.perf_counter() - t0


def measure_point(impl: str, seq_len: int, dtype: torch.dtype, device: torch.device, repeat: int) -> dict:
    """fwd+bwd seconds (median after a warm-up), peak memory growth, and minor page faults per
    timed call of one (impl, T)."""
    spec = IMPLS[impl]
    q, k, v, grad = make_inputs(seq_len, dtype, device)
    state = spec.setup(device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    base = _peak_bytes(device)

    def once() -> float:
        return fwd_bwd_seconds(spec, state, q, k, v, grad, device)

    once()  # warm-up: allocator, kernel selection
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [once() for _ in range(repeat)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"impl": impl, "seq_len": seq_len, "fwd_bwd_s": round(statistics.median(times), 5),
            "peak_mem_mib": round((_peak_bytes(device) - base) / 2 ** 20, 1),
            "page_faults_per_call": round(faults / repeat)}


def run_point_subprocess(impl: str, seq_len: int, args: argparse.Namespace) -> dict:
    """One point in a fresh interpreter (clean allocator and ru_maxrss)."""
    cmd = [sys.executable, "-m", "bench.attention", "--point", impl, str(seq_len), "--dtype", args.dtype,
           "--device", args.device, "--threads", str(args.threads), "--repeat", str(args.repeat)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               **ALLOCATORS[args.allocator])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.point_timeout)
    if proc.returncode != 0:
        return {"impl": impl, "seq_len": seq_len, "fwd_bwd_s": None, "peak_mem_mib": None,
                "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def machine(threads: int, device: torch.device) -> dict:
    """CPU model and the SIMD flags that decide CPU attention speed; torch version; the card."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    info = {"cpu": model or platform.processor(), "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": bool({"amx_tile", "amx_bf16"} & flags),
            "threads": threads, "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def ratios(results: list[dict]) -> dict:
    """sdpa time / other impl time at each T, and the first T where performer beats sdpa."""
    t = {(r["impl"], r["seq_len"]): r["fwd_bwd_s"] for r in results if r.get("fwd_bwd_s")}
    lengths = sorted({r["seq_len"] for r in results})
    out: dict = {}
    for impl in sorted({r["impl"] for r in results} - {"sdpa"}):
        out[f"sdpa_over_{impl}"] = {str(n): round(t[("sdpa", n)] / t[(impl, n)], 3)
                                    for n in lengths if ("sdpa", n) in t and (impl, n) in t}
    wins = [n for n in lengths if ("sdpa", n) in t and ("performer", n) in t and t[("performer", n)] < t[("sdpa", n)]]
    out["performer_crossover_len"] = wins[0] if wins else None
    # time growth: t(T) / t(T/2) at every measured doubling (linear time -> ~2, quadratic -> ~4),
    # and the goal figure t(32k) / t(8k) (linear: 4, quadratic: 16).
    for impl in sorted({r["impl"] for r in results}):
        out[f"growth_{impl}"] = {str(n): round(t[(impl, n)] / t[(impl, n // 2)], 3)
                                 for n in lengths if (impl, n) in t and (impl, n // 2) in t}
        if (impl, 32768) in t and (impl, 8192) in t:
            out[f"{impl}_32k_over_8k"] = round(t[(impl, 32768)] / t[(impl, 8192)], 3)
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    """Log-log time vs T, one line per impl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r["impl"] for r in results):
        pts = sorted((r["seq_len"], r["fwd_bwd_s"]) for r in results if r["impl"] == impl and r.get("fwd_bwd_s"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("forward+backward (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--linear-lengths", default=",".join(map(str, LINEAR_ONLY_LENGTHS)),
                    help="extra lengths measured for the linear-time impls only (vq, performer, window)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "attention.png")
    ap.add_argument("--allocator", choices=tuple(ALLOCATORS), default="default",
                    help="glibc malloc as configured (default) or freed blocks kept for reuse (heap): "
                         "every impl of the run gets the same")
    ap.add_argument("--point-timeout", type=float, default=3600.0, help="seconds per (impl, T) subprocess")
    ap.add_argument("--point", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)  # the subprocess mode
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), dtype, device, args.repeat)))
        return
    impls = [i for i in args.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"unknown impls {unknown}; known: {sorted(IMPLS)}")
    lengths = [int(n) for n in args.lengths.split(",") if n]
    if args.linear_lengths:
        lengths += [int(n) for n in args.linear_lengths.split(",") if n and int(n) not in lengths]
    linear_only = set(lengths) - {int(n) for n in args.lengths.split(",") if n}
    results = []
    for n in lengths:
        for impl in impls:
            if n in linear_only and impl not in LINEAR_IMPLS:
                continue
            r = run_point_subprocess(impl, n, args)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    info = machine(args.threads, device)
    doc = {"machine": info, "config": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": args.dtype,
                                       "causal": True, "repeat": args.repeat, "allocator": args.allocator,
                                       "allocator_env": allocator_env(args.allocator), "vq": {"codebook_size": 512, "block_len": 512},
                                       "performer": {"nb_features": 256},
                                       "window": {"window": WINDOW}},
           "results": results, "ratios": ratios(results)}
    if args.plot:
        plot(results, args.plot, f"{info['cpu'] if device.type == 'cpu' else info.get('gpu')}, "
                                 f"{args.threads} threads, {args.dtype}")
        doc["plot"] = str(args.plot)
    emit(doc, args.json)


if __name__ == "__main__":
    main()
