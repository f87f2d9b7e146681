"""Window / full-NoPE-log-n / ALiBi kinds against dense references; HWFA receptive field and
translation invariance (ALGORITHMS.md §6 tests 1-3)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.attention import Rotary, make_attention
from models.attention_pattern import receptive_field
from models.attention_window import (WindowCache, alibi_bias, alibi_slopes, logn_scale,
                                     window_attention)
from models.lm import LM, LMConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and the test machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_qkv(B=2, H=3, T=37, D=8, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, S or T, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def band_reference(q, k, v, w):
    """Dense attention with the band mask 0 <= i - j < w (queries are the last T key positions)."""
    T, S = q.size(2), k.size(2)
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i - j >= 0) & (i - j < w))


@pytest.mark.parametrize("w", [1, 2, 5, 8, 37, 50])
@pytest.mark.parametrize("block", [None, 8, 5])
def test_window_attention_equals_band_mask(w, block):
    q, k, v = rand_qkv(T=37)  # 37 is not a multiple of any block size used
    torch.testing.assert_close(window_attention(q, k, v, w, block=block), band_reference(q, k, v, w),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("past", [1, 3, 9])
def test_window_attention_with_past_keys(past):
    """Queries continuing a sequence: S = past + T keys (a cache); more past than w−1 is cut."""
    q, k, v = rand_qkv(T=6, S=6 + past, seed=1)
    torch.testing.assert_close(window_attention(q, k, v, 4, block=4), band_reference(q, k, v, 4),
                               rtol=0, atol=1e-12)


def test_window_attention_is_linear_in_length():
    """T = 100k: a dense T×T score matrix would need 80 GB; the blocked form needs O(T·w)."""
    q, k, v = rand_qkv(B=1, H=1, T=100_000, D=2, seed=2)
    y = window_attention(q, k, v, 3)
    torch.testing.assert_close(y[:, :, -5:], band_reference(q[:, :, -5:], k[:, :, -7:], v[:, :, -7:], 3))


def test_window_attention_rejects_bad_input():
    q, k, v = rand_qkv(T=5)
    with pytest.raises(ValueError, match="window must be"):
        window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="S >= T"):
        window_attention(q, k[:, :, :3], v[:, :, :3], 2)


def test_window_cache_keeps_w_minus_1_and_counts_positions():
    c = WindowCache(window=3)
    for t in range(5):
        kv = torch.full((2, 1, 1, 4), float(t))
        k, _ = c.extend(kv, kv)
        assert k.size(2) == min(t + 1, 3)  # the past w-1 plus the new one
    assert c.length == 5 and c.k.size(2) == 2 and c.k[0, 0, :, 0].tolist() == [3.0, 4.0]
    r = c.index_select(torch.tensor([1, 1, 0]))
    assert r.length == 5 and r.k.shape == (3, 1, 2, 4)
    assert WindowCache(window=1).extend(kv, kv)[0].size(2) == 1  # w=1 keeps nothing


def module(kind, **opts):
    torch.manual_seed(0)
    return make_attention(kind, d_model=16, n_head=2, rope=Rotary(8, 256), **opts).double().eval()


def dependence(f, x: torch.Tensor, i: int) -> torch.Tensor:
    """(T,) |d <f(x)[0, i], r> / d x[0, t]| summed over channels, for a random direction r: one
    Jacobian-vector row, zero exactly where output i does not depend on input t."""
    x = x.detach().requires_grad_(True)
    y = f(x)[0, i]
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=y.dtype)
    (g,) = torch.autograd.grad((y * r).sum(), x)
    return g[0].abs().sum(-1)


def dense_causal(m, x, score_fn):
    """Reference: q, k, v from the module's projection, scores via score_fn(q, k, i, j), causal softmax."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in m.qkv_proj(x).chunk(3, dim=-1))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s = score_fn(q, k, i, j).masked_fill(j > i, float("-inf"))
    y = s.softmax(-1) @ v
    return m.out_proj(y.transpose(1, 2).reshape(B, T, C))


def test_alibi_equals_dense_reference():
    m = module("alibi")
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    slopes = alibi_slopes(2)
    ref = dense_causal(m, x, lambda q, k, i, j: q @ k.transpose(-1, -2) / math.sqrt(8)
                       - slopes[:, None, None] * (i - j))
    torch.testing.assert_close(m(x, causal=True), ref, rtol=0, atol=1e-12)


def test_alibi_slopes_and_bias():
    assert alibi_slopes(8).tolist() == [2.0 ** -(h + 1) for h in range(8)]
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    b = alibi_bias(torch.tensor([0.5]), torch.arange(3), torch.arange(3))
    assert b[0, 2].tolist() == [-1.0, -0.5, 0.0] and b[0, 0, 1] == float("-inf")


