"""Encoder-decoder Transformer (nanoGPT style): pre-norm, RoPE self-attention, cross-attention.

Targets are trie keys ``BOS S… SEP P… SEP M… EOS``; the decoder input is the key without its
last token, the label the key without BOS. ``decode_step`` runs one token for N beam rows with
a :class:`DecoderCache`; memory may hold one row per question (G rows, N = G*K beams).

Attention kinds per role (models/attention.py's registry): ``attention_enc`` (encoder
self-attention), ``attention_dec`` (decoder self-attention), both defaulting to ``attention``,
and ``attention_cross``; ``attention_options`` maps a kind to its own options. A kind declares
the roles it takes in ``roles`` (all three when it does not say).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import ATTENTION_REGISTRY, KVCache, Rotary, _load_builtin_kinds, aux_losses, make_attention
from models.vocab import PAD

PRESETS: dict[str, dict[str, int | bool]] = {
    "tiny": dict(d_model=128, n_head=4, n_layer_enc=2, n_layer_dec=2, d_ff=512, copy_head=True),
    "base": dict(d_model=256, n_head=8, n_layer_enc=3, n_layer_dec=3, d_ff=1024, dropout=0.1, copy_head=True),
    "gpu": dict(d_model=768, n_head=12, n_layer_enc=6, n_layer_dec=6, d_ff=3072, copy_head=True),
}


ROLE_FIELDS = {"encoder": "attention_enc", "decoder": "attention_dec", "cross": "attention_cross"}


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Model hyperparameters; ``attention`` names the self-attention kind, ``attention_enc`` /
    ``attention_dec`` override it per stack, ``attention_options`` holds each kind's options."""

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
    attention_enc: str | None = None  # encoder self-attention kind; None -> attention
    attention_dec: str | None = None  # decoder self-attention kind; None -> attention
    attention_cross: str = "softmax"  # decoder cross-attention kind
    attention_options: dict = field(default_factory=dict)  # kind -> its options, e.g. {"vq": {"block_len": 32}}

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} / n_head {self.n_head} must be an even integer")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size {self.vocab_size} < 5 (the special tokens)")
        _load_builtin_kinds()
        for role, kind in self.roles().items():
            if kind not in ATTENTION_REGISTRY:
                raise ValueError(f"unknown attention kind {kind!r} for the {role} role; "
                                 f"registered: {sorted(ATTENTION_REGISTRY)}")
            takes = getattr(ATTENTION_REGISTRY[kind], "roles", ("encoder", "decoder", "cross"))
            if role not in takes:
                raise ValueError(f"attention kind {kind!r} cannot take the {role} role (it takes "
                                 f"{', '.join(takes)}); set {ROLE_FIELDS[role]} to another kind")
        unknown = sorted(set(self.attention_options) - set(ATTENTION_REGISTRY))
        if unknown:
            raise ValueError(f"attention_options names unknown kinds {unknown}; registered: {sorted(ATTENTION_REGISTRY)}")

    def roles(self) -> dict[str, str]:
        """The attention kind of each role: encoder, decoder (self-attention) and cross."""
        return {"encoder": self.attention_enc or self.attention, "decoder": self.attention_dec or self.attention,
                "cross": self.attention_cross}

    def make_attention(self, role: str, layer: int, n_layer: int, rope: Rotary | None) -> nn.Module:
        """The attention module of ``role`` for layer ``layer`` of ``n_layer``, with its kind's options."""
        kind = self.roles()[role]
        return make_attention(kind, d_model=self.d_model, n_head=self.n_head, dropout=self.dropout,
                              rope=rope, cross=role == "cross", layer=layer, n_layer=n_layer,
                              **dict(self.attention_options.get(kind, {})))

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

    def __init__(self, cfg: Seq2SeqConfig, rope: Rotary, layer: int = 0):
        super().__init__()
        self.ln1, self.ln2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = cfg.make_attention("encoder", layer, cfg.n_layer_enc, rope)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_mask=mask))
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, cfg: Seq2SeqConfig, rope: Rotary, layer: int = 0):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.RMSNorm(cfg.d_model) for _ in range(3))
        self.self_attn = cfg.make_attention("decoder", layer, cfg.n_layer_dec, rope)
        self.cross_attn = cfg.make_attention("cross", layer, cfg.n_layer_dec, None)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None, mem_mask: torch.Tensor,
                self_cache=None, cross_cache=None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x), causal=True, cache=self_cache))
        x = x + self.drop(self.cross_attn(self.ln2(x), memory, key_mask=mem_mask, cache=cross_cache))
        return x + self.mlp(self.ln3(x))


