"""The Transformer-VQ block kernel (models.attention_vq): softmax over [per-code sums of earlier
blocks | the explicit window], forward and backward, with its CPU tiling.

Speed (CPU, :class:`BlockAttention`): short inputs (≤ ``KEEP_CELLS`` scores) run as one batch and
keep the probabilities for the backward. Long ones go flash-style through reused tiles of a
few (head, block) slices: whole (B, H, n, L, S) score tensors page-faulted their way to ~36
GFLOP/s on the AVX2 EPYC, cache-sized tiles run the GEMMs at ~80-100. Scores are exponentiated
with exp2 (log2 e folded into the GEMMs: torch's exp takes a slow path for underflowing results,
~6 ns per element against 0.5), causal blocks skip the empty corner of the causal triangle
(``CAUSAL_ROW_GROUPS``), and the cross-block sums are a loop of adds (torch's cumsum over a
middle dim ran at ~10 ns per element). What is left (``bench.vq_profile``, one-block window, AVX2
EPYC): per query S code scores at 6 GEMM passes and ~W − L/4 window scores at 7, against causal
SDPA's ~T/2 at 7 (a FLOP ceiling of 4.6× SDPA at 8k, 18× at 32k), the GEMMs at 77-84 GFLOP/s
between the other passes (118-137 alone), and 40% of the time outside the GEMMs: elementwise
passes, exp2, bias seeding, Python per tile. Past that takes one fused kernel per slice. (The
page faults of fresh full-size tensors past glibc's 32 MB mmap threshold cost little here:
keeping freed blocks for reuse changed 32k tokens by −6% (one-block window) to +1% (two-block);
see ``bench.attention --allocator heap``.)
"""
from __future__ import annotations

import torch

_LOG2E = 1.4426950408889634  # scores are exponentiated as exp2(log2(e)·x): on CPU torch's exp takes a
# slow path for results that underflow (masked and far-below-max scores: 6.2 ns/element against
# exp2's 0.5 on the AVX2 EPYC), exp2 has none
CPU_CHUNK_CELLS = 1 << 21  # score cells (query × key/code) per CPU chunk: measured on the AVX2 EPYC,
# 8k tokens: whole-tensor scores ran the GEMMs at ~36 GFLOP/s (fresh 134 MB tensors page-fault),
# reused ~4 MB tiles at ~80-90 GFLOP/s
CAUSAL_ROW_GROUPS = 2  # causal: a block's queries in this many groups, each scoring only the window
# keys some of its queries see (the causal triangle's empty corner is skipped)
KEEP_CELLS = 1 << 22  # at most this many score cells in all: one chunk, probabilities kept for the
# backward (short sequences: KgCLUE questions, the LM presets), where the recomputing loop's two
# extra GEMMs and per-chunk overhead measured 10-30% slower than keeping them


