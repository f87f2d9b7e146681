"""Transformer-VQ: block form == dense softmax over quantised keys, gradients, causality,
decoding cache, position, padding, EMA codebook and its rank-shared restarts."""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from models.attention import Rotary
from models.attention_vq import VQAttention, vq_attention
from models.vq_cache import VQCache
from models.vq_codebook import gather_codes, quantise, straight_through

B, H, T, D, S, L = 2, 3, 21, 8, 5, 4  # T is not a multiple of L


def rand(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense(q, k, v, codebook, *, causal, key_mask=None, bias=None, block_len=L, block_ste=False,
          prev_block=True, rel_key=None, exact_window=False, rope=None, code_bias=None):
    """O(T²) reference: softmax(q k̂ᵀ/√D [+ window bias]) v with k̂ = C[nearest code].

    The explicit window of a query in block n: block n, and block n−1 when causal and
    prev_block; bias (H, L, 2L) (columns: block n−1, block n) or (H, L, L) is added there.
    block_ste: k̂ carries the straight-through gradient only for pairs in the window (what the
    linear-time form can give); otherwise to every pair. rel_key (H, 3L−1, D): window pairs
    score q_i·(k̂_j + r(i − j)), r indexed by the absolute offset i − j + L − 1. exact_window:
    window pairs score the exact key k_j (with its own gradient) instead of k̂_j. rope: window
    pairs score RoPE-rotated queries and keys at their absolute positions (pairs beyond the
    window stay unrotated). code_bias (H,): added to the pairs outside the window.
    """
    n = k.size(2)
    codes = quantise(k, codebook)
    hard = gather_codes(codebook, codes)  # (B, H, T, D)
    ste = k + (hard - k).detach()
    blk = torch.arange(n) // block_len
    same = blk[:, None] == blk[None, :]  # (T, T)
    two = causal and prev_block
    window = same | (blk[:, None] - 1 == blk[None, :]) if two else same
    near_k = k if exact_window else ste
    near = (q @ near_k.transpose(-1, -2) if rope is None else rope(q) @ rope(near_k).transpose(-1, -2))
    far = q @ (hard.detach() if block_ste else ste).transpose(-1, -2)
    s = torch.where(window, near, far) if block_ste or exact_window or rope is not None else near
    s = s / math.sqrt(q.size(-1))
    if bias is not None:
        i = torch.arange(n) % block_len
        col = i[None, :] + (block_len * same.long() if two else 0)  # (T, T) the key's bias column
        s = s + torch.where(window, bias[:, i[:, None], col], torch.zeros(()).to(s))
    if rel_key is not None:
        t = torch.arange(n)
        off = (t[:, None] - t[None, :] + block_len - 1).clamp(0, rel_key.size(1) - 1)  # (T, T)
        qr = torch.einsum("bhid,hijd->bhij", q, rel_key[:, off]) / math.sqrt(q.size(-1))
        s = s + torch.where(window, qr, torch.zeros(()).to(s))
    if code_bias is not None:
        s = s + torch.where(window, torch.zeros(()).to(s), code_bias[:, None, None])
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def inputs(seed: int = 0, requires_grad: bool = False):
    q, k, v = (rand(B, H, T, D, seed=seed + i).requires_grad_(requires_grad) for i in range(3))
    return q, k, v, rand(H, S, D, seed=seed + 9)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("causal,prev_block", [(True, True), (False, True)], ids=["causal", "bidirectional"])
def test_sequence_shorter_than_a_block_equals_dense(causal: bool, prev_block: bool) -> None:
    """T < block_len computes one T-long block (no padding to L): still the dense answer, bias sliced."""
    q, k, v, cb = inputs()
    big = 32  # > T = 21
    bias = rand(H, big, 2 * big if causal else big, seed=5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 15:] = False
    out = vq_attention(q, k, v, cb, block_len=big, causal=causal, key_mask=mask, bias=bias, prev_block=prev_block)
    ref = dense(q, k, v, cb, causal=causal, key_mask=mask, bias=bias[:, :, big:] if causal else bias, block_len=big,
                prev_block=False)
    assert rel_err(out, ref) < 1e-9


@pytest.mark.parametrize("causal,prev_block", [(True, True), (True, False), (False, True)],
                         ids=["causal-two-block-window", "causal-one-block", "bidirectional"])
def test_block_form_equals_dense(causal: bool, prev_block: bool) -> None:
    q, k, v, cb = inputs()
    out = vq_attention(q, k, v, cb, block_len=L, causal=causal, prev_block=prev_block)
    assert rel_err(out, dense(q, k, v, cb, causal=causal)) < 1e-9  # no bias: the window does not matter
    two = causal and prev_block
    bias = rand(H, L, 2 * L if two else L, seed=5)  # the explicit window's bias path, padding masked
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 13:] = False
    out = vq_attention(q, k, v, cb, block_len=L, causal=causal, key_mask=mask, bias=bias, prev_block=prev_block)
    assert rel_err(out, dense(q, k, v, cb, causal=causal, key_mask=mask, bias=bias, prev_block=prev_block)) < 1e-9
    with pytest.raises(ValueError, match="explicit window"):
        vq_attention(q, k, v, cb, block_len=L, causal=causal, bias=rand(H, L, 3 * L, seed=1), prev_block=prev_block)


