"""Decoder-only causal language model (nanoGPT style) with a per-layer attention pattern.

Each block's self-attention kind comes from :func:`models.attention_pattern.layer_kinds`
(``softmax`` + RoPE, ``alibi``, ``hwfa`` = window layers + one full NoPE/log-n layer, ``vq``,
``performer``, or an explicit list), built by ``make_attention``. One Rotary table of
``max_len`` positions (default 16·train_len) is shared; kinds without RoPE ignore it.

Norm: pre-norm (RMSNorm, like models/seq2seq.py) by default; ``norm="post"`` gives the Post-Norm
blocks the HWFA post used. Both are tested (incremental == full decoding). The even-pairs
numbers (bench/even_pairs.py) are pre-norm; post-norm was NOT benchmarked yet
(``python -m bench.even_pairs --norm post`` runs it).

``loss(batch)``: ``batch["ids"]`` (B, T) alone → next-token prediction; with
``batch["targets"]`` (B, T) (−100 = ignored) the model predicts ``targets[t]`` at position t
(a transduction task such as even pairs). Extra losses the attention modules hold after the
forward (VQ commitment, :func:`models.attention.aux_losses`) are added to the loss.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import Rotary, aux_losses, make_attention
from models.attention_pattern import layer_kinds

IGNORE = -100


@dataclass(frozen=True)
class LMConfig:
    """Model hyperparameters; ``pattern`` names the per-layer attention (see attention_pattern)."""

    vocab_size: int
    d_model: int = 128
    n_head: int = 4
    n_layer: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    train_len: int = 512  # N: the training length (log-n scale, default HWFA window)
    max_len: int = 0  # longest sequence (RoPE table); 0 = 16 · train_len
    pattern: str | tuple = "softmax"
    window: int | None = None  # HWFA window w; None = the largest with (w-1)(L-1)+1 <= 3N/4
    attention_options: Mapping[str, Mapping] = field(default_factory=dict)  # kind -> its options
    norm: str = "pre"  # "pre" | "post"
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} / n_head {self.n_head} must be an even integer")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size {self.vocab_size} < 2")
        if not isinstance(self.pattern, str):  # lists from JSON -> hashable tuples
            object.__setattr__(self, "pattern", tuple(p if isinstance(p, str) else tuple(p) for p in self.pattern))
        if self.max_len and self.max_len < self.train_len:
            raise ValueError(f"max_len {self.max_len} < train_len {self.train_len}")

    @property
    def context_len(self) -> int:
        return self.max_len or 16 * self.train_len

    def layers(self) -> list[tuple[str, dict]]:
        return layer_kinds(self.pattern if isinstance(self.pattern, str) else list(self.pattern),
                           self.n_layer, self.train_len, self.window, self.attention_options)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pattern"] = self.pattern if isinstance(self.pattern, str) else [
            p if isinstance(p, str) else [p[0], dict(p[1])] for p in self.pattern]
        d["attention_options"] = {k: dict(v) for k, v in self.attention_options.items()}
        return {"kind": "lm", **d}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LMConfig":
        d = dict(d)
        if d.pop("kind", "lm") != "lm":
            raise ValueError(f"not an LM config: kind {d.get('kind')!r}")
        return cls(**d)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear, GELU, Linear."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Causal self-attention of the layer's kind + MLP, pre- or post-norm."""

    def __init__(self, cfg: LMConfig, rope: Rotary, layer: int, kind: str, options: dict):
        super().__init__()
        self.kind, self.post = kind, cfg.norm == "post"
        self.ln1, self.ln2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = make_attention(kind, d_model=cfg.d_model, n_head=cfg.n_head, dropout=cfg.dropout,
                                   rope=rope, layer=layer, n_layer=cfg.n_layer, **options)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if self.post:
            x = self.ln1(x + self.drop(self.attn(x, causal=True, cache=cache)))
            return self.ln2(x + self.mlp(x))
        x = x + self.drop(self.attn(self.ln1(x), causal=True, cache=cache))
        return x + self.mlp(self.ln2(x))


class LMCache:
    """One decoding cache per layer (each kind's own ``new_cache()``), one row per beam."""

    def __init__(self, caches: list):
        self.layers = caches

    @property
    def length(self) -> int:
        return self.layers[0].length

    def index_select(self, idx: torch.Tensor) -> "LMCache":
        return LMCache([c.index_select(idx) for c in self.layers])