def test_logn_scale_is_standard_at_train_len():
    N, d = 512, 64
    s = logn_scale(torch.arange(4 * N), N, d)
    assert s[N - 1].item() == pytest.approx(1 / math.sqrt(d), rel=0, abs=1e-15)  # n = N
    assert s[0].item() == 0.0 and bool((s.diff() > 0).all())
    assert logn_scale(torch.arange(4), N, d, clip=True).tolist() == [1 / 8] * 4
    # entropy grows more slowly with n than under standard scaling (random q, k)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, d, generator=g, dtype=torch.float64), torch.randn(8192, d, generator=g, dtype=torch.float64)

    def entropy(n, scale):
        p = (q @ k[:n].T * scale).softmax(-1)
        return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())
    std = entropy(8192, d ** -0.5) - entropy(512, d ** -0.5)
    logn = entropy(8192, math.log(8192, N) / d ** 0.5) - entropy(512, 1 / d ** 0.5)
    assert 0 < logn < std


def test_full_nope_logn_equals_dense_reference():
    m = module("full_nope_logn", train_len=8)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    ref = dense_causal(m, x, lambda q, k, i, j: (q @ k.transpose(-1, -2))
                       * (torch.log1p(i.double()) / math.log(8) / math.sqrt(8)))
    torch.testing.assert_close(m(x, causal=True), ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="train_len"):
        make_attention("full_nope_logn", d_model=16, n_head=2)


@pytest.mark.parametrize("kind,opts", [("window", {"window": 3}), ("alibi", {}),
                                       ("full_nope_logn", {"train_len": 8})])
def test_kinds_are_causal(kind, opts):
    """The Jacobian of output i w.r.t. input j is zero for j > i (and, for window, j <= i-w)."""
    m = module(kind, **opts)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    dep = torch.stack([dependence(lambda z: m(z, causal=True), x, i) for i in range(9)]) > 0  # (T_out, T_in)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    allowed = (j <= i) & ((i - j < opts["window"]) if kind == "window" else True)
    assert torch.equal(dep, allowed)


def test_kinds_refuse_unknown_options_and_cross():
    with pytest.raises(ValueError, match="takes no options"):
        make_attention("alibi", d_model=16, n_head=2, window=3)
    with pytest.raises(ValueError, match="needs an option window"):
        make_attention("window", d_model=16, n_head=2, rope=Rotary(8, 16))
    with pytest.raises(ValueError, match="no cross form"):
        make_attention("window", d_model=16, n_head=2, rope=Rotary(8, 16), window=2, cross=True)


# --------------------------------------------------------------------------- HWFA properties
def hwfa_model(L=4, w=3, N=32, seed=0) -> LM:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=13, d_model=16, n_head=2, n_layer=L, d_ff=32, train_len=N,
                   pattern="hwfa", window=w)
    return LM(cfg).double().eval()


def test_receptive_field_formula_by_composed_masks():
    def composed(T, w, n):
        band = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=-1)
        m = ((band >= 0) & (band < w)).double()
        return int((torch.linalg.matrix_power(m, n)[-1] > 0).sum())
    assert composed(800, 16, 23) == receptive_field(16, 23) == 346
    assert composed(800, 32, 23) == receptive_field(32, 23) == 714 > 512


def test_window_stack_jacobian_is_zero_outside_receptive_field():
    L, w, T = 4, 3, 24
    m = hwfa_model(L, w)
    x = torch.randn(1, T, 16, dtype=torch.float64)
    reach = (w - 1) * (L - 1)
    for i in (T - 1, 10, reach, 3):
        dep = dependence(lambda z: m.features(z, n_blocks=L - 1), x, i)  # (T,)
        lo = i - reach
        assert bool((dep[:max(lo, 0)] == 0).all()) and bool((dep[i + 1:] == 0).all())
        assert bool((dep[max(lo, 0):i + 1] > 0).all())  # non-zero up to the edge
    # the full (last) layer is global: it reaches position 0 from the end
    assert dependence(m.features, x, T - 1)[0] > 0


def test_window_layers_are_translation_invariant():
    L, w, T, P = 4, 3, 20, 7
    m = hwfa_model(L, w)
    g = torch.Generator().manual_seed(3)
    x, prefix = torch.randint(0, 13, (2, T), generator=g), torch.randint(0, 13, (2, P), generator=g)
    emb = m.tok_emb
    a = m.features(emb(x), n_blocks=L - 1)
    b = m.features(emb(torch.cat((prefix, x), 1)), n_blocks=L - 1)[:, P:]
    start = (w - 1) * (L - 1)
    torch.testing.assert_close(a[:, start:], b[:, start:], rtol=0, atol=1e-5)
    assert (a[:, :start] - b[:, :start]).abs().max() > 1e-3  # before the field is full: not invariant
    full_a, full_b = m.features(emb(x)), m.features(emb(torch.cat((prefix, x), 1)))[:, P:]
    assert (full_a[:, start:] - full_b[:, start:]).abs().max() > 1e-3  # the full layer sees the prefix
