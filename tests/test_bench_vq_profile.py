"""bench.vq_profile: the profiler's GEMM FLOPs are counted once each (nested GEMM calls, out=
operands) and, for a real vq1 fwd+bwd, equal the kernel's pass count worked out by hand."""
from __future__ import annotations

import math

import torch

from bench.vq_profile import gemm_flops, profile_point, split
from models.vq_kernel import CAUSAL_ROW_GROUPS, chunk_slices


def _profiled_flops(fn) -> tuple[int, dict]:
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    cats, shapes = split(prof.events())
    return sum(g[1] for g in shapes.values()), cats


def test_each_gemm_counted_once():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 7, 11, generator=g)
    out = torch.empty(3, 5, 11)
    acc = torch.zeros(3, 11, 5).transpose(1, 2)  # strided: in-place baddbmm_ may loop over addmm_

    def work():
        torch.bmm(a, b, out=out)  # an out= operand is recorded third
        acc.baddbmm_(a, b)
        torch.matmul(a, b[0])  # 3-D × 2-D: one mm underneath
        torch.baddbmm(out, a, b, beta=0.5)

    flops, cats = _profiled_flops(work)
    one = gemm_flops((3, 5, 7), (3, 7, 11))
    assert one == 2 * 3 * 5 * 7 * 11
    assert flops == 4 * one
    assert cats["gemm"] > 0


def test_vq1_gemm_flops_match_the_kernels_passes():
    T, H, D, S, L = 1024, 8, 64, 512, 512
    n = T // L
    _, keep = chunk_slices(H * n, L * (S + L), torch.device("cpu"))
    assert not keep  # the recomputing path: 6 GEMM passes per code score, 7 per window score
    R, Lr = CAUSAL_ROW_GROUPS, L // CAUSAL_ROW_GROUPS
    window_cells = sum(Lr * (r + 1) * Lr for r in range(R))  # group r scores its first (r+1)·Lr keys
    per_slice = 6 * 2 * L * S * D + 7 * 2 * window_cells * D
    quantiser = 2 * H * T * S * D
    expected = H * n * per_slice + quantiser
    p = profile_point("vq1", T, torch.get_num_threads(), repeat=1, sdpa=False, top=1)
    assert math.isclose(p["gemm_gflop"], expected / 1e9, abs_tol=0.006), (p["gemm_gflop"], expected / 1e9)
    assert math.isclose(sum(p["fractions"].values()), 1.0, abs_tol=1e-3)
    assert p["gemm_shapes"][0]["gflops_alone"] > 0 and p["gemm_gflops_in_place"] > 0
    assert p["sdpa_gflop_nominal"] == round(7 * H * D * T * T / 1e9, 1)