class LM(nn.Module):
    """The decoder-only LM: ``loss`` for training, ``step``/``generate`` for decoding,
    ``evaluate`` for bits per character and accuracy on long sequences."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.rope = Rotary(cfg.d_model // cfg.n_head, cfg.context_len)  # buffers only, shared
        self.blocks = nn.ModuleList(Block(cfg, self.rope, i, kind, opts)
                                    for i, (kind, opts) in enumerate(cfg.layers()))
        self.ln_f = nn.Identity() if cfg.norm == "post" else nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, x: torch.Tensor, n_blocks: int | None = None, cache: LMCache | None = None) -> torch.Tensor:
        """Embeddings x (B, T, C) through the first ``n_blocks`` blocks (all by default) -> (B, T, C)."""
        blocks = self.blocks if n_blocks is None else self.blocks[:n_blocks]
        for i, block in enumerate(blocks):
            x = block(x, None if cache is None else cache.layers[i])
        return x

    def forward(self, ids: torch.Tensor, cache: LMCache | None = None) -> torch.Tensor:
        """ids (B, T) long -> logits (B, T, V); with a cache, ids continue the cached sequence."""
        if (cache.length if cache is not None else 0) + ids.size(1) > self.cfg.context_len:
            raise ValueError(f"sequence of {ids.size(1)} tokens (+{cache.length if cache else 0} cached) "
                             f"exceeds max_len {self.cfg.context_len}; raise LMConfig.max_len")
        x = self.drop(self.tok_emb(ids))  # (B, T, C)
        return self.lm_head(self.ln_f(self.features(x, cache=cache)))  # (B, T, V)

    def new_cache(self) -> LMCache:
        return LMCache([b.attn.new_cache() for b in self.blocks])

    # ------------------------------------------------------------------ training
    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy (+ the attention modules' aux losses) -> (loss, {ce, aux, accuracy, bpc})."""
        ids = batch["ids"]
        if "targets" in batch:
            inputs, targets = ids, batch["targets"]  # predict targets[t] at position t
        else:
            inputs, targets = ids[:, :-1], ids[:, 1:]  # next token
        logits = self(inputs)  # (B, T, V)
        ce, correct, n = token_stats(logits, targets)
        aux = aux_losses(self)
        loss = ce if aux is None else ce + aux
        ce_f = float(ce.detach())
        parts = {"ce": ce_f, "aux": 0.0 if aux is None else float(aux.detach()),
                 "accuracy": correct / max(n, 1), "bpc": ce_f / math.log(2)}
        return loss, parts

    # ------------------------------------------------------------------ evaluation / decoding
    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                 batch_size: int = 8) -> dict[str, float]:
        """Next-token (or ``targets``) bits per predicted token and accuracy over (B, T) ids,
        one full-length forward per row batch (T may be up to max_len, e.g. 16·N)."""
        was_training = self.training
        self.eval()
        nats, correct, n = 0.0, 0, 0
        try:
            for s in range(0, ids.size(0), batch_size):
                rows = ids[s:s + batch_size]
                if targets is None:
                    logits, tgt = self(rows[:, :-1]), rows[:, 1:]
                else:
                    logits, tgt = self(rows), targets[s:s + batch_size]
                ce, c, k = token_stats(logits, tgt)
                nats, correct, n = nats + float(ce) * k, correct + c, n + k
        finally:
            self.train(was_training)
        return {"bpc": nats / max(n, 1) / math.log(2), "accuracy": correct / max(n, 1), "tokens": n}

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: LMCache | None = None) -> tuple[torch.Tensor, LMCache]:
        """Feed tokens (B,) or (B, T) after the cached ones -> (logits of the last (B, V), cache)."""
        cache = self.new_cache() if cache is None else cache
        ids = tokens.view(tokens.size(0), -1)
        return self(ids, cache)[:, -1], cache

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n_new: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue prompt (B, T0) by n_new tokens (greedy at temperature 0) -> (B, T0 + n_new)."""
        logits, cache = self.step(prompt)
        out = [prompt]
        for _ in range(n_new):
            if temperature > 0:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            else:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            logits, cache = self.step(nxt, cache)
        return torch.cat(out, dim=1)


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(mean CE over non-ignored targets, number correct, number counted) for (B, T, V) logits."""
    flat, tgt = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    keep = tgt != IGNORE
    n = int(keep.sum())
    if n == 0:
        return flat.sum() * 0.0, 0, 0
    ce = F.cross_entropy(flat, tgt, ignore_index=IGNORE)
    correct = int((flat.argmax(-1)[keep] == tgt[keep]).sum())
    return ce, correct, n
