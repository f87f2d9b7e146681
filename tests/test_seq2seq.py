"""Seq2Seq model: shapes, incremental == full forward, overfit, tied embeddings, attention API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.attention import KVCache, Rotary, make_attention
from models.seq2seq import PRESETS, Seq2Seq, Seq2SeqConfig, make_batch
from models.vocab import BOS, EOS, PAD

V = 40


def small_model(seed: int = 0, **kw) -> Seq2Seq:
    """A 2+2-layer d_model-64 model, dropout off."""
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(vocab_size=V, d_model=64, n_head=4, n_layer_enc=2, n_layer_dec=2,
                        d_ff=128, max_len=32, **kw)
    return Seq2Seq(cfg).eval()


def random_batch(B: int = 3, S: int = 9, T: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random sources of different lengths and random targets BOS … EOS."""
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(5, V, (S - i,), generator=g).tolist() for i in range(B)]
    tgt = [[BOS] + torch.randint(5, V, (T - 2 - (i % 2),), generator=g).tolist() + [EOS] for i in range(B)]
    return make_batch(src, tgt)


def test_presets_and_config_validation() -> None:
    cfg = Seq2SeqConfig.preset("tiny", vocab_size=100)
    assert (cfg.d_model, cfg.n_layer_enc, cfg.n_layer_dec) == (PRESETS["tiny"]["d_model"], 2, 2)
    assert Seq2SeqConfig.preset("gpu", vocab_size=100, dropout=0.1).dropout == 0.1
    with pytest.raises(ValueError, match="unknown preset"):
        Seq2SeqConfig.preset("huge", vocab_size=100)
    with pytest.raises(ValueError, match="even integer"):
        Seq2SeqConfig(vocab_size=100, d_model=60, n_head=4)
    with pytest.raises(ValueError, match="unknown attention kind"):
        Seq2Seq(Seq2SeqConfig(vocab_size=100, d_model=32, n_head=2, attention="nope"))


def test_shapes() -> None:
    model, batch = small_model(), random_batch()
    B, S = batch["src_ids"].shape
    T = batch["tgt_ids"].size(1) - 1
    memory = model.encode(batch["src_ids"], batch["src_mask"])
    assert memory.shape == (B, S, 64)
    logits = model(batch["src_ids"], batch["src_mask"], batch["tgt_ids"][:, :-1])
    assert logits.shape == (B, T, V)
    logprobs, cache = model.decode_step(memory, batch["src_mask"], batch["tgt_ids"][:, 0])
    assert logprobs.shape == (B, V) and cache.length == 1
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(B), atol=1e-5)


@pytest.mark.parametrize("copy_head", [False, True])
def test_incremental_equals_full_forward(copy_head: bool) -> None:
    model, batch = small_model(copy_head=copy_head), random_batch()
    tgt_in = batch["tgt_ids"][:, :-1]
    with torch.no_grad():
        full = F.log_softmax(model(batch["src_ids"], batch["src_mask"], tgt_in), dim=-1)  # (B, T, V)
        memory = model.encode(batch["src_ids"], batch["src_mask"])
    cache = None
    for t in range(tgt_in.size(1)):
        step, cache = model.decode_step(memory, batch["src_mask"], tgt_in[:, t], cache, src_ids=batch["src_ids"])
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("copy_head", [False, True])
def test_decode_at_equals_the_full_pass_at_those_cells(copy_head: bool) -> None:
    """decode_at gives the same distributions as log_softmax(decode) at the cells asked for, with
    one source shared by every row (memory (1, S, C)) and with a source per row."""
    model, batch = small_model(copy_head=copy_head), random_batch(B=4)
    tgt_in = batch["tgt_ids"][:, :-1]
    B, T = tgt_in.shape
    cells = torch.tensor([0, 3, T + 1, 2 * T + 4, 4 * T - 1, 3])  # repeats and any order
    with torch.no_grad():
        memory = model.encode(batch["src_ids"], batch["src_mask"])
        full = F.log_softmax(model.decode(memory, batch["src_mask"], tgt_in, batch["src_ids"]), dim=-1)
        got = model.decode_at(memory, batch["src_mask"], tgt_in, cells, batch["src_ids"])
        torch.testing.assert_close(got, full.reshape(B * T, -1)[cells], atol=1e-5, rtol=0)
        one = slice(1, 2)  # question 1 against every row's target
        mem1, mask1, src1 = memory[one], batch["src_mask"][one], batch["src_ids"][one]
        full1 = F.log_softmax(model.decode(mem1.expand(B, -1, -1), mask1.expand(B, -1), tgt_in,
                                           src1.expand(B, -1)), dim=-1)
        got1 = model.decode_at(mem1, mask1, tgt_in, cells, src1)
        torch.testing.assert_close(got1, full1.reshape(B * T, -1)[cells], atol=1e-5, rtol=0)
        assert not torch.allclose(got1, got, atol=1e-3)  # the shared source is not question 0's


