"""Performer / FAVOR+ attention (Choromanski et al. 2021; ALGORITHMS.md §7): positive random
features make softmax attention linear in T.

``favor_features(x, ω) = exp(ωx − ‖x‖²/2)/√m`` has E[φ(q)·φ(k)] = exp(q·k) exactly for rows
ω ~ N(0, I); q and k are scaled by D^-1/4 first, so the product estimates exp(q·k/√D).
:func:`orthogonal_gaussian` draws ω as orthogonal blocks with chi-distributed row norms
(marginally N(0, I), lower variance), from a ``torch.Generator``.

Stabilisation in :func:`performer_attention` (exact: the attention is a ratio, so a factor
shared by a query's numerator and denominator cancels):

* keys: ``exp(ω_i·k − ‖k‖²/2) = exp(‖ω_i‖²/2) · exp(−‖k − ω_i‖²/2)``; the key side keeps
  ``exp(−‖k − ω_i‖²/2) ≤ 1`` and the per-feature constant ``exp(‖ω_i‖²/2)`` moves to the query
  side. No max over keys at all, so nothing in causal mode looks at future keys, and decoding
  is bit-for-bit the same maths;
* queries: ``ω_i·q + ‖ω_i‖²/2`` minus its max over features (one constant per query).

Causal attention is chunked: exact masked products inside a chunk of ``chunk_len`` keys, plus
prefix sums of the key-feature ⊗ value states of earlier chunks, (T/chunk, m, D) at most --
never a (T, m, D) tensor. Decoding carries an (m, D) state and an (m,) normaliser per head.

Soft-VQ reading (§7): the stabilised key feature ``exp(−‖k − ω_i‖²/2)`` is an unnormalised
soft assignment of k to "code" ω_i, and ``exp(ω_i·q)`` is Transformer-VQ's ``exp(qCᵀ)``: the
random ω play the codebook, and the zero-temperature limit of the normalised assignment is the
one-hot nearest code Δ of Transformer-VQ (tested in tests/test_attention_performer.py).

The projection is a persistent buffer (shared by the heads); ``redraw_every`` > 0 redraws it in
``train_step_begin`` from the rank-shared generator. Position: RoPE on q and k before the
features (FAVOR+ estimates exp of any dot product, so relative positions survive). Roles:
encoder and decoder self-attention; cross-attention stays softmax (a short memory projected
once per question, where exact softmax is cheap).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.attention import Rotary, register_attention


# --------------------------------------------------------------------------- features
def orthogonal_gaussian(m: int, d: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                        ) -> torch.Tensor:
    """(m, d) rows in orthogonal blocks of d, each row's norm chi(d): marginally N(0, I)."""
    g = torch.randn(math.ceil(m / d), d, d, generator=generator, dtype=torch.float64)
    qmat, r = torch.linalg.qr(g)  # (n_block, d, d), one batched QR
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-orthogonal
    rows = qmat.transpose(-1, -2).reshape(-1, d)[:m]  # (m, d) unit rows, orthogonal within a block
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)  # chi(d)
    return (rows * norms[:, None]).to(dtype)


