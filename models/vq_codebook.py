"""Transformer-VQ's codebook (ALGORITHMS.md §8): nearest-code quantisation with the
straight-through gradient, per-code sums of values (what earlier blocks contribute), and the
EMA k-means update with rank-shared dead-code restarts.

Pure tensor functions; :class:`models.attention_vq.VQAttention` owns the buffers (``codebook``
(H, S, D), ``ema_count`` (H, S), ``ema_sum`` (H, S, D), ``ema_sq`` (H, S)) and calls these."""
from __future__ import annotations

import torch


@torch.no_grad()
def quantise(k: torch.Tensor, codebook: torch.Tensor, cells: int = 1 << 20) -> torch.Tensor:
    """Nearest code per key: k (B, H, T, D), codebook (H, S, D) -> codes (B, H, T) long.

    ‖c‖² − 2·k·c (‖k‖² dropped) by one fused GEMM per chunk of about ``cells`` distances into a
    reused buffer: fresh (B, H, T, S) tensors cost more in page faults and separate passes than
    the GEMM itself on CPU."""
    B, H, T, D = k.shape
    S = codebook.size(1)
    c = codebook.to(k.dtype)
    if B > 1:
        c = c.repeat(B, 1, 1)  # (B·H, S, D): one batch entry per (b, h)
    k2 = k.reshape(B * H, T, D)
    c_sq = (c * c).sum(-1)[:, None, :]  # (B·H, 1, S)
    c_t = c.transpose(1, 2)
    rows = max(1, min(T, cells // max(1, B * H * S)))
    buf = k.new_empty(B * H, rows, S)
    out = torch.empty(B * H, T, dtype=torch.long, device=k.device)
    for lo in range(0, T, rows):
        hi = min(T, lo + rows)
        d = torch.baddbmm(c_sq, k2[:, lo:hi], c_t, alpha=-2.0, out=buf[:, :hi - lo])
        out[:, lo:hi] = d.argmin(-1)
    return out.view(B, H, T)


def gather_codes(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codebook (H, S, D), codes (B, H, T) -> code vectors (B, H, T, D)."""
    heads = torch.arange(codebook.size(0), device=codes.device)[None, :, None]  # (1, H, 1)
    return codebook[heads, codes]


class _StraightThrough(torch.autograd.Function):
    """C[z] forward, the identity backward to k: ``k + (C[z] − k).detach()`` without its two
    full-size passes."""

    @staticmethod
    def forward(ctx, k, codebook, codes):
        return gather_codes(codebook.to(k.dtype), codes)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def straight_through(k: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """k̂ = C[z] in value, identity gradient to k."""
    return _StraightThrough.apply(k, codebook.detach(), codes)


def code_sums(v: torch.Tensor, w: torch.Tensor | None, codes: torch.Tensor, n_block: int, n_code: int,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block, per-code sums of w·v and of w: v (B, H, T, D), w (B, 1|H, T) or None (all
    ones), codes (B, H, T), T = n_block·L -> (B, H, n_block, S, D), (B, H, n_block, S), in
    float32 at least."""
    B, H, T, D = v.shape
    L = T // n_block
    blk = torch.arange(T, device=v.device) // L  # (T,)
    rows = torch.arange(B * H, device=v.device)[:, None] * n_block + blk[None, :]  # (B·H, T)
    idx = (rows * n_code + codes.reshape(B * H, T)).reshape(-1)  # one cell per (b, h, block, code)
    acc = torch.promote_types(v.dtype, torch.float32)  # half-precision sums lose counts past 256
    cells = B * H * n_block * n_code
    if w is None:
        vw = v.to(acc).reshape(-1, D)
        counts = torch.bincount(idx, minlength=cells).to(acc)
    else:
        w = w.expand(B, H, T).to(acc)
        vw = (v.to(acc) * w[..., None]).reshape(-1, D)
        counts = vw.new_zeros(cells).index_add(0, idx, w.reshape(-1))
    sums = vw.new_zeros(cells, D).index_add(0, idx, vw)
    return sums.view(B, H, n_block, n_code, D), counts.view(B, H, n_block, n_code)


def ema_codebook_update(module, count: torch.Tensor, ksum: torch.Tensor,
                        ksq: torch.Tensor, generator: torch.Generator) -> None:
    """EMA k-means step from one step's all-reduced stats, then dead-code restarts."""
    g = module.ema_decay
    module.ema_count.mul_(g).add_(count.to(module.ema_count), alpha=1 - g)
    module.ema_sum.mul_(g).add_(ksum.to(module.ema_sum), alpha=1 - g)
    module.ema_sq.mul_(g).add_(ksq.to(module.ema_sq), alpha=1 - g)
    restart_dead_codes(module, generator)
    module.codebook.copy_(module.ema_sum / module.ema_count.clamp_min(1e-2)[..., None])


def restart_dead_codes(module, generator: torch.Generator) -> None:
    """Codes with EMA count < max(dead_threshold, dead_fraction · the head's mean count) restart
    near a live code (drawn by count) with that code's spread as noise; every draw comes from
    ``generator`` (CPU), so ranks agree."""
    cnt = module.ema_count.float().cpu()  # (H, S)
    mean = module.ema_sum.float().cpu() / cnt.clamp_min(1e-2)[..., None]  # (H, S, D)
    var = (module.ema_sq.float().cpu() / cnt.clamp_min(1e-2) - (mean * mean).sum(-1)).clamp_min(0)
    H, S, D = mean.shape
    frac = float(module.dead_fraction)
    for h in range(H):
        # dead: below the absolute threshold or below dead_fraction of this head's mean use
        thr = max(float(module.dead_threshold), frac * float(cnt[h].mean()))
        dead = (cnt[h] < thr).nonzero().flatten()
        if dead.numel() == 0:
            continue
        live = cnt[h].masked_fill(cnt[h] < thr, 0.0)
        probs = live if live.sum() > 0 else torch.ones(S)
        parent = torch.multinomial(probs, dead.numel(), replacement=True, generator=generator)
        noise = torch.randn(dead.numel(), D, generator=generator)
        spread = (var[h, parent] / D).sqrt() + 1e-2 * mean[h, parent].norm(dim=-1) / D ** 0.5 + 1e-6
        new = mean[h, parent] + spread[:, None] * noise  # (n_dead, D)
        dev = module.ema_sum.device
        module.ema_count[h, dead.to(dev)] = 1.0
        module.ema_sum[h, dead.to(dev)] = new.to(module.ema_sum)
        module.ema_sq[h, dead.to(dev)] = ((new * new).sum(-1) + var[h, parent]).to(module.ema_sq)