@pytest.mark.parametrize("copy_head", [False, True])
def test_grouped_beams_and_reorder_equal_full_forward(copy_head: bool) -> None:
    """K beam rows per question share one memory row; index_select reorders them mid-way."""
    model, batch = small_model(copy_head=copy_head), random_batch(B=2)
    K, T = 3, 6
    g = torch.Generator().manual_seed(5)
    seqs = torch.randint(5, V, (2 * K, T), generator=g)
    seqs[:, 0] = BOS
    memory = model.encode(batch["src_ids"], batch["src_mask"])
    cache, perm = None, torch.tensor([2, 2, 0, 4, 3, 3])  # stays inside each question's block
    rows = torch.arange(2 * K)
    outs = []
    for t in range(T):
        if t == 3:
            cache, rows = cache.index_select(perm), rows[perm]
        step, cache = model.decode_step(memory, batch["src_mask"], seqs[rows, t], cache, src_ids=batch["src_ids"])
        outs.append(step)
    # the rows after the reorder followed sequence rows[...] from step 3 on, their parents before
    hist = torch.cat([seqs[perm, :3], seqs[rows, 3:]], dim=1)  # (N, T)
    rep = torch.arange(2).repeat_interleave(K)
    with torch.no_grad():
        full = F.log_softmax(model(batch["src_ids"][rep], batch["src_mask"][rep], hist), dim=-1)
    for t in range(3, T):
        torch.testing.assert_close(outs[t], full[:, t], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="keep the 3 beams"):
        cache.index_select(torch.tensor([0, 1, 3, 2, 4, 5]))


def test_cache_drops_finished_questions() -> None:
    """Selecting only question 1's rows also selects its cross-attention K/V and mask."""
    model, batch = small_model(), random_batch(B=2)
    memory = model.encode(batch["src_ids"], batch["src_mask"])
    tok = torch.full((4,), BOS)
    _, cache = model.decode_step(memory, batch["src_mask"], tok)
    sub = cache.index_select(torch.tensor([2, 3]))
    a, _ = model.decode_step(None, None, torch.tensor([7, 8]), sub)
    ref_cache = model.decode_step(memory[1:], batch["src_mask"][1:], tok[:2])[1]
    b, _ = model.decode_step(None, None, torch.tensor([7, 8]), ref_cache)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_attention_chunked_cache_equals_causal_full() -> None:
    torch.manual_seed(0)
    attn = make_attention("softmax", d_model=32, n_head=4, rope=Rotary(8, 16)).eval()
    x = torch.randn(2, 7, 32)
    full = attn(x, causal=True)
    cache, outs = KVCache(), []
    for lo, hi in ((0, 3), (3, 4), (4, 7)):
        outs.append(attn(x[:, lo:hi], causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_rope_is_relative() -> None:
    rope = Rotary(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = [(rope(q, m) * rope(k, m - 3)).sum() for m in (3, 10, 20)]
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])
    with pytest.raises(ValueError, match="max_len"):
        rope(q, 32)


def test_loss_ignores_pad_and_decreases_on_overfit() -> None:
    model = small_model(seed=3).train()
    g = torch.Generator().manual_seed(7)
    src = [torch.randint(5, V, (6,), generator=g).tolist() for _ in range(8)]
    tgt = [[BOS] + torch.randint(5, V, (3 + i % 4,), generator=g).tolist() + [EOS] for i in range(8)]
    batch = make_batch(src, tgt)
    assert (batch["tgt_ids"] == PAD).any()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss = model.loss(batch)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.1 * first, (first, loss.item())
    # PAD labels are ignored: extra padding columns do not change the loss
    wide = dict(batch, tgt_ids=F.pad(batch["tgt_ids"], (0, 3), value=PAD))
    model.eval()
    torch.testing.assert_close(model.loss(wide), model.loss(batch), atol=1e-6, rtol=0)


def test_tied_embeddings_stay_tied() -> None:
    model = small_model()
    assert model.lm_head.weight is model.tok_emb.weight
    untied = small_model(tie_embeddings=False)
    assert untied.n_params() - model.n_params() == V * 64
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.train()
    model.loss(random_batch()).backward()
    opt.step()
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_decoder_cache_grows_one_token_per_step_and_matches_the_full_pass() -> None:
    """decode_step's per-layer caches hold exactly the tokens fed so far, and the incremental
    log-probs equal the teacher-forced ones at every position."""
    model = small_model()
    batch = random_batch()
    tgt = batch["tgt_ids"]
    memory = model.encode(batch["src_ids"], batch["src_mask"])
    full = torch.log_softmax(model.decode(memory, batch["src_mask"], tgt[:, :-1], batch["src_ids"]).float(), -1)
    cache = None
    for t in range(tgt.size(1) - 1):
        step, cache = model.decode_step(memory, batch["src_mask"], tgt[:, t], cache, src_ids=batch["src_ids"])
        assert cache.length == t + 1 and all(c.length == t + 1 for c in cache.self_kv)
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=0)
