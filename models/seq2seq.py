"""Encoder-decoder Transformer (nanoGPT style): pre-norm, RoPE self-attention, cross-attention.

Targets are trie keys ``BOS S… SEP P… SEP M… EOS``; the decoder input is the key without its
last token, the label the key without BOS. ``decode_step`` runs one token for N beam rows with
a :class:`DecoderCache`; memory may hold one row per question (G rows, N = G*K beams).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import KVCache, Rotary, make_attention
from models.vocab import PAD

PRESETS: dict[str, dict[str, int | bool]] = {
    "tiny": dict(d_model=128, n_head=4, n_layer_enc=2, n_layer_dec=2, d_ff=512, copy_head=True),
    "base": dict(d_model=256, n_head=8, n_layer_enc=3, n_layer_dec=3, d_ff=1024, dropout=0.1, copy_head=True),
    "gpu": dict(d_model=768, n_head=12, n_layer_enc=6, n_layer_dec=6, d_ff=3072, copy_head=True),
}


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Model hyperparameters; ``attention`` names the self-attention kind (cross is softmax)."""

    vocab_size: int
    d_model: int = 128
    n_head: int = 4
    n_layer_enc: int = 2
    n_layer_dec: int = 2
    d_ff: int = 512
    dropout: float = 0.0
    max_len: int = 128
    attention: str = "softmax"
    tie_embeddings: bool = True
    copy_head: bool = False  # pointer-generator: mix the vocabulary softmax with copying source tokens

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} / n_head {self.n_head} must be an even integer")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size {self.vocab_size} < 5 (the special tokens)")

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "Seq2SeqConfig":
        """A named size (tiny, base, gpu) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear, GELU, Linear."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional self-attention + MLP."""

    def __init__(self, cfg: Seq2SeqConfig, rope: Rotary):
        super().__init__()
        self.ln1, self.ln2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = make_attention(cfg.attention, d_model=cfg.d_model, n_head=cfg.n_head,
                                   dropout=cfg.dropout, rope=rope)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_mask=mask))
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, cfg: Seq2SeqConfig, rope: Rotary):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.RMSNorm(cfg.d_model) for _ in range(3))
        self.self_attn = make_attention(cfg.attention, d_model=cfg.d_model, n_head=cfg.n_head,
                                        dropout=cfg.dropout, rope=rope)
        self.cross_attn = make_attention("softmax", d_model=cfg.d_model, n_head=cfg.n_head,
                                         dropout=cfg.dropout, cross=True)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, mem_mask: torch.Tensor,
                self_cache: KVCache | None = None, cross_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x), causal=True, cache=self_cache))
        x = x + self.drop(self.cross_attn(self.ln2(x), memory, key_mask=mem_mask, cache=cross_cache))
        return x + self.mlp(self.ln3(x))


