"""Performer / FAVOR+: unbiased features, error falling with m, chunked causal == masked
quadratic form, causality, decoding cache, redraws, and the soft-VQ reading."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.attention_performer import (PerformerAttention, PerformerCache, favor_features, key_features,
                                        orthogonal_gaussian, performer_attention)
from models.vq_codebook import quantise
from tests.test_attention_vq import rand
from tests.test_attention_vq_layer import causal_sensitivity, decode_with_reorder


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_favor_features_are_unbiased_within_4_sigma() -> None:
    d, m = 4, 200_000
    q, k = 0.5 * rand(d, seed=1), 0.5 * rand(d, seed=2)
    proj = rand(m, d, seed=3)  # iid N(0, I) rows
    per_feature = m * favor_features(q[None], proj)[0] * favor_features(k[None], proj)[0]  # (m,) samples
    mean, sigma = per_feature.mean(), per_feature.std() / math.sqrt(m)
    exact = torch.exp(q @ k)
    assert abs(mean - exact) < 4 * sigma, (float(mean), float(exact), float(sigma))
    assert abs(mean - exact) > 0  # a Monte Carlo estimate, not the closed form
    ortho = orthogonal_gaussian(4096, d, gen(4), torch.float64)
    est = (favor_features(q[None], ortho) * favor_features(k[None], ortho)).sum()
    assert abs(est - exact) / exact < 0.05


def test_orthogonal_gaussian_blocks() -> None:
    w = orthogonal_gaussian(20, 8, gen(0), torch.float64)
    assert w.shape == (20, 8)
    unit = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(unit[:8] @ unit[:8].T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert w.norm(dim=1).std() > 0.1  # chi-distributed norms, not all √d
    assert torch.equal(w, orthogonal_gaussian(20, 8, gen(0), torch.float64))
    assert not torch.equal(w, orthogonal_gaussian(20, 8, gen(1), torch.float64))


def test_error_falls_as_m_grows() -> None:
    B, H, T, D = 1, 2, 32, 8
    q, k, v = (0.7 * rand(B, H, T, D, seed=i) for i in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    errs = []
    for m in (8, 64, 512, 2048):
        e = [float((performer_attention(q, k, v, orthogonal_gaussian(m, D, gen(s), torch.float64), causal=True)
                    - exact).norm() / exact.norm()) for s in range(4)]
        errs.append(sum(e) / len(e))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 3, errs


def quadratic(q, k, v, proj, causal, key_mask=None):
    """The same features, the O(T²) way: (φ(q)φ(k)ᵀ ⊙ mask) v / row sums."""
    c = q.size(-1) ** -0.25
    a = favor_features(q * c, proj) @ favor_features(k * c, proj).transpose(-1, -2)  # (B, H, T, T)
    if causal:
        a = a.tril()
    if key_mask is not None:
        a = a * key_mask[:, None, None, :]
    return (a @ v) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_equals_masked_quadratic_form(causal: bool) -> None:
    B, H, T, D = 2, 2, 23, 8  # T not a multiple of the chunk
    q, k, v = (rand(B, H, T, D, seed=10 + i) for i in range(3))
    proj = orthogonal_gaussian(16, D, gen(0), torch.float64)
    ref = quadratic(q, k, v, proj, causal)
    for chunk in (1, 5, 64):
        out = performer_attention(q, k, v, proj, causal=causal, chunk_len=chunk)
        assert float((out - ref).norm() / ref.norm()) < 1e-12, chunk
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 17:] = False
    out = performer_attention(q, k, v, proj, causal=causal, key_mask=mask, chunk_len=5)
    torch.testing.assert_close(out[1, :, :17], quadratic(q, k, v, proj, causal, mask)[1, :, :17], atol=1e-12, rtol=0)
    big = performer_attention(30 * q, 30 * k, v, proj, causal=causal, chunk_len=5)  # exp(proj·x) would overflow raw
    assert torch.isfinite(big).all()


def layer(**kw) -> PerformerAttention:
    from models.attention import Rotary
    torch.manual_seed(0)
    return PerformerAttention(d_model=16, n_head=2, rope=Rotary(8, 32), nb_features=12, chunk_len=4, **kw).double()


def test_module_causality_jacobian() -> None:
    attn = layer().eval()
    x = rand(1, 9, 16, seed=1)
    per_pair = causal_sensitivity(attn, x)
    assert per_pair.triu(1).max() == 0
    assert (per_pair.tril() > 0).sum() == 9 * 10 // 2


def test_incremental_decoding_equals_full_with_reorder() -> None:
    attn = layer().eval()
    x = rand(3, 10, 16, seed=2)
    perm = torch.tensor([1, 1, 2])
    full, full_perm, steps, cache = decode_with_reorder(attn, x, perm, at=5)
    assert isinstance(cache, PerformerCache) and cache.length == 10
    assert cache.state.shape == (3, 2, 12, 8) and cache.norm.shape == (3, 2, 12)  # (m, D) + (m,) per head
    torch.testing.assert_close(torch.cat(steps[:5], 1), full[:, :5], atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat(steps[5:], 1), full_perm[:, 5:], atol=1e-12, rtol=0)


def test_redraw_schedule_uses_the_shared_generator() -> None:
    attn = layer(redraw_every=3)
    first = attn.proj.clone()
    attn.train_step_begin(1, gen(7))
    assert torch.equal(attn.proj, first)  # not on schedule
    torch.manual_seed(1)
    attn.train_step_begin(3, gen(7))
    assert not torch.equal(attn.proj, first)
    other = layer(redraw_every=3)
    torch.manual_seed(2)  # the global RNG must not matter
    other.train_step_begin(3, gen(7))
    assert torch.equal(attn.proj, other.proj)
    assert "proj" in attn.state_dict()
    with pytest.raises(ValueError, match="cross-attention role"):
        PerformerAttention(d_model=16, n_head=2, cross=True)
    with pytest.raises(ValueError, match="no options"):
        PerformerAttention(d_model=16, n_head=2, codebook_size=4)


def test_soft_vq_reading_zero_temperature_is_nearest_code() -> None:
    """§7: the stabilised key feature exp(−‖k − ω_i‖²/2) is a soft assignment of k to "code"
    ω_i; at temperature τ → 0 its normalised form is Transformer-VQ's one-hot nearest code."""
    D, m, n = 4, 6, 50
    proj = rand(m, D, seed=1)
    near = torch.randint(0, m, (n,), generator=gen(3))
    k = (proj[near] + 0.3 * rand(n, D, seed=2))[None, None]  # (1, 1, n, D): keys near some ω
    codes = quantise(k, proj[None])  # (1, 1, n): the proj rows as a 1-head codebook
    hard = F.one_hot(codes[0, 0], m).double()
    assert (codes[0, 0] != near).sum() < n // 4  # mostly the ω they were drawn near
    for tau, tol in ((1.0, None), (1e-3, 1e-6)):
        soft = key_features(k / tau ** 0.5, proj / tau ** 0.5)[0, 0]  # exp(−‖k − ω‖²/(2τ))
        soft = soft / soft.sum(-1, keepdim=True)
        err = float((soft - hard).abs().max())
        assert (err < tol) if tol else (err > 0.05), (tau, err)
