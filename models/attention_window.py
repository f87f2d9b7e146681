"""Attention kinds for length extrapolation: sliding window + RoPE, full NoPE with log-n, ALiBi.

Together they express HWFA (ALGORITHMS.md §6): L−1 ``window`` layers then one
``full_nope_logn`` layer (see models/attention_pattern.py for the named per-layer patterns).

* ``window`` (option ``window`` = w): causal sliding-window attention with RoPE; token i sees
  i−w+1..i (w INCLUDES the token itself). :func:`window_attention` computes it in blocks of
  queries, each against its own w−1+block keys, so time and memory are O(T·w) — no T×T mask.
  Its :class:`WindowCache` keeps only the last w−1 keys/values and counts the absolute position
  separately, so RoPE offsets keep counting past w.
* ``full_nope_logn`` (option ``train_len`` = N): full causal attention, no position encoding,
  the query at 0-based position i scaled by log(i+1)/log(N)/√d — the number of visible tokens
  n = i+1, so the scale is exactly 1/√d at n = N (:func:`logn_scale`); not clipped, as in the
  post (option ``clip=True`` uses max(1, log_N n), as some implementations do).
* ``alibi``: full causal attention, no RoPE, the score of key j for query i biased by
  −m_h·(i−j) with the head slopes m_h of Press et al. (:func:`alibi_slopes`).

The full kinds and ``alibi`` ignore the ``rope`` they are given (the model hands the same
Rotary to every layer; each kind decides). Full kinds keep all K/V in a ``KVCache``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import KVCache, Rotary, register_attention, refuse_options


# --------------------------------------------------------------------------- pure functions
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
                     scale: float | None = None, block: int | None = None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal sliding-window attention, computed block by block in O(T·w).

    q (B, H, T, D); k, v (B, H, S, D) with S ≥ T: the last T keys are the queries' own positions,
    the first S−T are earlier positions (a decoding cache). Query t (absolute position S−T+t)
    attends to keys S−T+t−w+1 .. S−T+t that exist. Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    S = k.size(2)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if S < T:
        raise ValueError(f"{S} keys for {T} queries: window attention needs S >= T")
    scale = D ** -0.5 if scale is None else scale
    P = block or max(window, 16)  # queries per block
    n_blk = -(-T // P)
    past = S - T  # keys before the first query
    # Left-pad keys so query t's window is padded keys [t, t+w-1]; right-pad to whole blocks.
    left = window - 1 - past
    if left < 0:  # more past keys than any window reaches
        k, v, left = k[:, :, -left:], v[:, :, -left:], 0
    right = n_blk * P - T
    k = F.pad(k, (0, 0, left, right))  # (B, H, w-1 + n_blk*P, D)
    v = F.pad(v, (0, 0, left, right))
    span = P + window - 1
    kb = k.unfold(2, span, P).transpose(-1, -2)  # (B, H, n_blk, span, D)
    vb = v.unfold(2, span, P).transpose(-1, -2)  # (B, H, n_blk, span, D)
    qb = F.pad(q, (0, 0, 0, right)).reshape(B, H, n_blk, P, D)  # (B, H, n_blk, P, D)
    scores = (qb @ kb.transpose(-1, -2)) * scale  # (B, H, n_blk, P, span)
    scores = scores.masked_fill(~_block_mask(n_blk, P, window, left, q.device), float("-inf"))
    attn = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    y = attn @ vb  # (B, H, n_blk, P, D)
    return y.view(B, H, n_blk * P, D)[:, :, :T]


def _block_mask(n_blk: int, P: int, window: int, left: int, device) -> torch.Tensor:
    """(n_blk, P, span) bool: query r of block b sees padded key c of its span iff it lies in
    its window (r ≤ c ≤ r+w−1) and is not left padding (b·P + c ≥ left)."""
    r = torch.arange(P, device=device)[:, None]
    c = torch.arange(P + window - 1, device=device)[None, :]
    in_window = (c >= r) & (c <= r + window - 1)  # (P, span)
    start = torch.arange(n_blk, device=device)[:, None, None] * P
    return in_window[None] & (start + c[None] >= left)  # (n_blk, P, span)


def logn_scale(positions: torch.Tensor, train_len: int, head_dim: int, clip: bool = False) -> torch.Tensor:
    """Per-query scale log(n)/log(N)/√d with n = position+1 visible tokens (0-based positions);
    equals 1/√d at n = N. With ``clip``, max(1, log_N n)/√d."""
    if train_len < 2:
        raise ValueError(f"train_len must be >= 2 for the log-n scale, got {train_len}")
    factor = torch.log1p(positions.double()) / math.log(train_len)
    if clip:
        factor = factor.clamp_min(1.0)
    return factor / math.sqrt(head_dim)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): 2^(-8(h+1)/n) for n a power of two, else the slopes of
    the nearest lower power of two followed by every other slope of the next one."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(H, T, S) additive bias: −m_h·(i−j) for key j ≤ query i, −inf for j > i."""
    dist = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)  # (T, S)
    bias = -slopes[:, None, None] * dist  # (H, T, S)
    return bias.masked_fill(dist < 0, float("-inf"))