def favor_features(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Positive random features: x (..., T, D), proj (m, D) -> exp(proj·x − ‖x‖²/2)/√m (..., T, m)."""
    m = proj.size(0)
    return torch.exp(x @ proj.to(x.dtype).T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(m)


def key_features(k: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Stabilised key features exp(−‖k − ω_i‖²/2) ∈ (0, 1]: (..., T, D) -> (..., T, m)."""
    w = proj.to(k.dtype)
    sq = (k * k).sum(-1, keepdim=True) + (w * w).sum(-1) - 2.0 * (k @ w.T)
    return torch.exp(-0.5 * sq.clamp_min(0))


def query_features(q: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Stabilised query features exp(ω_i·q + ‖ω_i‖²/2 − max_i): (..., T, D) -> (..., T, m)."""
    w = proj.to(q.dtype)
    logit = q @ w.T + 0.5 * (w * w).sum(-1)
    return torch.exp(logit - logit.amax(-1, keepdim=True).detach())


# --------------------------------------------------------------------------- attention
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj: torch.Tensor, *,
                        causal: bool, key_mask: torch.Tensor | None = None, chunk_len: int = 128,
                        ) -> torch.Tensor:
    """FAVOR+ estimate of softmax(q kᵀ/√D) v: q, k, v (B, H, T, D), proj (m, D) -> (B, H, T, D).

    key_mask (B, T) True = real key. Half-precision inputs are computed in float32.
    """
    B, H, T, D = q.shape
    dt = q.dtype
    q, k, v = (x.to(_acc_dtype(dt)) for x in (q, k, v))
    c = D ** -0.25
    qf, kf = query_features(q * c, proj), key_features(k * c, proj)  # (B, H, T, m)
    if key_mask is not None:
        kf = kf * key_mask[:, None, :, None].to(kf.dtype)
    if not causal:
        state, norm = kf.transpose(-1, -2) @ v, kf.sum(2)  # (B, H, m, D), (B, H, m)
        out = (qf @ state) / (qf @ norm[..., None]).clamp_min(torch.finfo(q.dtype).tiny)
        return out.to(dt)
    C = min(chunk_len, T)
    n = math.ceil(T / C)
    pad = n * C - T
    if pad:
        qf, kf, v = (torch.cat((x, x.new_zeros(B, H, pad, x.size(-1))), 2) for x in (qf, kf, v))
    m = qf.size(-1)
    qb, kb, vb = qf.view(B, H, n, C, m), kf.view(B, H, n, C, m), v.view(B, H, n, C, D)
    state = kb.transpose(-1, -2) @ vb  # (B, H, n, m, D): one chunk's Σ φ(k) ⊗ v
    norm = kb.sum(3)  # (B, H, n, m)
    state = torch.cat((torch.zeros_like(state[:, :, :1]), state.cumsum(2)[:, :, :-1]), 2)  # earlier chunks
    norm = torch.cat((torch.zeros_like(norm[:, :, :1]), norm.cumsum(2)[:, :, :-1]), 2)
    scores = (qb @ kb.transpose(-1, -2)).tril()  # (B, H, n, C, C): this chunk, causal
    num = qb @ state + scores @ vb  # (B, H, n, C, D)
    den = (qb @ norm[..., None]) + scores.sum(-1, keepdim=True)
    out = num / den.clamp_min(torch.finfo(q.dtype).tiny)
    return out.reshape(B, H, n * C, D)[:, :, :T].to(dt)


# --------------------------------------------------------------------------- decoding cache
class PerformerCache:
    """Incremental state of one performer layer, one row per beam: Σ φ(k) ⊗ v (N, H, m, D) and
    Σ φ(k) (N, H, m); size independent of the length."""

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None  # (N, H, m, D)
        self.norm: torch.Tensor | None = None  # (N, H, m)
        self.length = 0

    def index_select(self, idx: torch.Tensor) -> "PerformerCache":
        out = PerformerCache()
        out.length = self.length
        if self.state is not None:
            out.state, out.norm = self.state.index_select(0, idx), self.norm.index_select(0, idx)
        return out

    def update(self, kf: torch.Tensor, v: torch.Tensor) -> None:
        """Add one step's key features (N, H, 1, m) and values (N, H, 1, D)."""
        s, z = kf.transpose(-1, -2) @ v, kf[:, :, 0]  # (N, H, m, D), (N, H, m)
        self.state = s if self.state is None else self.state + s
        self.norm = z if self.norm is None else self.norm + z
        self.length += 1


# --------------------------------------------------------------------------- the module
@register_attention("performer")
class PerformerAttention(nn.Module):
    """Multi-head FAVOR+ self-attention (encoder: bidirectional, decoder: causal)."""

    roles = ("encoder", "decoder")

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rope: Rotary | None = None,
                 cross: bool = False, layer: int = 0, n_layer: int = 1, *, nb_features: int = 256,
                 redraw_every: int = 1000, chunk_len: int = 128, **options):
        super().__init__()
        if options:
            raise ValueError(f"attention kind 'performer' takes no options {sorted(options)}; "
                             "it knows nb_features, redraw_every, chunk_len")
        if cross:
            raise ValueError("attention kind 'performer' cannot take the cross-attention role "
                             "(set attention_cross='softmax')")
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        if nb_features < 1 or chunk_len < 1 or redraw_every < 0:
            raise ValueError(f"performer needs nb_features, chunk_len >= 1 and redraw_every >= 0, got "
                             f"{nb_features}, {chunk_len}, {redraw_every}")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.nb_features, self.redraw_every, self.chunk_len = nb_features, redraw_every, chunk_len
        self.rope = rope
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        gen = torch.Generator().manual_seed(0xFA0 + layer)  # same first draw on every rank
        self.register_buffer("proj", orthogonal_gaussian(nb_features, self.head_dim, gen))  # (m, D)

    def new_cache(self) -> PerformerCache:
        return PerformerCache()

    def train_step_begin(self, step: int, generator: torch.Generator) -> None:
        """Redraw the random features every ``redraw_every`` steps (rank-shared generator)."""
        if self.redraw_every and step % self.redraw_every == 0:
            new = orthogonal_gaussian(self.nb_features, self.head_dim, generator)
            self.proj.copy_(new.to(self.proj))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                causal: bool = False, key_mask: torch.Tensor | None = None,
                cache: PerformerCache | None = None) -> torch.Tensor:
        """x (B, T, C); key_mask (B, T) bool, True = real token."""
        if context is not None:
            raise ValueError("attention kind 'performer' is self-attention only; cross-attention stays softmax")
        B, T, C = x.shape
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        k, v = map(self._heads, self.kv_proj(x).chunk(2, dim=-1))  # (B, H, T, D)
        offset = cache.length if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is None:
            y = performer_attention(q, k, v, self.proj, causal=causal, key_mask=key_mask,
                                    chunk_len=self.chunk_len)
        else:
            if not causal or key_mask is not None:
                raise ValueError("a performer cache is for causal decoding without a key_mask")
            y = torch.cat([self._step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache)
                           for t in range(T)], dim=2)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PerformerCache) -> torch.Tensor:
        """One causal token: (N, H, 1, D) each -> (N, H, 1, D)."""
        c = self.head_dim ** -0.25
        cache.update(key_features(k * c, self.proj), v)
        qf = query_features(q * c, self.proj)  # (N, H, 1, m)
        den = (qf @ cache.norm[..., None]).clamp_min(torch.finfo(qf.dtype).tiny)
        return (qf @ cache.state) / den
