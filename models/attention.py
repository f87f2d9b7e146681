"""One attention interface, a name registry, rotary positions and per-layer caches.

Every attention module has the same call: ``attn(x, context=None, *, causal, key_mask, cache)``
with ``x`` (B, T, C) the queries' input and ``context`` (B', S, C) the keys'/values' input for
cross-attention (``None`` for self-attention). It owns its q/k/v/output projections, so a
linear-time variant (Transformer-VQ, Performer, HWFA) registers under a name and is picked by
``make_attention(kind, ...)`` without touching the model code. ``softmax`` is the reference.

The interface a kind joins:

* construction: ``cls(d_model=, n_head=, dropout=, rope=, cross=, layer=, n_layer=, **options)``;
  ``options`` are the kind's own (codebook size, block length, feature count, window, ...),
  passed through from the model config; a kind refuses options it does not know;
* ``new_cache()``: the kind's incremental-decoding state (``KVCache`` for softmax); a cache
  has ``length`` and ``index_select(idx)`` (beam reordering);
* extra losses: after a training forward a module may hold ``self.aux_loss`` (a scalar
  tensor, e.g. the VQ commitment loss); :func:`aux_losses` sums them over a model, and the
  model adds the sum to its loss;
* model-owned randomness and state: a module may define ``train_step_begin(step, generator)``
  (a feature redraw; ``generator`` is seeded identically on every data-parallel rank) and
  ``train_step_end(step, generator, all_reduce)`` (an EMA codebook update whose statistics
  are summed over ranks with ``all_reduce``); the trainer calls them on every submodule.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_REGISTRY: dict[str, type[nn.Module]] = {}


def register_attention(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make an attention module available to :func:`make_attention`."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ATTENTION_REGISTRY:
            raise ValueError(f"attention kind {name!r} is already registered")
        ATTENTION_REGISTRY[name] = cls
        return cls
    return wrap


def make_attention(kind: str, *, d_model: int, n_head: int, dropout: float = 0.0,
                   rope: "Rotary | None" = None, cross: bool = False, layer: int = 0, n_layer: int = 1,
                   **options) -> nn.Module:
    """Build the attention module registered as ``kind`` (``layer`` of ``n_layer`` in its stack;
    ``options`` are the kind's own settings)."""
    _load_builtin_kinds()
    if kind not in ATTENTION_REGISTRY:
        raise ValueError(f"unknown attention kind {kind!r}; registered: {sorted(ATTENTION_REGISTRY)}")
    return ATTENTION_REGISTRY[kind](d_model=d_model, n_head=n_head, dropout=dropout, rope=rope,
                                    cross=cross, layer=layer, n_layer=n_layer, **options)


# Modules that register further kinds when imported (one concept per file).
BUILTIN_KIND_MODULES = ("models.attention_vq", "models.attention_performer", "models.attention_window")


def _load_builtin_kinds() -> None:
    import importlib
    import importlib.util
    for name in BUILTIN_KIND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def aux_losses(model: nn.Module) -> torch.Tensor | None:
    """The sum of the extra losses (``aux_loss``) the model's attention modules hold after a
    training forward, or None when there are none."""
    parts = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    return torch.stack([p.float() for p in parts]).sum() if parts else None


def refuse_options(kind: str, options: dict) -> None:
    """A kind that takes no options of its own refuses any it is given, by name."""
    if options:
        raise ValueError(f"attention kind {kind!r} takes no options {sorted(options)}")


# --------------------------------------------------------------------------- positions
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of x (..., T, D) by angles cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer) for (B, H, T, D) queries and keys, up to max_len."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (T, D/2)
        self.max_len = max_len
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.size(-2)
        if offset + T > self.max_len:
            raise ValueError(f"position {offset + T - 1} >= max_len {self.max_len}: "
                             "raise the model's max_len or truncate the input")
        cos = self.cos[offset:offset + T].to(x.dtype)
        sin = self.sin[offset:offset + T].to(x.dtype)
        return apply_rope(x, cos, sin)


# --------------------------------------------------------------------------- caches
class KVCache:
    """Keys/values of one attention layer for incremental decoding, one row per beam."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (N, H, T, D)
        self.v: torch.Tensor | None = None  # (N, H, T, D)

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new (N, H, T, D) keys/values; return all of them."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def index_select(self, idx: torch.Tensor) -> "KVCache":
        """A cache whose row i is this cache's row idx[i]."""
        out = KVCache()
        if self.k is not None:
            out.k, out.v = self.k.index_select(0, idx), self.v.index_select(0, idx)
        return out


# --------------------------------------------------------------------------- softmax
@register_attention("softmax")
class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention (self or cross) via scaled_dot_product_attention.

    Cross-attention may be grouped: with N query rows and G context rows, N = G*K, query rows
    g*K..g*K+K-1 (the beams of question g) attend to context row g without copying it.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0,
                 rope: Rotary | None = None, cross: bool = False, layer: int = 0, n_layer: int = 1,
                 **options):
        super().__init__()
        refuse_options("softmax", options)
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of n_head {n_head}")
        self.n_head, self.head_dim, self.dropout = n_head, d_model // n_head, dropout
        self.rope, self.cross = rope, cross
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def new_cache(self) -> KVCache:
        return KVCache()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                causal: bool = False, key_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (N, T, C); context (G, S, C) or None; key_mask (G, S) bool, True = real token."""
        N, T, C = x.shape
        q = self._heads(self.q_proj(x))  # (N, H, T, D)
        offset = 0
        if self.cross:
            if cache is not None and cache.k is not None:  # projected once, reused every step
                k, v = cache.k, cache.v
            else:
                if context is None:
                    raise ValueError("cross-attention needs a context on its first call")
                k, v = map(self._heads, self.kv_proj(context).chunk(2, dim=-1))  # (G, H, S, D)
                if cache is not None:
                    cache.k, cache.v = k, v
        else:
            k, v = map(self._heads, self.kv_proj(x).chunk(2, dim=-1))  # (N, H, T, D)
            offset = cache.length if cache is not None else 0
            if self.rope is not None:
                q, k = self.rope(q, offset), self.rope(k, offset)
            if cache is not None:
                k, v = cache.update(k, v)  # (N, H, offset+T, D)
        G = k.size(0)
        if N != G:  # grouped cross-attention: the K beams of a question act as K*T queries
            if not self.cross or N % G:
                raise ValueError(f"{N} query rows cannot share {G} key rows")
            q = q.view(G, N // G, self.n_head, T, self.head_dim).transpose(1, 2)
            q = q.reshape(G, self.n_head, (N // G) * T, self.head_dim)  # (G, H, K*T, D)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (G, 1, 1, S)
        is_causal = causal and T > 1
        if is_causal and (offset > 0 or mask is not None):  # query offset+i sees keys 0..offset+i
            pos_q = torch.arange(offset, offset + T, device=x.device)[:, None]
            causal_mask = torch.arange(offset + T, device=x.device)[None, :] <= pos_q  # (T, L)
            mask = causal_mask if mask is None else mask & causal_mask
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        if N != G:
            y = y.view(G, self.n_head, N // G, T, self.head_dim).transpose(1, 2)
            y = y.reshape(N, self.n_head, T, self.head_dim)  # (N, H, T, D)
        y = y.transpose(1, 2).reshape(N, T, C)  # (N, T, C)
        return self.out_proj(y)