# --------------------------------------------------------------------------- caches
class WindowCache:
    """The last w−1 keys/values of a window layer (one row per beam) and the absolute position."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.k: torch.Tensor | None = None  # (N, H, <= w-1, D)
        self.v: torch.Tensor | None = None  # (N, H, <= w-1, D)
        self.position = 0  # tokens seen so far (the next token's absolute position)

    @property
    def length(self) -> int:
        """Tokens seen (not keys kept): the RoPE offset of the next token."""
        return self.position

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new (N, H, T, D) keys/values; return the kept past ones followed by the new
        ones, then keep only the last w−1."""
        self.position += k.size(2)
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        start = max(0, k.size(2) - (self.window - 1))
        self.k, self.v = k[:, :, start:], v[:, :, start:]
        return k, v

    def index_select(self, idx: torch.Tensor) -> "WindowCache":
        """A cache whose row i is this cache's row idx[i]."""
        out = WindowCache(self.window)
        out.position = self.position
        if self.k is not None:
            out.k, out.v = self.k.index_select(0, idx), self.v.index_select(0, idx)
        return out


# --------------------------------------------------------------------------- modules
class _SelfAttention(nn.Module):
    """Shared projections and head split of the causal self-attention kinds here."""

    def __init__(self, kind: str, d_model: int, n_head: int, dropout: float, cross: bool):
        super().__init__()
        if cross:
            raise ValueError(f"attention kind {kind!r} is causal self-attention; it has no cross form")
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        self.n_head, self.head_dim, self.dropout = n_head, d_model // n_head, dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
                   for t in self.qkv_proj(x).chunk(3, dim=-1))
        return q, k, v

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, D = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)

    @staticmethod
    def _check(causal: bool, context, key_mask) -> None:
        if context is not None or key_mask is not None or not causal:
            raise ValueError("this attention kind is causal self-attention only "
                             "(causal=True, no context, no key_mask)")


@register_attention("window")
class WindowAttention(_SelfAttention):
    """Causal sliding-window attention with RoPE (window w includes the token itself)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rope: Rotary | None = None,
                 cross: bool = False, layer: int = 0, n_layer: int = 1, *, window: int | None = None,
                 block: int | None = None, **options):
        refuse_options("window", options)
        super().__init__("window", d_model, n_head, dropout, cross)
        if window is None or window < 1:
            raise ValueError(f"attention kind 'window' needs an option window >= 1, got {window}")
        if rope is None:
            raise ValueError("attention kind 'window' applies RoPE: pass the model's Rotary as rope=")
        self.window, self.block, self.rope = window, block, rope

    def new_cache(self) -> WindowCache:
        return WindowCache(self.window)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, causal: bool = True,
                key_mask: torch.Tensor | None = None, cache: WindowCache | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a cache, x continues the cached sequence."""
        self._check(causal, context, key_mask)
        q, k, v = self._qkv(x)  # (B, H, T, D)
        offset = cache.position if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, H, <= w-1 + T, D)
        y = window_attention(q, k, v, self.window, block=self.block,
                             dropout_p=self.dropout if self.training else 0.0)
        return self._out(y)


class _FullCausal(_SelfAttention):
    """Full causal attention over a KVCache, with a per-kind score transform."""

    def new_cache(self) -> KVCache:
        return KVCache()

    def _attend(self, q, k, v, offset: int, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        T, S = q.size(2), k.size(2)
        if bias is None and offset == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale,
                                                  dropout_p=self.dropout if self.training else 0.0)
        if bias is None:  # query offset+t sees keys 0..offset+t
            q_pos = torch.arange(offset, offset + T, device=q.device)
            bias = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # (T, S) bool
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                              dropout_p=self.dropout if self.training else 0.0)


@register_attention("full_nope_logn")
class FullNoPELogNAttention(_FullCausal):
    """Full causal attention, no position encoding, the log-n scale per query position."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rope: Rotary | None = None,
                 cross: bool = False, layer: int = 0, n_layer: int = 1, *, train_len: int | None = None,
                 clip: bool = False, **options):
        refuse_options("full_nope_logn", options)
        super().__init__("full_nope_logn", d_model, n_head, dropout, cross)
        if train_len is None or train_len < 2:
            raise ValueError(f"attention kind 'full_nope_logn' needs an option train_len >= 2 "
                             f"(the training length N), got {train_len}")
        self.train_len, self.clip = train_len, clip

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, causal: bool = True,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        self._check(causal, context, key_mask)
        q, k, v = self._qkv(x)  # (B, H, T, D), no RoPE
        offset = cache.length if cache is not None else 0
        pos = torch.arange(offset, offset + q.size(2), device=x.device)
        scale = logn_scale(pos, self.train_len, self.head_dim, self.clip).to(q.dtype)  # (T,)
        q = q * scale[:, None]  # the row scale folded into q
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, offset+T, D)
        return self._out(self._attend(q, k, v, offset, None, scale=1.0))


@register_attention("alibi")
class ALiBiAttention(_FullCausal):
    """Full causal attention with ALiBi linear distance biases (no RoPE)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rope: Rotary | None = None,
                 cross: bool = False, layer: int = 0, n_layer: int = 1, **options):
        refuse_options("alibi", options)
        super().__init__("alibi", d_model, n_head, dropout, cross)
        self.register_buffer("slopes", alibi_slopes(n_head).float(), persistent=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *, causal: bool = True,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        self._check(causal, context, key_mask)
        q, k, v = self._qkv(x)  # (B, H, T, D)
        offset = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H, offset+T, D)
        q_pos = torch.arange(offset, offset + q.size(2), device=x.device)
        bias = alibi_bias(self.slopes.to(q.dtype), q_pos, torch.arange(k.size(2), device=x.device))
        return self._out(self._attend(q, k, v, offset, bias, scale=self.head_dim ** -0.5))