class DecoderCache:
    """Per-layer self-attention state (N beam rows) and cross-attention K/V (G question rows).

    With ``blocks`` (the decoder's layers) each cache is that layer's ``attn.new_cache()``
    (softmax: KVCache; vq, performer: their fixed-size states); without, KVCaches.
    """

    def __init__(self, n_layer: int, blocks: Sequence[nn.Module] | None = None):
        if blocks is not None:
            self.self_kv = [b.self_attn.new_cache() for b in blocks]
            self.cross_kv = [b.cross_attn.new_cache() for b in blocks]
        else:
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
        self.encoder = nn.ModuleList(EncoderBlock(cfg, rope, i) for i in range(cfg.n_layer_enc))
        self.decoder = nn.ModuleList(DecoderBlock(cfg, rope, i) for i in range(cfg.n_layer_dec))
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

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        """Mean cross-entropy over target tokens (PAD ignored); batch from :func:`make_batch`.

        When attention modules hold extra losses after this forward (the VQ commitment loss,
        training only), returns (ce + aux, {"ce": ..., "aux": ...}); otherwise the tensor.
        """
        tgt = batch["tgt_ids"]
        logits = self(batch["src_ids"], batch["src_mask"], tgt[:, :-1])  # (B, T-1, V)
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt[:, 1:].reshape(-1),
                             ignore_index=PAD)
        aux = aux_losses(self)
        if aux is None:
            return ce
        return ce + aux, {"ce": float(ce.detach()), "aux": float(aux.detach())}

    @torch.no_grad()
    def decode_at(self, memory: torch.Tensor, src_mask: torch.Tensor, tgt_in_ids: torch.Tensor,
                  cells: torch.Tensor, src_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced log-probs (U, V) float32 at ``cells`` only: flat indices b·T + t into
        tgt_in_ids (B, T). Equals ``log_softmax(decode(...)).view(B·T, V)[cells]`` without any
        (B, T, V) tensor: the re-ranker's generator pass over a hub subject's thousands of keys
        needs the distribution at each distinct trie prefix, not at every position of every key.
        memory (1, S, C) with src_mask / src_ids (1, S): one source shared by all B rows (the
        vocabulary head and copy keys are computed once); or (B, S, C) per row."""
        B, T = tgt_in_ids.shape
        x = self.drop(self.tok_emb(tgt_in_ids))
        mem, mask = memory.expand(B, -1, -1), src_mask.expand(B, -1)
        for block in self.decoder:
            x = block(x, mem, mask)
        h = self.ln_dec(x).reshape(B * T, -1)[cells]  # (U, C)
        if not self.cfg.copy_head:
            return F.log_softmax(self.lm_head(h).float(), dim=-1)
        if src_ids is None:
            raise ValueError("the copy head needs src_ids")
        if memory.size(0) == 1:
            out = self._mix(h[None], self.copy_k(memory), src_ids[:1], src_mask[:1])[0]
        else:
            rows = cells // T
            out = self._mix(h[:, None], self.copy_k(memory)[rows], src_ids[rows], src_mask[rows])[:, 0]
        return F.log_softmax(out, dim=-1)  # the mixture is normalised already; as decode's callers do

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
            cache = DecoderCache(len(self.decoder), self.decoder)
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