@pytest.mark.parametrize("causal,prev_block", [(True, True), (True, False), (False, True)],
                         ids=["causal-two-block-window", "causal-one-block", "bidirectional"])
def test_query_dependent_position_term_equals_dense(causal: bool, prev_block: bool) -> None:
    """rel_key (Transformer-XL-style q·r(i − j) in the window) with bias and padding: values and
    gradients (q, k, v, rel_key) equal the dense reference; T < L (one short block) too."""
    q, k, v, cb = inputs(requires_grad=True)
    two = causal and prev_block
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 13:] = False
    g = rand(B, H, T, D, seed=7)
    for blk in (L, 32):  # 32 > T: the short-block path
        rk = rand(H, 3 * blk - 1, D, seed=11).requires_grad_(True)
        bias = rand(H, blk, 2 * blk if two else blk, seed=5)
        out = vq_attention(q, k, v, cb, block_len=blk, causal=causal, key_mask=mask, bias=bias,
                           prev_block=prev_block, rel_key=rk)
        short = blk > T
        ref = dense(q, k, v, cb, causal=causal, key_mask=mask, block_len=blk, block_ste=True,
                    bias=bias[:, :, blk:] if short and two else bias, prev_block=prev_block and not short,
                    rel_key=rk)
        assert rel_err(out, ref) < 1e-9, blk
        got = torch.autograd.grad((out * g).sum(), (q, k, v, rk))
        want = torch.autograd.grad((ref * g).sum(), (q, k, v, rk))
        for name, a, b in zip("q k v rel_key".split(), got, want):
            assert rel_err(a, b) < 1e-9, (blk, name)
        assert got[3].abs().max() > 0
    no_rel = vq_attention(q, k, v, cb, block_len=L, causal=causal, prev_block=prev_block)
    assert rel_err(vq_attention(q, k, v, cb, block_len=L, causal=causal, prev_block=prev_block,
                                rel_key=rand(H, 3 * L - 1, D, seed=11)), no_rel) > 1e-3  # the term matters
    with pytest.raises(ValueError, match="rel_key"):
        vq_attention(q, k, v, cb, block_len=L, causal=causal, rel_key=rand(H, 2 * L, D, seed=1))


def test_float32_matches_and_large_scores_stay_finite() -> None:
    q, k, v, cb = inputs()
    ref = dense(q, k, v, cb, causal=True)
    out = vq_attention(q.float(), k.float(), v.float(), cb.float(), block_len=L, causal=True)
    assert rel_err(out.double(), ref) < 1e-5
    big = vq_attention(100 * q, k, v, 10 * cb, block_len=L, causal=True)  # scores ~1e3: exp overflows unstabilised
    assert torch.isfinite(big).all() and rel_err(big, dense(100 * q, k, v, 10 * cb, causal=True)) < 1e-9


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_dense(causal: bool) -> None:
    q, k, v, cb = inputs(requires_grad=True)
    bias = rand(H, L, 2 * L if causal else L, seed=6).requires_grad_(True)
    g = rand(B, H, T, D, seed=7)
    got = torch.autograd.grad((vq_attention(q, k, v, cb, block_len=L, causal=causal, bias=bias) * g).sum(),
                              (q, k, v, bias))
    ref = torch.autograd.grad((dense(q, k, v, cb, causal=causal, bias=bias, block_ste=True) * g).sum(),
                              (q, k, v, bias))
    for name, a, b in zip("q k v bias".split(), got, ref):
        assert rel_err(a, b) < 1e-9, name
    # q and v are exact against the plain dense form too; k differs (cross-block STE dropped)
    full = torch.autograd.grad((dense(q, k, v, cb, causal=causal, bias=bias) * g).sum(), (q, k, v))
    assert rel_err(got[0], full[0]) < 1e-9 and rel_err(got[2], full[2]) < 1e-9
    assert rel_err(got[1], full[1]) > 1e-3