class DecoderCache:
    """Per-layer self-attention K/V (N beam rows) and cross-attention K/V (G question rows)."""

    def __init__(self, n_layer: int):
        self.self_kv = [KVCache() for _ in range(n_layer)]
        self.cross_kv = [KVCache() for _ in range(n_layer)]
        self.mem_mask: torch.Tensor | None = None  # (G, S)
        self.group = 1  # K: beam rows per memory row
        self.copy_keys: torch.Tensor | None = None  # (G, S, C) copy-head keys of the memory
        self.src_ids: torch.Tensor | None = None  # (G, S) source tokens the copy head scatters to

    @property
    def length(self) -> int:
        return self.self_kv[0].length

    def index_select(self, idx: torch.Tensor) -> "DecoderCache":
        """Row i of the result is row idx[i]; blocks of K rows must come from one question."""
        K = self.group
        if self.mem_mask is not None:
            idx = idx.to(self.mem_mask.device)
        groups = idx[::K] // K  # the question of each block of K rows
        if idx.numel() % K or not torch.equal(idx.view(-1, K) // K, groups[:, None].expand(-1, K)):
            raise ValueError(f"index_select must keep the {K} beams of a question together")
        out = DecoderCache(0)
        out.group = K
        out.self_kv = [c.index_select(idx) for c in self.self_kv]
        same = self.mem_mask is not None and groups.numel() == self.mem_mask.size(0) and \
            torch.equal(groups, torch.arange(groups.numel(), device=idx.device))
        if same or self.mem_mask is None:
            out.cross_kv, out.mem_mask = self.cross_kv, self.mem_mask
            out.copy_keys, out.src_ids = self.copy_keys, self.src_ids
        else:  # questions were dropped: keep only their cross-attention K/V and mask
            out.cross_kv = [c.index_select(groups) for c in self.cross_kv]
            out.mem_mask = self.mem_mask.index_select(0, groups)
            if self.copy_keys is not None:
                out.copy_keys = self.copy_keys.index_select(0, groups)
                out.src_ids = self.src_ids.index_select(0, groups)
        return out


class Seq2Seq(nn.Module):
    """The encoder-decoder; ``loss`` for training, ``decode_step`` for beam search."""

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        rope = Rotary(cfg.d_model // cfg.n_head, cfg.max_len)
        self.rope = rope  # shared by every self-attention layer (buffers only)
        self.encoder = nn.ModuleList(EncoderBlock(cfg, rope) for _ in range(cfg.n_layer_enc))
        self.decoder = nn.ModuleList(DecoderBlock(cfg, rope) for _ in range(cfg.n_layer_dec))
        self.ln_enc, self.ln_dec = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.copy_head:
            self.copy_q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            self.copy_k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
            self.copy_gate = nn.Linear(cfg.d_model, 1)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """src_ids (B, S) long, src_mask (B, S) bool (True = token) -> memory (B, S, C)."""
        x = self.drop(self.tok_emb(src_ids))  # (B, S, C)
        for block in self.encoder:
            x = block(x, src_mask)
        return self.ln_enc(x)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor, tgt_in_ids: torch.Tensor,
               src_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced decoder: tgt_in_ids (B, T) -> logits (B, T, V).

        With the copy head these are normalised log-probs (a mixture), so log_softmax and
        cross_entropy treat them the same as logits; the copy head needs ``src_ids``.
        """
        x = self.drop(self.tok_emb(tgt_in_ids))  # (B, T, C)
        for block in self.decoder:
            x = block(x, memory, src_mask)
        h = self.ln_dec(x)
        if not self.cfg.copy_head:
            return self.lm_head(h)  # (B, T, V)
        if src_ids is None:
            raise ValueError("the copy head needs src_ids")
        return self._mix(h, self.copy_k(memory), src_ids, src_mask)

    def _mix(self, h: torch.Tensor, keys: torch.Tensor, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """log(g·softmax(lm_head(h)) + (1-g)·copy): h (G, T, C), keys (G, S, C) -> (G, T, V)."""
        gen = F.log_softmax(self.lm_head(h).float(), dim=-1)  # (G, T, V)
        scores = self.copy_q(h) @ keys.transpose(1, 2) / keys.size(-1) ** 0.5  # (G, T, S)
        attn = scores.float().masked_fill(~src_mask[:, None, :], float("-inf")).softmax(-1)
        copy = torch.zeros_like(gen).scatter_add_(2, src_ids[:, None, :].expand(-1, h.size(1), -1), attn)
        gate = self.copy_gate(h).float()  # (G, T, 1): log-odds of generating
        return torch.logaddexp(F.logsigmoid(gate) + gen, F.logsigmoid(-gate) + copy.clamp_min(1e-12).log())

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_in_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(src_ids, src_mask), src_mask, tgt_in_ids, src_ids)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over target tokens (PAD ignored); batch from :func:`make_batch`."""
        tgt = batch["tgt_ids"]
        logits = self(batch["src_ids"], batch["src_mask"], tgt[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt[:, 1:].reshape(-1),
                               ignore_index=PAD)

    @torch.no_grad()
    def decode_step(self, memory: torch.Tensor, src_mask: torch.Tensor, last_tokens: torch.Tensor,
                    cache: DecoderCache | None = None, src_ids: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, DecoderCache]:
        """One decoder token for N rows -> (log-probs (N, V) float32, cache).

        memory (G, S, C), src_mask (G, S) and (copy head) src_ids (G, S) are read on the
        first call only (their K/V are cached); N must be a multiple of G (K beams per question).
        """
        N = last_tokens.size(0)
        if cache is None:
            G = memory.size(0)
            if N % G:
                raise ValueError(f"{N} decoder rows are not a multiple of {G} memory rows")
            cache = DecoderCache(len(self.decoder))
            cache.mem_mask, cache.group = src_mask, N // G
            if self.cfg.copy_head:
                if src_ids is None:
                    raise ValueError("the copy head needs src_ids on the first decode_step")
                cache.copy_keys, cache.src_ids = self.copy_k(memory), src_ids
        x = self.tok_emb(last_tokens.view(N, 1))  # (N, 1, C)
        for block, sc, cc in zip(self.decoder, cache.self_kv, cache.cross_kv):
            x = block(x, memory, cache.mem_mask, self_cache=sc, cross_cache=cc)
        h = self.ln_dec(x[:, 0])  # (N, C)
        if not self.cfg.copy_head:
            return F.log_softmax(self.lm_head(h).float(), dim=-1), cache
        G, K = cache.src_ids.size(0), cache.group
        out = self._mix(h.view(G, K, -1), cache.copy_keys, cache.src_ids, cache.mem_mask)  # (G, K, V)
        return out.view(N, -1), cache


def make_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]] | None = None,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad id lists into {src_ids, src_mask[, tgt_ids]}; tgt rows are full keys (BOS … EOS)."""
    def pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(1, max((len(r) for r in rows), default=1))
        out = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        return out.to(device)

    if any(len(r) == 0 for r in src):
        raise ValueError("an empty source row has nothing to attend to; drop it or add a token")
    src_ids = pad(src)
    batch = {"src_ids": src_ids, "src_mask": src_ids != PAD}
    if tgt is not None:
        if len(tgt) != len(src):
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets")
        batch["tgt_ids"] = pad(tgt)
    return batch

