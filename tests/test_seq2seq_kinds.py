"""Seq2Seq with per-role attention kinds: config, caches, beam decoding, training with aux loss."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from models.attention import KVCache
from models.attention_performer import PerformerAttention, PerformerCache
from models.attention_vq import VQAttention
from models.vq_cache import VQCache
from models.seq2seq import Seq2Seq, Seq2SeqConfig, make_batch
from models.vocab import BOS, EOS

V = 40
OPTIONS = {"vq": {"codebook_size": 8, "block_len": 3, "commit_beta": 0.01},
           "performer": {"nb_features": 16, "chunk_len": 2}}


def model(seed: int = 0, **kw) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(vocab_size=V, d_model=32, n_head=2, n_layer_enc=2, n_layer_dec=2, d_ff=64,
                        max_len=32, attention_options=OPTIONS, **kw)
    return Seq2Seq(cfg).eval()


def random_batch(B: int = 2, S: int = 8, T: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(5, V, (S - i,), generator=g).tolist() for i in range(B)]
    tgt = [[BOS] + torch.randint(5, V, (T - 2,), generator=g).tolist() + [EOS] for _ in range(B)]
    return make_batch(src, tgt)


def test_config_roles_options_and_old_configs() -> None:
    old = {"vocab_size": V, "d_model": 32, "n_head": 2, "attention": "softmax"}  # saved before the fields
    cfg = Seq2SeqConfig(**json.loads(json.dumps(old)))
    assert cfg.roles() == {"encoder": "softmax", "decoder": "softmax", "cross": "softmax"}
    mixed = Seq2SeqConfig(vocab_size=V, d_model=32, n_head=2, attention="vq", attention_dec="performer",
                          attention_options=OPTIONS)
    assert mixed.roles() == {"encoder": "vq", "decoder": "performer", "cross": "softmax"}
    assert Seq2SeqConfig(**json.loads(json.dumps(mixed.to_dict()))) == mixed
    with pytest.raises(ValueError, match="'vq' cannot take the cross role.*attention_cross"):
        Seq2SeqConfig(vocab_size=V, d_model=32, n_head=2, attention_cross="vq")
    with pytest.raises(ValueError, match="unknown kinds"):
        Seq2SeqConfig(vocab_size=V, d_model=32, n_head=2, attention_options={"vqq": {}})
    with pytest.raises(ValueError, match="no options"):
        Seq2Seq(Seq2SeqConfig(vocab_size=V, d_model=32, n_head=2, attention="vq",
                              attention_options={"vq": {"window": 4}}))


def test_kinds_are_built_per_role_with_their_options() -> None:
    m = model(attention_enc="vq", attention_dec="performer")
    assert all(isinstance(b.attn, VQAttention) and b.attn.block_len == 3 for b in m.encoder)
    assert all(isinstance(b.self_attn, PerformerAttention) and b.self_attn.nb_features == 16 for b in m.decoder)
    assert not m.decoder[0].cross_attn.__class__.__name__.startswith(("VQ", "Performer"))
    # layer= reaches the kind: each layer draws its own codebook / features
    assert not torch.equal(m.encoder[0].attn.codebook, m.encoder[1].attn.codebook)
    assert not torch.equal(m.decoder[0].self_attn.proj, m.decoder[1].self_attn.proj)
    memory = m.encode(*(random_batch()[k] for k in ("src_ids", "src_mask")))
    _, cache = m.decode_step(memory, random_batch()["src_mask"], torch.full((2,), BOS))
    assert isinstance(cache.self_kv[0], PerformerCache) and isinstance(cache.cross_kv[0], KVCache)
    m2 = model(attention="vq")
    _, cache = m2.decode_step(memory, random_batch()["src_mask"], torch.full((2,), BOS))
    assert isinstance(cache.self_kv[1], VQCache) and cache.length == 1


@pytest.mark.parametrize("kind", ["vq", "performer"])
def test_beams_and_reorder_equal_full_forward(kind: str) -> None:
    """K beam rows per question, index_select mid-way (crossing vq block boundaries)."""
    m, batch = model(attention=kind), random_batch()
    K, T = 3, 8
    seqs = torch.randint(5, V, (2 * K, T), generator=torch.Generator().manual_seed(5))
    seqs[:, 0] = BOS
    memory = m.encode(batch["src_ids"], batch["src_mask"])
    cache, perm, rows, outs = None, torch.tensor([1, 1, 0, 5, 3, 3]), torch.arange(2 * K), []
    for t in range(T):
        if t == 4:
            cache, rows = cache.index_select(perm), rows[perm]
        step, cache = m.decode_step(memory, batch["src_mask"], seqs[rows, t], cache)
        outs.append(step)
    hist = torch.cat([seqs[perm, :4], seqs[rows, 4:]], dim=1)
    rep = torch.arange(2).repeat_interleave(K)
    with torch.no_grad():
        before = F.log_softmax(m(batch["src_ids"][rep], batch["src_mask"][rep], seqs), dim=-1)
        after = F.log_softmax(m(batch["src_ids"][rep], batch["src_mask"][rep], hist), dim=-1)
    for t in range(T):
        torch.testing.assert_close(outs[t], (before if t < 4 else after)[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["vq", "performer"])
def test_tiny_model_trains_and_saves_its_buffers(kind: str) -> None:
    m = model(seed=3, attention=kind).train()
    g = torch.Generator().manual_seed(7)
    src = [torch.randint(5, V, (6,), generator=g).tolist() for _ in range(8)]
    tgt = [[BOS] + torch.randint(5, V, (4,), generator=g).tolist() + [EOS] for _ in range(8)]
    batch = make_batch(src, tgt)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(12):
        for mod in m.modules():  # what the trainer's call_hooks does
            if hasattr(mod, "train_step_begin"):
                mod.train_step_begin(step, torch.Generator().manual_seed(step))
        out = m.loss(batch)
        loss, parts = out if isinstance(out, tuple) else (out, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for mod in m.modules():
            if hasattr(mod, "train_step_end"):
                mod.train_step_end(step, torch.Generator().manual_seed(step), lambda t: t)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    sd = m.state_dict()
    if kind == "vq":
        assert parts["aux"] > 0 and abs(parts["ce"] + parts["aux"] - losses[-1]) < 1e-4
        assert {"encoder.0.attn.codebook", "decoder.1.self_attn.ema_count"} <= set(sd)
        fresh = model(seed=3, attention=kind)
        assert not torch.equal(sd["encoder.0.attn.codebook"], fresh.state_dict()["encoder.0.attn.codebook"])
    else:
        assert parts == {} and {"encoder.0.attn.proj", "decoder.1.self_attn.proj"} <= set(sd)
    clone = model(seed=9, attention=kind)
    clone.load_state_dict(sd)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone.loss(batch), m.loss(batch))
    assert dataclasses.asdict(clone.cfg) == dataclasses.asdict(m.cfg)
