"""Where the vq attention core's time goes: a profiled fwd+bwd, split into GEMMs (with their
FLOPs and rate, in place and alone) and everything between them, next to SDPA's time.

    .venv/bin/python -m bench.vq_profile --lengths 8192,32768 --threads 2 --json bench/results/vq-profile-avx2.json

The inputs, impls and SDPA baseline are :mod:`bench.attention`'s (batch 1, 8 heads × 64, causal,
fp32; ``vq1`` the one-block window). Per length, in this one process: the impl's and SDPA's
fwd+bwd wall time (median of ``--repeat`` after a warm-up, no profiler), then one fwd+bwd under
torch.profiler with shapes recorded. Every leaf GEMM (``mm``, ``bmm``, ``addmm``, ``baddbmm``
and their in-place forms that call no other GEMM) is counted as 2·m·k·n FLOPs per batch entry and
its self time; the biggest GEMM shapes are then run alone on contiguous hot operands, at the run's
threads and at one, for the rate a GEMM of that shape reaches with nothing between calls. The
profiler slows the run, so the JSON gives the profile's split as fractions and the wall time
unprofiled. SDPA's FLOPs are counted nominally: causal fwd+bwd, 7 GEMM passes over T²/2 cells,
7·H·D·T² in all.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench import emit
from bench.attention import HEAD_DIM, HEADS, IMPLS, Impl, fwd_bwd_seconds, machine, make_inputs

GEMMS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_"})
CATEGORY = {"aten::exp2_": "exp2", "aten::exp2": "exp2", "aten::copy_": "copy (bias seeding, strided outputs)",
            "aten::argmin": "quantiser argmin"}
ELEMENTWISE = frozenset({"aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_",
                         "aten::div", "aten::div_", "aten::sum", "aten::amax", "aten::maximum", "aten::where",
                         "aten::fill_", "aten::zero_", "aten::clamp_min", "aten::clamp_min_", "aten::log2",
                         "aten::neg", "aten::isfinite", "aten::round"})
INDEXING = frozenset({"aten::index_select", "aten::index", "aten::index_add", "aten::index_add_",
                      "aten::scatter_add_", "aten::gather", "aten::bincount", "aten::index_put_"})


def operands(name: str, shapes: list) -> tuple[tuple, tuple]:
    """The two matrix operands' shapes of one GEMM call from its recorded inputs (mm/bmm: the
    first two, an ``out=`` comes third; the add forms: after the added input)."""
    a, b = (shapes[0], shapes[1]) if name in ("aten::mm", "aten::bmm") else (shapes[1], shapes[2])
    return tuple(a), tuple(b)


def gemm_flops(a: tuple, b: tuple) -> int:
    """2·m·k·n (× batch) of A (…, m, k) · B (…, k, n)."""
    return 2 * (a[0] if len(a) == 3 else 1) * a[-2] * a[-1] * b[-1]


def _is_leaf_gemm(ev) -> bool:
    stack = list(ev.cpu_children)
    while stack:
        c = stack.pop()
        if c.name in GEMMS:
            return False
        stack.extend(c.cpu_children)
    return True


def split(events) -> tuple[dict, dict]:
    """(seconds per category, GEMM shape groups {(op, shapes): [calls, flops, self_s]}) of one
    profile's events, by self time."""
    cats: dict[str, float] = defaultdict(float)
    shapes: dict[tuple, list] = {}
    for ev in events:
        s = ev.self_cpu_time_total / 1e6
        if ev.name in GEMMS and _is_leaf_gemm(ev):
            cats["gemm"] += s
            mats = operands(ev.name, ev.input_shapes)
            g = shapes.setdefault((ev.name, mats), [0, 0, 0.0])
            g[0] += 1
            g[1] += gemm_flops(*mats)
            g[2] += s
        elif ev.name in CATEGORY:
            cats[CATEGORY[ev.name]] += s
        elif ev.name in ELEMENTWISE:
            cats["other elementwise"] += s
        elif ev.name in INDEXING:
            cats["indexing (code sums, gathers)"] += s
        elif ev.name.startswith("aten::"):
            cats["other aten (views, allocation, GEMM wrappers)"] += s
        else:
            cats["python / autograd (Functions, engine)"] += s
    return dict(cats), shapes