@pytest.mark.parametrize("causal,prev_block", [(True, True), (True, False), (False, True)],
                         ids=["causal-two-block", "causal-one-block", "bidirectional"])
def test_exact_window_variant_equals_dense_with_gradients(causal: bool, prev_block: bool) -> None:
    """exact_window: exact keys in the explicit window, codes before it -- values and gradients
    against the dense mixed-key softmax (bias, rel_key, padding); differs from the default form."""
    q, k, v, cb = inputs(requires_grad=True)
    two = causal and prev_block
    bias = rand(H, L, 2 * L if two else L, seed=6).requires_grad_(True)
    rk = rand(H, 3 * L - 1, D, seed=8).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 17:] = False
    g = rand(B, H, T, D, seed=7)
    kw = dict(causal=causal, bias=bias, prev_block=prev_block, rel_key=rk, key_mask=mask)
    out = vq_attention(q, k, v, cb, block_len=L, exact_window=True, **kw)
    ref = dense(q, k, v, cb, exact_window=True, block_ste=True, **kw)
    assert rel_err(out, ref) < 1e-9
    got = torch.autograd.grad((out * g).sum(), (q, k, v, bias, rk))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v, bias, rk))
    for name, a, b in zip("q k v bias rel_key".split(), got, want):
        assert rel_err(a, b) < 1e-9, name
    assert rel_err(vq_attention(q, k, v, cb, block_len=L, **kw), ref) > 1e-3  # the default quantises the window
    if not causal:  # no bias: the blockless non-causal shortcut must not take the variant
        plain = dict(causal=False, prev_block=prev_block)
        assert rel_err(vq_attention(q, k, v, cb, block_len=L, exact_window=True, **plain),
                       dense(q, k, v, cb, exact_window=True, **plain)) < 1e-9


def rope64(n: int) -> Rotary:
    """Rotary over head dim D with exact float64 tables (the module keeps float32 ones)."""
    rope = Rotary(D, n)
    f = torch.outer(torch.arange(n, dtype=torch.float64),
                    1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rope.cos, rope.sin = f.cos(), f.sin()
    return rope


@pytest.mark.parametrize("causal,prev_block,exact,block_len", [
    (True, True, False, L), (True, False, False, L), (False, True, False, L), (True, True, True, L),
    (True, True, False, 32)], ids=["causal-two-block", "causal-one-block", "bidirectional",
                                   "exact-window", "shorter-than-a-block"])
def test_window_rope_equals_dense_rope_on_window_pairs(causal: bool, prev_block: bool, exact: bool,
                                                       block_len: int) -> None:
    """window_rope rotates by slot in the window; RoPE depends only on i − j, so the window's
    scores must equal RoPE at absolute positions, the code scores staying unrotated: values and
    gradients (straight-through to window keys) against the dense form, with bias, rel_key and
    padding."""
    q, k, v, cb = inputs(requires_grad=True)
    two = causal and prev_block
    bias = rand(H, block_len, 2 * block_len if two else block_len, seed=6).requires_grad_(True)  # sliced when T < L
    rk = rand(H, 3 * block_len - 1, D, seed=8).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 17:] = False
    g = rand(B, H, T, D, seed=7)
    kw = dict(causal=causal, bias=bias, prev_block=prev_block, rel_key=rk, key_mask=mask, exact_window=exact)
    out = vq_attention(q, k, v, cb, block_len=block_len, window_rope=rope64(2 * block_len), **kw)
    ref = dense(q, k, v, cb, block_len=block_len, block_ste=True, rope=rope64(T), **kw)
    assert rel_err(out, ref) < 1e-9
    got = torch.autograd.grad((out * g).sum(), (q, k, v, bias, rk))
    want = torch.autograd.grad((ref * g).sum(), (q, k, v, bias, rk))
    for name, a, b in zip("q k v bias rel_key".split(), got, want):
        assert rel_err(a, b) < 1e-9, name
    assert rel_err(vq_attention(q, k, v, cb, block_len=block_len, **kw), ref) > 1e-3  # the rotation acts


