"""Transformer-VQ attention (Lingle 2023; ALGORITHMS.md §8): quantised keys make softmax linear.

Keys are replaced by their nearest code of a per-head codebook C (H, S, D), K̂ = ΔC, so
``exp(QK̂ᵀ)V = exp(QCᵀ)(ΔᵀV)``: the keys of earlier blocks enter only through per-code sums of
their values (and counts, for the denominator). :func:`vq_attention` computes softmax attention
of q against the quantised keys, block by block, exactly, in time O(T·(S + L)·D):

* the explicit window: the query's own block of ``block_len`` L keys and, causal with
  ``prev_block`` (default; the official code's "xl cache"), the block before it -- explicit
  scores against the quantised keys (causal mask, optional position bias). Without the
  previous block a query at the start of a block would see its nearest predecessors only as
  position-less codes; for a byte LM that loses the most useful context at every boundary;
* blocks before the window (causal) or all other blocks (non-causal): the code cache, its scores
  q·c_s masked to −inf for codes no earlier key used;
* one max per query over exactly those scores (all of them past keys), subtracted before exp.

All blocks are computed at once: per-block code sums by one ``index_add`` over (block, code)
cells and an exclusive cumulative sum over blocks (sums of values, never of exponentials).

Gradients are autograd over this linear-time form: exact for q and v (v reaches later blocks
through the code sums; ``grad_thru_cache=False`` is the paper's truncated variant). Keys get the
straight-through gradient where they are scored explicitly, i.e. from the queries of their own
window (its own block and, causal, the next one); through the cache a key is only an index
(Δ), so queries further on send it none.
(The full straight-through gradient from every later query needs a D×D matrix per code and
block, O(T·S·D²) -- D times the forward -- and is not offered.)

Position: keys rotated by their absolute position could not share codes, so RoPE is not applied
before quantisation. Position enters the explicit window only: as a learned relative bias
b_h(i - j) on its scores (-L < i - j < 2L, ``rel_bias``, on by default), initialised as ALiBi
slopes, so even an untrained vq encoder is not a bag of characters; and/or by RoPE inside the
window (``window_rope``, below). With ``rel_key``
the window's scores also get a query-dependent term q·r_h(i − j)/√D, r learned per head and
offset (zero at start; Shaw et al.'s relative keys, the same idea as the official code's
Transformer-XL term): a scalar bias cannot say "this query looks for the byte 3 back", this can
(base long-context LM: 3.03 → 2.56 bits per byte at N, with ``dead_fraction``). Keys before the
window carry no position (as in the paper's cache term).

``exact_window`` (off by default; a variant of the paper's form, say so when reporting it): the
explicit window scores the exact keys, so near context is plain softmax attention and only keys
before the window are seen through their codes (jointly normalised, same cost and O(S·D) decoding
state; the window's cache holds exact keys). Quantisation then costs only the far context.

``window_rope`` (off by default; on in the long-context base preset): RoPE inside the explicit
window, by slot -- the window's keys rotated by their place in it, the block's queries by theirs,
so a window score depends on i − j as RoPE's does, at any absolute position (the tables span 2L
only); code scores use the unrotated query. Quantise first, rotate after: codes stay
position-free. Measured on the base byte LM (N = 128, one seed): window_rope on and ``rel_bias``
off together took vq from 2.563 to 2.366 bits per byte at N (softmax + RoPE 2.221); on the tiny
preset (one run each, not committed) window_rope alone gave 2.884 → 2.840 and dropping the
ALiBi-initialised bias as well 2.790.

Scale: with ``qk_norm`` (default) q and k are layer-normalised per head, no gain or bias (the
official code's q_ln / k_ln), before quantisation and the 1/√D scores: bounded keys keep the
quantisation error bounded. Without it keys drift in norm and the earlier-block context decays
to noise (measured: a tiny byte LM, N = 64, 300 steps: 3.47 bits per byte without it, 3.28 with it
and one-block windows, against softmax's 2.70).
Normalised q and k cap a score at √D, so attention cannot sharpen the way unnormalised softmax
attention can; ``q_temp`` (off by default) multiplies head h's queries, after the norm, by a
learned exp(t_h), exp(t_h) = ``q_temp`` at init (True: 1): every score of the head (window,
rel_key, codes) scales together, and the keys, hence the codes, are untouched. ``code_bias``
(off by default): a learned per-head score b_h on the keys before the window, which enter
through position-free codes, so a head can weigh far against near context. Measured on the
base byte LM (N = 128, seeds 0 / 1): q_temp 1.5 and code_bias together took vq from 2.366 /
2.447 to 2.311 / 2.342 bits per byte at N (softmax + RoPE 2.221 / 2.240); the temperatures
rose to 1.6-2.0, every code bias went negative (−0.1 to −0.5).

Roles: encoder and decoder self-attention. Cross-attention stays softmax: the memory is short
and projected once per question, where exact softmax is cheap and quantising its keys would
only lose accuracy. Padding: ``key_mask`` (B, T) True = real token; masked keys are dropped from
the block scores, the code sums and the codebook statistics.

Codebook: EMA k-means (decay γ, ``train_step_end``): per-code counts, key sums and squared-norm
sums of the step, all-reduced over data-parallel ranks, then C = sum / count. Dead codes (EMA
count below ``dead_threshold``, or below ``dead_fraction`` of the head's mean count) restart
next to a live code drawn by count, with noise of that
code's spread, both from the rank-shared generator, so every rank keeps the same codebook.
Commitment loss β‖k − sg(k̂)‖² (mean over real tokens, summed over heads) is ``self.aux_loss``.

Speed: the block kernel and its CPU tiling live in :mod:`models.vq_kernel`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import Rotary, register_attention
from models.vq_cache import VQCache
from models.vq_codebook import code_sums, ema_codebook_update, gather_codes, quantise, straight_through
from models.vq_kernel import BlockAttention, PrefixSum


# --------------------------------------------------------------------------- the block form
def window_offsets(L: int, two_block: bool, device=None) -> torch.Tensor:
    """i − j for every (query, key) cell of the explicit window, (L, W): queries i = 0..L−1 of a
    block, keys j block-relative, −L..L−1 (the previous block, then this one) with the two-block
    window, else 0..L−1. Both position terms (``bias``, ``rel_key``) are indexed by it."""
    pos = torch.arange(L, device=device)
    cols = torch.arange(-L, L, device=device) if two_block else pos
    return pos[:, None] - cols[None, :]


def _pad_time(x: torch.Tensor, T_pad: int, dim: int = 2) -> torch.Tensor:
    extra = T_pad - x.size(dim)
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def _combine(a: torch.Tensor, vsum: torch.Tensor, count: torch.Tensor,
             e: torch.Tensor | None, v_blk: torch.Tensor | None) -> torch.Tensor:
    """Jointly normalised code part (a: scores (..., L, S), masked) and block part (e (..., L, L))."""
    m = a.amax(-1) if e is None else torch.maximum(a.amax(-1), e.amax(-1))  # (..., L): past keys only
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()[..., None]
    pa = torch.exp(a - m)  # (..., L, S)
    num = pa @ vsum  # (..., L, D)
    den = pa @ count[..., None]  # (..., L, 1)
    if e is not None:
        pe = torch.exp(e - m)  # (..., L, L)
        num = num + pe @ v_blk
        den = den + pe.sum(-1, keepdim=True)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)  # a row with no keys gives 0


def vq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codebook: torch.Tensor, *,
                 block_len: int, causal: bool = True, key_mask: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                 grad_thru_cache: bool = True, prev_block: bool = True,
                 rel_key: torch.Tensor | None = None, exact_window: bool = False,
                 window_rope: Rotary | None = None, code_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q against the quantised keys, scale 1/√D, in time linear in T.

    q, k, v (B, H, T, D), any T; codebook (H, S, D). Optional: key_mask (B, T) True = real key;
    codes (B, H, T) precomputed nearest codes. The explicit window of a query in block n is
    block n, and when ``causal and prev_block`` (the default, the official code's "xl cache")
    block n−1 too; keys before the window enter through per-code sums. ``bias`` is added to the
    explicit window's scores: (H, L, 2L) for the causal two-block window (columns: block n−1's
    keys, then block n's), else (H, L, L). Without a bias (and without ``exact_window``) the
    result does not depend on the window: it is softmax over all quantised keys. ``rel_key`` (H, 3·block_len − 1, D): a
    query-dependent relative key term (Shaw et al.), r_h(d) for d = i − j from −(L−1) to 2L−1
    (index d + L − 1): a window score becomes q·(k̂_j + r_h(i − j))/√D (+ bias).
    ``exact_window`` (a variant, not the paper's form): the explicit window scores the exact
    keys k_j instead of k̂_j (and sends them their exact gradient); keys before the window still
    enter through their codes, jointly normalised. Same cost. ``window_rope`` (a Rotary with
    max_len ≥ the window's width): the explicit window's scores rotate queries and keys by their
    slot in the window (window key j at slot j, the block's queries at the last L slots), so
    they depend on i − j as RoPE's do, at any absolute position; the code scores use the
    unrotated q (codes carry no position). ``code_bias`` (H,): added to head h's scores of the
    keys before the window (its code scores), the window's untouched; where no query has a
    window (bidirectional, no window terms) it would shift every score alike and is left out.
    Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    S, L = codebook.size(1), block_len
    scale = D ** -0.5
    if rel_key is not None and rel_key.shape != (H, 3 * L - 1, D):
        raise ValueError(f"rel_key {tuple(rel_key.shape)}: expected (H, 3·block_len − 1, D) "
                         f"= ({H}, {3 * L - 1}, {D})")
    cb = codebook.to(q.dtype).detach()
    codes = quantise(k, cb) if codes is None else codes
    w = (torch.ones(B, 1, T, dtype=q.dtype, device=q.device) if key_mask is None
         else key_mask[:, None, :].to(q.dtype))  # (B, 1, T) key weights
    window_terms = bias is not None or rel_key is not None or exact_window or window_rope is not None
    if not causal and not window_terms:  # exp(QCᵀ)(ΔᵀV), normalised
        vsum, count = code_sums(v, w, codes, 1, S)  # (B, H, 1, S, D), (B, H, 1, S)
        if not grad_thru_cache:
            vsum = vsum.detach()
        a = (q @ cb.transpose(-1, -2)) * scale  # (B, H, T, S)
        a = a.masked_fill(count[:, :, 0, None, :] <= 0, float("-inf"))
        return _combine(a, vsum[:, :, 0].to(q.dtype), count[:, :, 0].to(q.dtype), None, None)
    slot0 = 0  # window_rope: the window's first key's slot
    if T < L:  # one short block (a KgCLUE question): no padding to L, no previous block to score
        slot0 = c0 = L if causal and prev_block else 0  # the current block's first column and RoPE slot
        if bias is not None:
            if bias.shape[-2:] != (L, L + c0):
                raise ValueError(f"bias {tuple(bias.shape)}: the explicit window is ({L}, {L + c0}) per head")
            bias = bias[..., :T, c0:c0 + T]
        L, prev_block = T, False
    L_rel = block_len  # rel_key's index origin: d + block_len − 1
    n = max(1, math.ceil(T / L))
    T_pad = n * L
    k_win = k if exact_window else straight_through(k, cb, codes)  # the explicit window's keys
    qp, kp, vp = (_pad_time(x, T_pad) for x in (q, k_win, v))  # (B, H, T_pad, D); q unscaled
    wp, zp = _pad_time(w, T_pad), _pad_time(codes, T_pad)  # padded keys have weight 0
    vsum, count = code_sums(vp, wp if key_mask is not None or T_pad > T else None, zp, n, S)  # (B, H, n, S, D), (B, H, n, S)
    two = causal and prev_block  # the explicit window: blocks n-1 and n
    if causal:  # blocks strictly before the window (before n-1 with the two-block window)
        sh = 2 if two else 1
        vsum, count = PrefixSum.apply(vsum, sh), PrefixSum.apply(count, sh)
    else:  # every other block
        vsum, count = vsum.sum(2, keepdim=True) - vsum, count.sum(2, keepdim=True) - count
    count = count.detach().round()  # integer counts (0/1 key weights); cancels sum-minus-own noise
    if not grad_thru_cache:
        vsum = vsum.detach()
    logc = torch.where(count > 0, count.log(), torch.full_like(count, float("-inf"))).to(q.dtype)  # (B, H, n, S)
    if code_bias is not None:  # count · exp(q·c + b_h): b_h joins the log count (the kernel returns its gradient)
        logc = logc + code_bias.to(q.dtype)[None, :, None, None]
    W = 2 * L if two else L  # explicit keys per query block
    ebias = torch.zeros(1, 1, 1, L, W, dtype=q.dtype, device=q.device)
    if causal:
        ebias = ebias.masked_fill(torch.ones(L, W, dtype=torch.bool, device=q.device).triu(1 + W - L),
                                  float("-inf"))
    if bias is not None:
        if bias.shape[-2:] != (L, W):
            raise ValueError(f"bias {tuple(bias.shape)}: the explicit window is ({L}, {W}) per head "
                             f"({'two blocks, causal' if two else 'one block'})")
        ebias = ebias + bias.to(q.dtype)[None, :, None]  # (1, H, 1, L, W)
    if rel_key is not None:  # + q·r(i − j): (B, H, n, L, 3L−1) per-offset scores gathered to the window's columns
        idx = window_offsets(L, two, q.device) + L_rel - 1  # (L, W)
        qr = qp.view(B, H, n, L, D) @ (rel_key.to(q.dtype) * scale).transpose(-1, -2)[None, :, None]
        ebias = ebias + qr.gather(-1, idx.expand(B, H, n, L, W))
    keyw = wp.view(B, 1, n, L)  # (B, 1, n, L) key weights per block
    if two:  # block n-1's keys; block 0 has none (weight 0)
        keyw = torch.cat((torch.cat((torch.zeros_like(keyw[:, :, :1]), keyw[:, :, :-1]), 2), keyw), -1)
    if two or key_mask is not None or (not causal and T_pad > T):  # padded keys precede no real query when causal
        ebias = ebias + torch.zeros_like(keyw).masked_fill(keyw <= 0, float("-inf"))[:, :, :, None, :]
    qb, kb, vb = (x.view(B, H, n, L, D) for x in (qp, kp, vp))  # (B, H, n, L, D)
    if two:  # (B, H, n, 2L, D): [block n-1 | block n]
        kb, vb = (torch.cat((torch.cat((torch.zeros_like(x[:, :, :1]), x[:, :, :-1]), 2), x), 3) for x in (kb, vb))
    qw = None  # the window's queries: q itself, or rotated by slot
    if window_rope is not None:  # the slots of the full-length layout (decoding rotates alike)
        kb, qw = window_rope(kb, offset=slot0), window_rope(qb, offset=slot0 + W - L)
    out = BlockAttention.apply(qb, qw, cb, logc, vsum.to(q.dtype), count.clamp_min(1.0).to(q.dtype), kb, vb, ebias,
                                scale, causal)  # (B, H, n, L, D)
    return out.reshape(B, H, T_pad, D)[:, :, :T]


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's geometric head slopes 2^(-8h/H), h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)])


# --------------------------------------------------------------------------- the module
@register_attention("vq")
class VQAttention(nn.Module):
    """Multi-head Transformer-VQ self-attention (encoder: bidirectional, decoder: causal)."""

    roles = ("encoder", "decoder")

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rope: Rotary | None = None,
                 cross: bool = False, layer: int = 0, n_layer: int = 1, *, codebook_size: int = 512,
                 block_len: int = 512, commit_beta: float = 1e-4, ema_decay: float = 0.99,
                 dead_threshold: float = 0.1, codebook_init: float = 1.0, rel_bias: bool = True,
                 grad_thru_cache: bool = True, qk_norm: bool = True, prev_block: bool = True,
                 rel_key: bool = False, dead_fraction: float = 0.0, exact_window: bool = False,
                 window_rope: bool = False, q_temp: float = 0.0, code_bias: bool = False, **options):
        super().__init__()
        if options:
            raise ValueError(f"attention kind 'vq' takes no options {sorted(options)}; it knows "
                             "codebook_size, block_len, commit_beta, ema_decay, dead_threshold, "
                             "codebook_init, rel_bias, rel_key, grad_thru_cache, qk_norm, prev_block, "
                             "dead_fraction, exact_window, window_rope, q_temp, code_bias")
        if cross:
            raise ValueError("attention kind 'vq' cannot take the cross-attention role "
                             "(set attention_cross='softmax')")
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        if codebook_size < 1 or block_len < 1:
            raise ValueError(f"vq needs codebook_size >= 1 and block_len >= 1, got {codebook_size}, {block_len}")
        H, D, S = n_head, d_model // n_head, codebook_size
        self.n_head, self.head_dim, self.n_code, self.block_len = H, D, S, block_len
        if not 0.0 <= dead_fraction < 1.0:
            raise ValueError(f"vq dead_fraction must be in [0, 1), got {dead_fraction}")
        self.commit_beta, self.ema_decay, self.dead_threshold = commit_beta, ema_decay, dead_threshold
        self.dead_fraction, self.exact_window = dead_fraction, exact_window
        self.grad_thru_cache, self.qk_norm, self.prev_block = grad_thru_cache, qk_norm, prev_block
        # RoPE inside the explicit window, by slot (see vq_attention): buffers only, not saved
        self.window_rope = Rotary(D, 2 * block_len) if window_rope else None
        # a learned per-head temperature on the queries, exp(t_h) (see qkv); q_temp is its initial
        # value (True: 1), 0 / False: none
        if not (isinstance(q_temp, (bool, int, float)) and q_temp >= 0 and math.isfinite(q_temp)):
            raise ValueError(f"vq q_temp is the initial query temperature (> 0, True = 1; 0 or False: "
                             f"no temperature), got {q_temp!r}")
        self.q_temp = nn.Parameter(torch.full((H,), math.log(q_temp))) if q_temp else None
        # a learned per-head score added to the keys before the window (seen through codes), 0 at init
        self.code_bias = nn.Parameter(torch.zeros(H)) if code_bias else None
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rel_bias = None
        if rel_bias:  # b_h(d), d = i - j in (-L, 2L) (2L: the causal two-block window), index d + L - 1
            dist = torch.arange(-(block_len - 1), 2 * block_len, dtype=torch.float32).abs()
            self.rel_bias = nn.Parameter(-alibi_slopes(H)[:, None] * dist[None, :])  # (H, 3L-1)
        # query-dependent relative keys: q·r_h(i - j) on the window's scores (the official code has
        # Transformer-XL's form of this term; a scalar bias cannot depend on what the query asks)
        self.rel_key = nn.Parameter(torch.zeros(H, 3 * block_len - 1, D)) if rel_key else None
        gen = torch.Generator().manual_seed(0x51AB + layer)  # same initial codebook on every rank
        cb = torch.randn(H, S, D, generator=gen) * codebook_init
        self.register_buffer("codebook", cb)  # (H, S, D)
        self.register_buffer("ema_count", torch.ones(H, S))  # (H, S)
        self.register_buffer("ema_sum", cb.clone())  # (H, S, D)
        self.register_buffer("ema_sq", (cb * cb).sum(-1))  # (H, S)
        self.aux_loss: torch.Tensor | None = None
        self._stats: list[torch.Tensor] | None = None  # this step's [count, sum, sq], not yet reduced

    def new_cache(self) -> VQCache:
        return VQCache()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v (B, H, T, D). With ``qk_norm`` (the default, as in the official code)
        q and k are layer-normalised per head without gain or bias, so every key lies near the
        sphere of radius √D that the codebook (initialised N(0, I) · codebook_init) covers: with
        unnormalised keys the norms drift during training, the quantisation error grows with
        them and the earlier-block context (seen only through codes) turns to noise."""
        q = self._heads(self.q_proj(x))
        k, v = map(self._heads, self.kv_proj(x).chunk(2, dim=-1))
        if self.qk_norm:
            q, k = F.layer_norm(q, (self.head_dim,)), F.layer_norm(k, (self.head_dim,))
        if self.q_temp is not None:  # every score of the head (window, rel_key, codes) times exp(t_h)
            q = q * self.q_temp.exp().to(q.dtype)[:, None, None]
        return q, k, v

    def block_bias(self, causal: bool = False) -> torch.Tensor | None:
        """The explicit window's bias b_h(i - j): (H, L, 2L) for the causal two-block window
        (columns: the previous block's keys, then the current block's), else (H, L, L)."""
        if self.rel_bias is None:
            return None
        L = self.block_len
        return self.rel_bias[:, window_offsets(L, causal and self.prev_block, self.rel_bias.device) + L - 1]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                causal: bool = False, key_mask: torch.Tensor | None = None,
                cache: VQCache | None = None) -> torch.Tensor:
        """x (B, T, C); key_mask (B, T) bool, True = real token."""
        if context is not None:
            raise ValueError("attention kind 'vq' is self-attention only; cross-attention stays softmax")
        B, T, C = x.shape
        q, k, v = self.qkv(x)  # (B, H, T, D) each
        codes = quantise(k, self.codebook)  # (B, H, T)
        if cache is not None:
            if not causal or key_mask is not None:
                raise ValueError("a vq cache is for causal decoding without a key_mask")
            y = torch.cat([self._step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                      codes[:, :, t:t + 1], cache) for t in range(T)], dim=2)
        else:
            y = vq_attention(q, k, v, self.codebook, block_len=self.block_len, causal=causal,
                             key_mask=key_mask, bias=self.block_bias(causal), codes=codes,
                             grad_thru_cache=self.grad_thru_cache, prev_block=self.prev_block,
                             rel_key=self.rel_key, exact_window=self.exact_window, window_rope=self.window_rope,
                             code_bias=self.code_bias)
        self.aux_loss = None
        if self.training:
            w = (torch.ones(B, 1, T, device=x.device) if key_mask is None
                 else key_mask[:, None, :].float())  # (B, 1, T)
            self._commit(k, codes, w)
            self._accumulate(k.detach(), codes, w)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codes: torch.Tensor,
              cache: VQCache) -> torch.Tensor:
        """One causal token: q/k/v (N, H, 1, D), codes (N, H, 1) -> (N, H, 1, D)."""
        L, scale = self.block_len, self.head_dim ** -0.5
        if cache.length and cache.length % L == 0:
            cache.fold(self.n_code, self.prev_block)
        i = cache.length % L  # position inside the current block
        cache.append(k if self.exact_window else straight_through(k, self.codebook, codes), v, codes)
        cb = self.codebook.to(q.dtype)
        prev = self.prev_block and cache.k_prev is not None
        keys = torch.cat((cache.k_prev, cache.k), 2) if prev else cache.k  # (N, H, [L +] i+1, D)
        vals = torch.cat((cache.v_prev, cache.v), 2) if prev else cache.v
        qe = q
        if self.window_rope is not None:  # the slots vq_attention gives them: the current block's
            first = L if self.prev_block and not prev else 0  # keys at L.. in a two-block layout
            keys = self.window_rope(keys, offset=first)
            qe = self.window_rope(q, offset=first + keys.size(2) - 1)
        e = (qe @ keys.transpose(-1, -2)) * scale  # (N, H, 1, [L +] i+1)
        bias = self.block_bias(causal=True)
        if bias is not None:
            off = L if self.prev_block else 0  # the current block's columns start here
            cols = torch.arange(off - (L if prev else 0), off + i + 1, device=e.device)
            e = e + bias[None, :, i:i + 1, cols].to(e.dtype)
        if self.rel_key is not None:  # q·r(i - j), j over the window's keys (block-relative -L..i)
            d = i - torch.arange(-(L if prev else 0), i + 1, device=e.device)  # (window,)
            r = self.rel_key[:, d + L - 1].to(q.dtype)  # (H, window, D)
            e = e + (q * scale) @ r.transpose(-1, -2)[None]
        if cache.vsum is None:
            a = e.new_full((*e.shape[:3], 1), float("-inf"))
            vsum, count = v.new_zeros(*v.shape[:2], 1, v.size(-1)), v.new_zeros(*v.shape[:2], 1)
        else:
            a = (q @ cb.transpose(-1, -2)) * scale  # (N, H, 1, S)
            if self.code_bias is not None:
                a = a + self.code_bias.to(a.dtype)[:, None, None]
            a = a.masked_fill(cache.count[:, :, None, :] <= 0.5, float("-inf"))
            vsum, count = cache.vsum.to(q.dtype), cache.count.to(q.dtype)
        return _combine(a, vsum, count, e, vals)

    def _commit(self, k: torch.Tensor, codes: torch.Tensor, w: torch.Tensor) -> None:
        """β · mean over real tokens of Σ_heads ‖k − sg(C[z])‖²."""
        err = ((k - gather_codes(self.codebook.to(k.dtype), codes).detach()) ** 2).sum(-1)  # (B, H, T)
        self.aux_loss = self.commit_beta * (err.float() * w).sum() / w.sum().clamp_min(1.0)

    @torch.no_grad()
    def _accumulate(self, k: torch.Tensor, codes: torch.Tensor, w: torch.Tensor) -> None:
        """Add this forward's per-code counts, key sums and squared norms to the step's stats."""
        B, H, T, D = k.shape
        S = self.n_code
        idx = (torch.arange(H, device=k.device)[None, :, None] * S + codes).reshape(-1)  # (B·H·T,)
        acc = torch.promote_types(k.dtype, torch.float32)  # statistics in float32 at least
        wk = w.expand(B, H, T).reshape(-1).to(acc)
        kf = k.to(acc).reshape(-1, D)
        cnt = torch.zeros(H * S, dtype=acc, device=k.device).index_add_(0, idx, wk)
        ksum = torch.zeros(H * S, D, dtype=acc, device=k.device).index_add_(0, idx, kf * wk[:, None])
        ksq = torch.zeros(H * S, dtype=acc, device=k.device).index_add_(0, idx, (kf * kf).sum(-1) * wk)
        new = [cnt.view(H, S), ksum.view(H, S, D), ksq.view(H, S)]
        self._stats = new if self._stats is None else [a + b for a, b in zip(self._stats, new)]

    @torch.no_grad()
    def train_step_end(self, step: int, generator: torch.Generator, all_reduce) -> None:
        """All-reduce the step's codebook statistics, then the EMA update and dead-code restarts."""
        H, S, D = self.codebook.shape
        stats = self._stats or [torch.zeros(H, S), torch.zeros(H, S, D), torch.zeros(H, S)]
        acc = torch.promote_types(self.ema_sum.dtype, torch.float32)
        flat = torch.cat([s.reshape(-1).to(acc) for s in stats]).to(self.codebook.device)
        flat = all_reduce(flat)  # every rank calls it, forward or not
        self._stats = None
        count, ksum, ksq = flat[:H * S].view(H, S), flat[H * S:H * S * (D + 1)].view(H, S, D), \
            flat[H * S * (D + 1):].view(H, S)
        if float(count.sum()) > 0:
            ema_codebook_update(self, count, ksum, ksq, generator)
