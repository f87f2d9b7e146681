"""Transformer-VQ, the layer: causality, decoding cache (with beam reorder), q_temp and
code_bias, position, padding, gradients and commitment loss, the EMA codebook and its
rank-shared restarts. The functional form and its kernel: tests/test_attention_vq.py."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from models.attention_vq import VQAttention, vq_attention
from models.vq_cache import VQCache
from models.vq_codebook import gather_codes, quantise
from tests.test_attention_vq import rand, rel_err

def layer(seed: int = 0, **kw) -> VQAttention:
    torch.manual_seed(seed)
    opts = dict(codebook_size=6, block_len=4, codebook_init=0.3) | kw
    return VQAttention(d_model=16, n_head=2, **opts).double()


def causal_sensitivity(attn, x: torch.Tensor) -> torch.Tensor:
    """|∂(r·y_t)/∂x_j| summed over channels, r random: (T out, T in); the Jacobian's block pattern."""
    x = x.clone().requires_grad_(True)
    y = attn(x, causal=True)[0]  # (T, C)
    r = rand(y.size(-1), seed=99)
    rows = [torch.autograd.grad(y[t] @ r, x, retain_graph=True)[0][0].abs().sum(-1) for t in range(y.size(0))]
    return torch.stack(rows)


def decode_with_reorder(attn, x: torch.Tensor, perm: torch.Tensor, at: int):
    """The full causal pass on x and on x[perm], and a token-by-token pass through the layer's
    cache whose rows are reordered by ``perm`` before step ``at`` (a beam search's reorder):
    (full, full_perm, steps (list of (B, 1, C)), cache)."""
    with torch.no_grad():
        full, full_perm = attn(x, causal=True), attn(x[perm], causal=True)
        cache, steps = attn.new_cache(), []
        for t in range(x.size(1)):
            if t == at:
                cache = cache.index_select(perm)
            rows = perm if t >= at else torch.arange(x.size(0))
            steps.append(attn(x[rows, t:t + 1], causal=True, cache=cache))
    return full, full_perm, steps, cache


def test_module_causality_jacobian() -> None:
    attn = layer().eval()
    x = rand(1, 10, 16, seed=1)
    per_pair = causal_sensitivity(attn, x)  # (T out, T in)
    assert per_pair.triu(1).max() == 0
    assert (per_pair.tril() > 0).sum() == 10 * 11 // 2  # every past input matters


@pytest.mark.parametrize("prev_block,rel_key,exact,rope", [
    (True, False, False, False), (False, False, False, False), (True, True, False, False),
    (True, True, True, False), (False, False, True, False), (True, True, False, True), (False, False, True, True)],
    ids=["two-block-window", "one-block", "two-block-window-rel-key", "exact-window-rel-key", "exact-one-block",
         "window-rope-rel-key", "window-rope-exact-one-block"])
def test_incremental_decoding_equals_full_with_reorder(prev_block: bool, rel_key: bool, exact: bool,
                                                       rope: bool) -> None:
    attn = layer(prev_block=prev_block, rel_key=rel_key, exact_window=exact, window_rope=rope).eval()
    if rel_key:
        with torch.no_grad():
            attn.rel_key.copy_(rand(*attn.rel_key.shape, seed=12))
    x = rand(3, 11, 16, seed=2)  # 11 tokens: 2 full blocks and a partial one
    perm = torch.tensor([2, 0, 0])
    full, full_perm, steps, cache = decode_with_reorder(attn, x, perm, at=6)
    if exact or rope:  # the variant is not the plain quantised form in disguise
        twin = layer(prev_block=prev_block, rel_key=rel_key).eval()
        twin.load_state_dict(attn.state_dict())
        with torch.no_grad():
            assert rel_err(twin(x, causal=True), full) > 1e-3
    assert isinstance(cache, VQCache) and cache.length == 11
    assert cache.vsum.shape == (3, 2, 6, 8)  # O(S·D) per head, whatever the length
    torch.testing.assert_close(torch.cat(steps[:6], 1), full[:, :6], atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(steps[6:], 1), full_perm[:, 6:], atol=1e-12, rtol=0)