def test_exact_window_within_one_window_is_softmax_whatever_the_codebook() -> None:
    """Every key inside the explicit window: the variant is exact softmax, the codes unused."""
    q, k, v, cb = inputs()
    for causal, block_len in ((True, 11), (False, T)):  # causal two-block window of 11: keys 0..21 seen
        out = vq_attention(q, k, v, cb * 7.0, block_len=block_len, causal=causal, exact_window=True)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-12, rtol=0)


def test_truncated_gradient_option_stops_old_values() -> None:
    q, k, v, cb = inputs(requires_grad=True)
    out = vq_attention(q, k, v, cb, block_len=L, causal=True, grad_thru_cache=False)
    gv, = torch.autograd.grad(out[:, :, -1].sum(), v)  # last query is in block 5: window = keys 16..20
    assert gv[:, :, :16].abs().max() == 0 and gv[:, :, 16:].abs().max() > 0
    gv_full, = torch.autograd.grad(vq_attention(q, k, v, cb, block_len=L)[:, :, -1].sum(), v)
    assert gv_full[:, :, :16].abs().max() > 0


def test_codebook_holding_every_key_equals_softmax() -> None:
    q, k, v, _ = inputs()
    q, k, v = q[:1], k[:1], v[:1]
    cb = k[0].clone()  # (H, T, D): each key is its own code
    out = vq_attention(q, k, v, cb, block_len=L, causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12, rtol=0)
    out = vq_attention(q, k, v, cb, block_len=L, causal=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=0)


def test_quantiser_and_straight_through() -> None:
    _, k, _, cb = inputs()
    codes = quantise(k, cb)
    brute = ((k[..., None, :] - cb[None, :, None]) ** 2).sum(-1).argmin(-1)  # (B, H, T)
    assert torch.equal(codes, brute)
    kk = k.clone().requires_grad_(True)
    k_hat = straight_through(kk, cb, codes)
    torch.testing.assert_close(k_hat, gather_codes(cb, codes), atol=1e-12, rtol=0)
    g = rand(*k.shape, seed=3)
    assert torch.equal(torch.autograd.grad((k_hat * g).sum(), kk)[0], g)  # ∂k̂/∂k = I


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
    with torch.no_grad():
        full, full_perm = attn(x, causal=True), attn(x[perm], causal=True)
        cache, steps = attn.new_cache(), []
        for t in range(11):
            if t == 6:
                cache = cache.index_select(perm)
            rows = perm if t >= 6 else torch.arange(3)
            steps.append(attn(x[rows, t:t + 1], causal=True, cache=cache))
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


@pytest.mark.parametrize("rows", [1, 2, 4], ids=lambda r: f"{r}-row-groups")
@pytest.mark.parametrize("slices", [1, 2, 5, 0], ids=lambda c: f"{c}-slice-chunks" if c else "kept")
@pytest.mark.parametrize("causal,prev_block", [(True, True), (True, False), (False, True)],
                         ids=["causal-two-block-window", "causal-one-block", "bidirectional"])
