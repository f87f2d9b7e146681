"""Transformer-VQ, the functional form: block form == dense softmax over quantised keys (values
and gradients; bias, rel_key, exact window, window RoPE, code bias, padding), the chunked CPU
kernel, the quantiser. The layer: tests/test_attention_vq_layer.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.attention import Rotary
from models.attention_vq import vq_attention
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