def chunk_slices(N: int, cells: int, device: torch.device) -> tuple[int, bool]:
    """(slices per chunk, keep the probabilities for the backward). A slice is one query block of
    one head with ``cells`` scores. Small problems: one chunk, kept. Otherwise all slices at once
    on an accelerator, or on CPU as many as keep a chunk's tiles near ``CPU_CHUNK_CELLS``;
    the backward recomputes them."""
    if N * cells <= KEEP_CELLS:
        return N, True
    return (N if device.type != "cpu" else max(1, min(N, CPU_CHUNK_CELLS // max(1, cells)))), False


def _slice_index(lo: int, hi: int, dims: tuple[int, int, int], like: torch.Size) -> int | slice | list[int]:
    """Where slices lo..hi of the (B, H, n) grid ``dims`` read a tensor whose leading shape
    ``like`` broadcasts to it (each dim 1 or full), as flat indices into its leading dims: an int
    (one shared slice: broadcast), a slice (consecutive: a view) or a list (a gather)."""
    B, H, n = dims
    idx = []
    for i in range(lo, hi):
        b, h, j = i // (H * n), (i // n) % H, i % n
        b, h, j = (x if size > 1 else 0 for x, size in zip((b, h, j), like))
        idx.append((b * like[1] + h) * like[2] + j)
    if all(i == idx[0] for i in idx):
        return idx[0]
    if all(b - a == 1 for a, b in zip(idx, idx[1:])):
        return slice(idx[0], idx[-1] + 1)
    return idx


def _rows(x: torch.Tensor, where: int | slice | list[int]) -> torch.Tensor:
    """x[where] with an int kept as a broadcastable (1, ...) view."""
    if isinstance(where, int):
        return x[where:where + 1]
    return x[where] if isinstance(where, slice) else x[torch.tensor(where, device=x.device)]


class PrefixSum(torch.autograd.Function):
    """y[:, :, j] = Σ_{i ≤ j − shift} x[:, :, i] over the block dim 2 (shift ≥ 1: exclusive), by
    one in-place add per block: torch's cumsum over a middle dim ran at ~10 ns per element
    (200 ms for 64 blocks at 32k tokens) against ~1 for the loop."""

    @staticmethod
    def forward(ctx, x, shift):
        ctx.shift = shift
        y = torch.empty_like(x)
        y[:, :, :shift] = 0
        for j in range(shift, x.size(2)):
            torch.add(y[:, :, j - 1], x[:, :, j - shift], out=y[:, :, j])
        return y

    @staticmethod
    def backward(ctx, dy):
        shift, n = ctx.shift, dy.size(2)
        dx = torch.empty_like(dy)
        dx[:, :, max(0, n - shift):] = 0
        for i in range(n - shift - 1, -1, -1):  # dx[i] = Σ_{j ≥ i + shift} dy[j]; dx[n − shift] = 0
            torch.add(dx[:, :, i + 1], dy[:, :, i + shift], out=dx[:, :, i])
        return dx, None


class BlockAttention(torch.autograd.Function):
    """Per block: softmax over [codes of earlier blocks | keys of the explicit window], jointly
    normalised.

    q (B, H, n, L, D) unscaled queries, ``scale`` applied inside; qw the queries of the window's
    scores, or None for q itself (q rotated for the window's RoPE gets its own gradient);
    cb (H, S, D) codebook; logc (B, H, n, S) log counts (−inf: empty) plus any additive code
    score (its gradient, when asked, sums the code logits' gradient over the block's rows);
    vsum (B, H, n, S, D) per-code value sums and cnt (B, H, n, S) their counts clamped to ≥ 1
    (the code's mean value is vsum / cnt); kb, vb (B, H, n, W, D) the window's keys and values;
    ebias broadcastable to (B, H, n, L, W), additive (bias, −inf masks). ``causal``: the block's
    queries are taken in ``CAUSAL_ROW_GROUPS`` groups and group r scores only the first
    W − L + (r+1)·L/groups window keys, the rest being masked for all its queries (the causal
    triangle is not computed); 1 otherwise.

    Small problems (``chunk_slices``): one pass, probabilities kept for the backward. Large:
    flash-style, chunk by chunk of (head, block) slices into reused tiles, saving only the output
    and each row's log-normaliser; the backward recomputes the tiles (two extra GEMMs) instead
    of keeping 2·T·(S + W)·H floats alive. Scores are in log2 units (× log2 e fused into the
    GEMMs) for exp2. The backward is softmax's: dlogit = p ∘ (dO·value − δ), δ = dO·O.
    """

    @staticmethod
    def forward(ctx, q, qw, cb, logc, vsum, cnt, kb, vb, ebias, scale, causal):
        B, H, n, L, D = q.shape
        S, W, N = cb.size(1), kb.size(3), B * H * n
        c, keep = chunk_slices(N, L * (S + W), q.device)
        rows = CAUSAL_ROW_GROUPS if causal else 1
        R = 1 if keep or L % rows else rows
        q2, k2, v2 = q.reshape(N, L, D), kb.reshape(N, W, D), vb.reshape(N, W, D)
        qw2 = q2 if qw is None else qw.reshape(N, L, D)
        vs2, cn2, lc2 = vsum.reshape(N, S, D), cnt.reshape(N, S), logc.reshape(N, S)
        eb = ebias.reshape(*([1] * (5 - ebias.dim())), *ebias.shape)
        eb_lead, eb2 = eb.shape[:3], eb.reshape(-1, L, W)
        out, lse = q.new_empty(N, L, D), q.new_empty(N, L)
        a_buf, e_buf = q.new_empty(c * L * S), q.new_empty(c * L * W)
        tiny, alpha = torch.finfo(q.dtype).tiny, _LOG2E * scale
        Lr = L // R
        for lo in range(0, N, c):
            hi = min(N, lo + c)
            m_ = hi - lo
            cbc = _rows(cb, _slice_index(lo, hi, (B, H, n), (1, H, 1))).expand(m_, S, D)
            ebc = _rows(eb2, _slice_index(lo, hi, (B, H, n), eb_lead))
            mv = vs2[lo:hi] / cn2[lo:hi, :, None]  # (c, S, D) per-code mean values
            for r in range(R):
                rs, cols = slice(r * Lr, (r + 1) * Lr), W - L + (r + 1) * Lr if R > 1 else W
                qr = q2[lo:hi, rs]
                # count_s · exp(q·c_s): the log-count form
                a = torch.baddbmm(lc2[lo:hi, None, :], qr, cbc.transpose(1, 2), beta=_LOG2E, alpha=alpha,
                                  out=a_buf[:m_ * Lr * S].view(m_, Lr, S))
                e = torch.baddbmm(ebc[:, rs, :cols], qw2[lo:hi, rs], k2[lo:hi, :cols].transpose(1, 2),
                                  beta=_LOG2E, alpha=alpha, out=e_buf[:m_ * Lr * cols].view(m_, Lr, cols))
                m = torch.maximum(a.amax(-1), e.amax(-1))  # (c, Lr): scores of past keys only
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                a.sub_(m[..., None]).exp2_()
                e.sub_(m[..., None]).exp2_()
                den = (a.sum(-1) + e.sum(-1)).clamp_min_(tiny)  # a row with no keys gives 0
                o = torch.bmm(a, mv, out=out[lo:hi, rs]).baddbmm_(e, v2[lo:hi, :cols])
                if keep:  # normalised probabilities, saved for the backward
                    a.div_(den[..., None])
                    e.div_(den[..., None])
                o.div_(den[..., None])
                lse[lo:hi, rs] = m + den.log2()  # log2 of the normaliser, in log2 units
        kept = ((a_buf[:N * L * S].view(N, L, S), e_buf[:N * L * W].view(N, L, W)) if keep
                else (lse.new_empty(0), lse.new_empty(0)))
        ctx.save_for_backward(q, qw, cb, logc, vsum, cnt, kb, vb, ebias, out, lse, *kept)
        ctx.keep, ctx.R, ctx.c, ctx.scale = keep, R, c, scale
        return out.view(B, H, n, L, D)

    @staticmethod
    def backward(ctx, d_out):
        q, qw, cb, logc, vsum, cnt, kb, vb, ebias, out, lse, pa_kept, pe_kept = ctx.saved_tensors
        keep, R, c, scale = ctx.keep, ctx.R, ctx.c, ctx.scale
        B, H, n, L, D = q.shape
        S, W, N = cb.size(1), kb.size(3), B * H * n
        q2, k2, v2 = q.reshape(N, L, D), kb.reshape(N, W, D), vb.reshape(N, W, D)
        qw2 = q2 if qw is None else qw.reshape(N, L, D)
        vs2, cn2, lc2 = vsum.reshape(N, S, D), cnt.reshape(N, S), logc.reshape(N, S)
        eb = ebias.reshape(*([1] * (5 - ebias.dim())), *ebias.shape)
        eb_lead, eb2 = eb.shape[:3], eb.reshape(-1, L, W)
        g = d_out.reshape(N, L, D)
        delta = (g * out).sum(-1)  # (N, L)
        need_logc, need_sum, need_bias = ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[8]
        d_q, d_k, d_v = torch.empty_like(q2), torch.empty_like(k2), torch.empty_like(v2)
        d_qw = None if qw is None else torch.empty_like(q2)  # the window queries' own gradient
        d_sum = torch.empty_like(vs2) if need_sum else None
        d_eb = torch.zeros_like(eb2) if need_bias else None
        d_lc = torch.zeros_like(lc2) if need_logc else None  # the code scores' additive term (a code bias)
        Lr, alpha = L // R, _LOG2E * scale
        p_bufs = None if keep else (q.new_empty(c * Lr * S), q.new_empty(c * Lr * W))
        d_bufs = q.new_empty(c * Lr * S), q.new_empty(c * Lr * W)
        for lo in range(0, N, c):
            hi = min(N, lo + c)
            m_ = hi - lo
            cbc = _rows(cb, _slice_index(lo, hi, (B, H, n), (1, H, 1))).expand(m_, S, D)
            ebi = _slice_index(lo, hi, (B, H, n), eb_lead)
            ebc = _rows(eb2, ebi)
            mv = vs2[lo:hi] / cn2[lo:hi, :, None]
            for r in reversed(range(R)):  # the widest group first: it writes every window key's gradient
                rs, cols = slice(r * Lr, (r + 1) * Lr), W - L + (r + 1) * Lr if R > 1 else W
                qr, qwr, gr = q2[lo:hi, rs], qw2[lo:hi, rs], g[lo:hi, rs]
                if keep:
                    pa, pe = pa_kept, pe_kept
                else:  # recomputed probabilities
                    ls = lse[lo:hi, rs, None]
                    pa = torch.baddbmm(lc2[lo:hi, None, :], qr, cbc.transpose(1, 2), beta=_LOG2E, alpha=alpha,
                                       out=p_bufs[0][:m_ * Lr * S].view(m_, Lr, S)).sub_(ls).exp2_()
                    pe = torch.baddbmm(ebc[:, rs, :cols], qwr, k2[lo:hi, :cols].transpose(1, 2), beta=_LOG2E,
                                       alpha=alpha, out=p_bufs[1][:m_ * Lr * cols].view(m_, Lr, cols)
                                       ).sub_(ls).exp2_()
                dl = delta[lo:hi, rs, None]
                da = torch.bmm(gr, mv.transpose(1, 2), out=d_bufs[0][:m_ * Lr * S].view(m_, Lr, S)).sub_(dl).mul_(pa)
                de = torch.bmm(gr, v2[lo:hi, :cols].transpose(1, 2),
                               out=d_bufs[1][:m_ * Lr * cols].view(m_, Lr, cols)).sub_(dl).mul_(pe)
                if d_qw is None:
                    torch.bmm(da, cbc, out=d_q[lo:hi, rs]).baddbmm_(de, k2[lo:hi, :cols]).mul_(scale)
                else:
                    torch.bmm(da, cbc, out=d_q[lo:hi, rs]).mul_(scale)
                    torch.bmm(de, k2[lo:hi, :cols], out=d_qw[lo:hi, rs]).mul_(scale)
                first = r == R - 1
                if first:
                    torch.baddbmm(d_k[lo:hi], de.transpose(1, 2), qwr, beta=0.0, alpha=scale, out=d_k[lo:hi])
                    torch.bmm(pe.transpose(1, 2), gr, out=d_v[lo:hi])
                else:
                    d_k[lo:hi, :cols].baddbmm_(de.transpose(1, 2), qwr, alpha=scale)
                    d_v[lo:hi, :cols].baddbmm_(pe.transpose(1, 2), gr)
                if need_logc:  # logc enters each code's logit with weight 1
                    d_lc[lo:hi] += da.sum(1)
                if need_sum:
                    if first:
                        torch.bmm(pa.transpose(1, 2), gr, out=d_sum[lo:hi])
                    else:
                        d_sum[lo:hi].baddbmm_(pa.transpose(1, 2), gr)
                if need_bias:
                    if isinstance(ebi, int):
                        d_eb[ebi, rs, :cols] += de.sum(0)
                    elif isinstance(ebi, slice):
                        d_eb[ebi, rs, :cols] += de
                    else:
                        d_eb[:, rs, :cols].index_add_(0, torch.tensor(ebi, device=de.device), de)
            if need_sum:
                d_sum[lo:hi] /= cn2[lo:hi, :, None]
        return (d_q.view(q.shape), None if d_qw is None else d_qw.view(q.shape), None,
                d_lc.view(logc.shape) if need_logc else None,
                d_sum.view(vsum.shape) if need_sum else None, None, d_k.view(kb.shape), d_v.view(vb.shape),
                d_eb.view(ebias.shape) if need_bias else None, None, None)