def test_chunked_block_kernel_equals_dense(monkeypatch, slices: int, rows: int, causal: bool, prev_block: bool) -> None:
    """Long inputs on CPU go through (head, block) slices a chunk at a time and the backward
    recomputes the probabilities; chunks of 1, 2 and 5 slices (so chunks start mid-head and span
    heads and batch rows; the bias, padding and rel_key terms are read as a shared row, a view or
    a gather) give the dense answer and gradients, as does the one-chunk form that keeps them.
    Causal blocks' queries go in 1, 2 or 4 row groups, each scoring only the window keys its
    queries can see. With window_rope the window's rotated queries (their own input and
    gradient) go through the same chunks and groups."""
    import models.vq_kernel as vqmod
    two = causal and prev_block
    W = 2 * L if two else L
    monkeypatch.setattr(vqmod, "CAUSAL_ROW_GROUPS", rows)
    if slices:
        monkeypatch.setattr(vqmod, "KEEP_CELLS", 0)
        monkeypatch.setattr(vqmod, "CPU_CHUNK_CELLS", slices * L * (S + W))
    n_slice = B * H * math.ceil(T / L)
    assert vqmod.chunk_slices(n_slice, L * (S + W), torch.device("cpu")) == ((slices, False) if slices else (n_slice, True))
    q, k, v, cb = inputs(seed=3, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 10:] = False
    g = rand(B, H, T, D, seed=7)
    for use_mask, use_rel, use_rope, use_cb in ((False, False, False, False), (True, False, False, False),
                                                (True, True, False, False), (True, True, True, False),
                                                (True, True, True, True)):
        bias = rand(H, L, W, seed=5).requires_grad_(True)
        rk = rand(H, 3 * L - 1, D, seed=11).requires_grad_(True) if use_rel else None
        cbias = rand(H, seed=13).requires_grad_(True) if use_cb else None
        km = mask if use_mask else None
        out = vq_attention(q, k, v, cb, block_len=L, causal=causal, key_mask=km, bias=bias, prev_block=prev_block,
                           rel_key=rk, window_rope=rope64(2 * L) if use_rope else None, code_bias=cbias)
        ref = dense(q, k, v, cb, causal=causal, key_mask=km, bias=bias, block_ste=True, prev_block=prev_block,
                    rel_key=rk, rope=rope64(T) if use_rope else None, code_bias=cbias)
        assert rel_err(out, ref) < 1e-9, (use_mask, use_rel, use_rope, use_cb)
        wrt = (q, k, v, bias) + ((rk,) if use_rel else ()) + ((cbias,) if use_cb else ())
        got = torch.autograd.grad((out * g).sum(), wrt)
        want = torch.autograd.grad((ref * g).sum(), wrt)
        names = "q k v bias".split() + (["rel_key"] if use_rel else []) + (["code_bias"] if use_cb else [])
        for name, a, b in zip(names, got, want):
            assert rel_err(a, b) < 1e-9, (use_mask, use_rel, use_rope, use_cb, name)


@pytest.mark.parametrize("cells", [1, 7 * S, 1 << 20])
def test_quantise_in_chunks_is_the_nearest_code(cells: int) -> None:
    k, cb = rand(B, H, T, D, seed=1), rand(H, S, D, seed=2)
    want = ((k[:, :, :, None, :] - cb[None, :, None]) ** 2).sum(-1).argmin(-1)  # (B, H, T) brute force
    assert torch.equal(quantise(k, cb, cells=cells), want)


@pytest.mark.parametrize("causal,prev_block", [(True, True), (True, False), (False, True)],
                         ids=["causal-two-block-window", "causal-one-block", "bidirectional"])
def test_whole_blocks_without_padding_equal_dense(monkeypatch, causal: bool, prev_block: bool) -> None:
    """T a multiple of block_len and no key_mask: code sums without key weights (the unweighted
    path), values and gradients against the dense form, kept and chunked."""
    import models.vq_kernel as vqmod
    n = 6 * L
    q, k, v = (rand(B, H, n, D, seed=20 + i).requires_grad_(True) for i in range(3))
    cb, g = rand(H, S, D, seed=29), rand(B, H, n, D, seed=27)
    bias = rand(H, L, 2 * L if causal and prev_block else L, seed=5)
    for keep_cells in (1 << 22, 0):
        monkeypatch.setattr(vqmod, "KEEP_CELLS", keep_cells)
        out = vq_attention(q, k, v, cb, block_len=L, causal=causal, bias=bias, prev_block=prev_block)
        ref = dense(q, k, v, cb, causal=causal, bias=bias, block_ste=True, prev_block=prev_block)
        assert rel_err(out, ref) < 1e-9
        got = torch.autograd.grad((out * g).sum(), (q, k, v))
        want = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for name, a, b in zip("qkv", got, want):
            assert rel_err(a, b) < 1e-9, (keep_cells, name)