def test_q_temp_and_code_bias_in_the_layer_and_its_cache() -> None:
    """q_temp: exp(t_h) times head h's window, rel_key and code scores, i.e. the layer equals the
    plain layer's attention on queries scaled per head; code_bias: b_h on head h's code scores
    (vq_attention's own term, against dense in the kernel tests). Zero at init: the plain
    layer. Incremental decoding equals the full pass with both."""
    kw = dict(rel_key=True, window_rope=True)
    attn, plain = layer(q_temp=True, code_bias=True, **kw).eval(), layer(**kw).eval()
    with torch.no_grad():
        attn.rel_key.copy_(rand(*attn.rel_key.shape, seed=12))
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k not in ("q_temp", "code_bias")})
    x = rand(2, 11, 16, seed=2)  # block_len 4: the third block's queries see the first through codes
    with torch.no_grad():
        assert rel_err(attn(x, causal=True), plain(x, causal=True)) < 1e-14  # t = b = 0 at init
        attn.q_temp.copy_(torch.tensor([math.log(3.0), math.log(0.5)], dtype=torch.float64))
        attn.code_bias.copy_(torch.tensor([1.5, -2.0], dtype=torch.float64))
        full = attn(x, causal=True)
        q, k, v = plain.qkv(x)
        y = vq_attention(q * torch.tensor([3.0, 0.5], dtype=q.dtype)[:, None, None], k, v, plain.codebook,
                         block_len=plain.block_len, causal=True, bias=plain.block_bias(True),
                         codes=quantise(k, plain.codebook), prev_block=True, rel_key=plain.rel_key,
                         window_rope=plain.window_rope, code_bias=attn.code_bias)
        ref = plain.out_proj(y.transpose(1, 2).reshape(2, 11, 16))
        cache = attn.new_cache()
        steps = torch.cat([attn(x[:, t:t + 1], causal=True, cache=cache) for t in range(11)], 1)
        for t_h, b_h in (([0.0, 0.0], [1.5, -2.0]), ([math.log(3.0), math.log(0.5)], [0.0, 0.0])):
            one = layer(q_temp=True, code_bias=True, **kw).eval()  # each term alone acts
            one.load_state_dict(attn.state_dict())
            one.q_temp.copy_(torch.tensor(t_h, dtype=torch.float64))
            one.code_bias.copy_(torch.tensor(b_h, dtype=torch.float64))
            assert rel_err(one(x, causal=True), plain(x, causal=True)) > 1e-3
    torch.testing.assert_close(full, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(steps, full, atol=1e-12, rtol=0)
    assert {id(attn.q_temp), id(attn.code_bias)} <= {id(p) for p in attn.parameters()}
    torch.testing.assert_close(layer(q_temp=1.5).q_temp.exp(), torch.full((2,), 1.5, dtype=torch.float64))
    for bad in (-1.0, float("nan"), "warm"):
        with pytest.raises(ValueError, match="q_temp is the initial query temperature"):
            layer(q_temp=bad)


def test_encoder_layer_depends_on_token_order() -> None:
    x = rand(1, 8, 16, seed=4)
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    for rel_bias, rope, order_matters in ((True, False, True), (False, False, False), (False, True, True)):
        attn = layer(rel_bias=rel_bias, window_rope=rope).eval()
        y, y_perm = attn(x), attn(x[:, perm])
        assert torch.allclose(y[:, perm], y_perm, atol=1e-12) != order_matters, (rel_bias, rope)


def test_key_mask_drops_padded_keys() -> None:
    attn = layer().eval()
    x = rand(2, 9, 16, seed=5)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    x2 = x.clone()
    x2[1, 6:] = rand(3, 16, seed=6)  # change what sits under the padding
    y, y2 = attn(x, key_mask=mask), attn(x2, key_mask=mask)
    torch.testing.assert_close(y[1, :6], y2[1, :6], atol=1e-12, rtol=0)
    torch.testing.assert_close(y[1, :6], attn(x[1:, :6])[0], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="cross-attention role"):
        VQAttention(d_model=16, n_head=2, cross=True)
    with pytest.raises(ValueError, match="no options"):
        VQAttention(d_model=16, n_head=2, window=3)


def test_gradients_reach_qkv_and_commitment_loss() -> None:
    attn = layer(commit_beta=0.5).train()
    x = rand(2, 9, 16, seed=7)
    y = attn(x, causal=True)
    assert attn.aux_loss is not None and attn.aux_loss > 0
    with torch.no_grad():
        k = attn.qkv(x)[1]
        err = ((k - gather_codes(attn.codebook, quantise(k, attn.codebook))) ** 2).sum((1, 3)).mean()
    torch.testing.assert_close(attn.aux_loss, 0.5 * err.float(), rtol=1e-5, atol=0)
    (y.square().sum() + attn.aux_loss).backward()
    d = 16
    for name, grad in (("q", attn.q_proj.weight.grad), ("k", attn.kv_proj.weight.grad[:d]),
                       ("v", attn.kv_proj.weight.grad[d:])):
        assert grad is not None and grad.abs().max() > 0, name
    attn.eval()
    attn(x)
    assert attn.aux_loss is None


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def test_ema_codebook_is_kmeans_step_and_dead_codes_restart_from_generator() -> None:
    attn, twin = (layer(ema_decay=0.0, dead_threshold=0.5).train() for _ in range(2))
    x = rand(2, 9, 16, seed=8)
    attn(x)
    twin(x)
    with torch.no_grad():
        k = attn.qkv(x)[1]  # (B, H, T, D)
        codes = quantise(k, attn.codebook)
    before = attn.codebook.clone()
    torch.manual_seed(123)  # the global RNG must not matter
    attn.train_step_end(0, torch.Generator().manual_seed(1), identity)
    torch.manual_seed(456)
    twin.train_step_end(0, torch.Generator().manual_seed(1), identity)
    assert torch.equal(attn.codebook, twin.codebook)  # same generator -> same restarts
    for h in range(2):
        for s in range(6):
            sel = codes[:, h] == s
            if sel.any():  # γ = 0: a used code becomes the mean of its keys
                torch.testing.assert_close(attn.codebook[h, s], k[:, h][sel].mean(0), atol=1e-12, rtol=0)
            else:  # dead: restarted, away from its old place
                assert not torch.allclose(attn.codebook[h, s], before[h, s])
    third = layer(ema_decay=0.0, dead_threshold=0.5).train()
    third(x)
    third.train_step_end(0, torch.Generator().manual_seed(2), identity)
    assert not torch.equal(third.codebook, attn.codebook)  # another draw moves the dead codes elsewhere


def test_two_ranks_all_reduced_keep_identical_codebooks() -> None:
    """Two ranks, different data, stats summed by a simulated all_reduce: one codebook, equal to
    a single process that saw both batches."""
    ranks = [layer(ema_decay=0.9, dead_threshold=0.6).train() for _ in range(2)]
    single = layer(ema_decay=0.9, dead_threshold=0.6).train()
    xs = [rand(2, 9, 16, seed=10), rand(2, 9, 16, seed=11)]
    barrier, box, lock = threading.Barrier(2), [], threading.Lock()

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        with lock:
            box.append(t.clone())
        barrier.wait()
        t.copy_(box[0] + box[1])
        barrier.wait()
        return t

    for step in range(3):
        box.clear()
        for r in range(2):
            ranks[r](xs[r] + 0.1 * step)
        single(torch.cat(xs) + 0.1 * step)
        threads = [threading.Thread(target=m.train_step_end, args=(step, torch.Generator().manual_seed(step), all_reduce))
                   for m in ranks]
        [t.start() for t in threads]
        [t.join() for t in threads]
        single.train_step_end(step, torch.Generator().manual_seed(step), identity)
    assert torch.equal(ranks[0].codebook, ranks[1].codebook)
    torch.testing.assert_close(ranks[0].codebook, single.codebook, atol=1e-6, rtol=0)
    assert (ranks[0].codebook - layer().codebook).abs().max() > 1e-3  # it did move
    assert {"codebook", "ema_count", "ema_sum", "ema_sq"} <= set(ranks[0].state_dict())


def test_dead_fraction_restarts_rarely_used_codes() -> None:
    """A code used, but below dead_fraction of its head's mean use, restarts; without the option
    only codes under the absolute threshold do."""
    x = rand(2, 9, 16, seed=8)
    moved = {}
    for frac in (0.0, 0.9):
        attn = layer(ema_decay=0.0, dead_threshold=0.5, dead_fraction=frac).train()
        attn(x)
        with torch.no_grad():
            codes = quantise(attn.qkv(x)[1], attn.codebook)
        attn.train_step_end(0, torch.Generator().manual_seed(1), identity)
        cnt = torch.stack([torch.bincount(codes[:, h].flatten(), minlength=6) for h in range(2)]).double()
        rare = (cnt > 0) & (cnt < frac * cnt.mean(1, keepdim=True))  # used, yet under the fraction
        means = torch.stack([torch.stack([attn.qkv(x)[1][:, h][codes[:, h] == s].mean(0) if cnt[h, s] > 0
                                          else torch.zeros(8, dtype=torch.float64) for s in range(6)])
                             for h in range(2)]).detach()
        moved[frac] = ~torch.isclose(attn.codebook, means, atol=1e-9).all(-1) & (cnt > 0)  # used codes not at their mean
        assert torch.equal(moved[frac], rare), frac
    assert moved[0.9].any() and not moved[0.0].any()
    with pytest.raises(ValueError, match="dead_fraction"):
        layer(dead_fraction=1.0)