def alone_rate(mats: tuple, threads: int, seconds: float = 0.2) -> float:
    """GFLOP/s of bmm/mm on contiguous hot operands of these shapes at ``threads``."""
    a_shape, b_shape = mats
    a, b = torch.randn(*a_shape), torch.randn(*b_shape)
    out = torch.empty(*a_shape[:-1], b_shape[-1])
    op = torch.bmm if len(a_shape) == 3 else torch.mm
    flops = gemm_flops(a_shape, b_shape)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        op(a, b, out=out)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            op(a, b, out=out)
            n += 1
        return flops * n / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(prev)


def profile_point(impl: str, T: int, threads: int, repeat: int, sdpa: bool, top: int) -> dict:
    """One length: wall times (impl, and SDPA when ``sdpa``), the profile's split by category,
    the GEMM shape groups by time (the ``top`` ones also run alone), the FLOP ceiling against
    SDPA's nominal count, and the wall time the GEMMs' alone rates would give."""
    cpu, spec, sdpa_spec = torch.device("cpu"), IMPLS[impl], IMPLS["sdpa"]
    q, k, v, grad = make_inputs(T, torch.float32, cpu)
    state = spec.setup(cpu, torch.float32)

    def median_s(contender: Impl, st: object) -> float:  # after a warm-up
        fwd_bwd_seconds(contender, st, q, k, v, grad, cpu)
        return statistics.median(fwd_bwd_seconds(contender, st, q, k, v, grad, cpu) for _ in range(repeat))

    wall = median_s(spec, state)
    with torch.profiler.profile(record_shapes=True) as prof:
        fwd_bwd_seconds(spec, state, q, k, v, grad, cpu)
    cats, shapes = split(prof.events())
    total = sum(cats.values())
    flops = sum(s[1] for s in shapes.values())
    gemm_s = cats.get("gemm", 0.0)
    groups = sorted(shapes.items(), key=lambda kv: -kv[1][2])
    rows, proj_gemm_s = [], 0.0
    for i, ((op, mats), (calls, fl, s)) in enumerate(groups):
        row = {"op": op, "shapes": " · ".join("x".join(map(str, m)) for m in mats), "calls": calls,
               "gflop": round(fl / 1e9, 3), "self_s": round(s, 4),
               "gflops_in_place": round(fl / s / 1e9, 1) if s else None}
        if i < top:
            row["gflops_alone"] = round(alone_rate(mats, threads), 1)
            row["gflops_alone_1_thread"] = round(alone_rate(mats, 1), 1)
            proj_gemm_s += fl / (row["gflops_alone"] * 1e9)
            rows.append(row)
        else:  # the small rest: at the in-place rate
            proj_gemm_s += s
    point = {"impl": impl, "seq_len": T, "fwd_bwd_s": round(wall, 4), "profiled_s": round(total, 4),
             "fractions": {c: round(s / total, 4) for c, s in sorted(cats.items(), key=lambda kv: -kv[1])},
             "gemm_gflop": round(flops / 1e9, 2),
             "gemm_gflops_in_place": round(flops / gemm_s / 1e9, 1) if gemm_s else None,
             "gemm_shapes": rows,
             # the wall time if the GEMMs ran at the alone rates, everything else unchanged
             "fwd_bwd_s_gemms_at_alone_rate": round(wall * (1 - gemm_s / total) + wall / total * proj_gemm_s, 4),
             "sdpa_gflop_nominal": round(7 * HEADS * HEAD_DIM * T * T / 1e9, 1)}
    point["flop_ceiling_over_sdpa"] = round(point["sdpa_gflop_nominal"] / point["gemm_gflop"], 2)
    if sdpa:
        s = median_s(sdpa_spec, sdpa_spec.setup(cpu, torch.float32))
        point.update(sdpa_fwd_bwd_s=round(s, 4), sdpa_over_impl=round(s / wall, 3),
                     sdpa_over_impl_gemms_at_alone_rate=round(s / point["fwd_bwd_s_gemms_at_alone_rate"], 3),
                     sdpa_gflops=round(point["sdpa_gflop_nominal"] / s, 1))
    return point


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--impl", choices=sorted(i for i in IMPLS if i.startswith("vq")), default="vq1")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=6, help="GEMM shapes (by time) also run alone")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    points = [profile_point(args.impl, int(n), args.threads, args.repeat, not args.no_sdpa, args.top)
              for n in args.lengths.split(",") if n]
    emit({"machine": machine(args.threads, torch.device("cpu")),
          "config": {"impl": args.impl, "batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32",
                     "causal": True, "repeat": args.repeat, "codebook_size": 512, "block_len": 512},
          "points": points}, args.json)


if __name__ == "__main__":
    main()
