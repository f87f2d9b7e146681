"""Density baselines: independent pixels (exact, smoothed) and mixtures fitted by EM."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.density_baselines import IndependentPixels, Mixture, fit_mixture


def sample_mixture(pi: np.ndarray, theta: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.choice(len(pi), size=n, p=pi)
    return (rng.random((n, theta.shape[1])) < theta[k]).astype(np.int64)


def true_mixture_log_prob(pi: np.ndarray, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Direct float64 computation, one component at a time."""
    per = np.stack([np.log(pi[k]) + (x * np.log(theta[k]) + (1 - x) * np.log1p(-theta[k])).sum(1)
                    for k in range(len(pi))], axis=1)
    m = per.max(1, keepdims=True)
    return (m + np.log(np.exp(per - m).sum(1, keepdims=True)))[:, 0]


@pytest.fixture(scope="module")
def three_bernoullis():
    rng = np.random.default_rng(0)
    pi = np.array([0.5, 0.3, 0.2])
    theta = np.clip(rng.random((3, 30)) ** 2, 0.03, 0.97)    # well-separated components
    return pi, theta, sample_mixture(pi, theta, 3000, 1), sample_mixture(pi, theta, 2000, 2)


@pytest.mark.parametrize("n_levels,alpha", [(2, 1.0), (5, 0.5), (17, 0.0)])
def test_independent_pixels_equals_direct_computation(n_levels: int, alpha: float) -> None:
    rng = np.random.default_rng(3)
    train = rng.integers(0, n_levels, (200, 7))
    test = rng.integers(0, n_levels, (50, 7))
    model = IndependentPixels.fit(train, n_levels=n_levels, alpha=alpha)
    expected = np.zeros(len(test))
    for i, row in enumerate(test):
        for d, v in enumerate(row):
            count = int((train[:, d] == v).sum())
            expected[i] += math.log((count + alpha) / (len(train) + alpha * n_levels))
    np.testing.assert_allclose(model.log_prob(test).numpy(), expected, rtol=0, atol=1e-10)
    assert model.nll(test) == pytest.approx(-expected.mean())


def test_independent_pixels_smoothing_keeps_unseen_values_finite() -> None:
    train = np.zeros((10, 3), dtype=np.int64)
    model = IndependentPixels.fit(train, n_levels=2, alpha=1.0)
    assert math.isfinite(model.nll(np.ones((1, 3), dtype=np.int64)))
    assert model.log_prob(np.ones((1, 3), dtype=np.int64))[0] == pytest.approx(3 * math.log(1 / 12))
    with pytest.raises(ValueError, match="0..1"):
        model.log_prob(np.full((1, 3), 2))


@pytest.mark.parametrize("n_levels,alpha", [(2, 1e-2), (2, 0.0), (4, 0.5)])
def test_em_objective_never_decreases(three_bernoullis, n_levels: int, alpha: float) -> None:
    _, _, train, _ = three_bernoullis
    x = train if n_levels == 2 else (train + np.roll(train, 1, axis=1) * 2)   # 4 levels
    m = fit_mixture(x[:1000], n_components=4, n_levels=n_levels, n_iter=40, alpha=alpha,
                    alpha_pi=1.0 if alpha else 0.0, tol=-1.0, seed=5)
    obj = np.array([h["objective"] for h in m.history])
    assert len(obj) == 41
    assert (np.diff(obj) >= -1e-10).all(), np.diff(obj).min()
    assert obj[-1] > obj[0] + 1.0                          # EM did move
    if alpha == 0.0:                                        # plain ML EM: the log-likelihood itself
        ll = np.array([h["log_lik"] for h in m.history])
        np.testing.assert_array_equal(ll, obj)


def test_em_recovers_a_known_bernoulli_mixture(three_bernoullis) -> None:
    pi, theta, train, test = three_bernoullis
    m = fit_mixture(train, n_components=3, n_iter=300, seed=0, n_init=3)
    true_nll = -true_mixture_log_prob(pi, theta, test).mean()
    assert abs(m.nll(test) - true_nll) < 0.05, (m.nll(test), true_nll)
    # the parameters, up to a permutation of the components
    est = torch.exp(m.log_theta[:, :, 1]).numpy()
    err = min(np.abs(est[list(p)] - theta).max() for p in itertools.permutations(range(3)))
    assert err < 0.1
    ind = IndependentPixels.fit(train, 2, alpha=1.0)
    assert ind.nll(test) > m.nll(test) + 1.0              # the mixture structure matters here
    # the model's log_prob equals the direct formula at its own parameters
    fitted_pi = torch.exp(m.log_pi).numpy()
    np.testing.assert_allclose(m.log_prob(test).numpy(), true_mixture_log_prob(fitted_pi, est, test),
                               rtol=0, atol=1e-9)


def test_em_is_seeded_and_blocked() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, (500, 6))
    a = fit_mixture(x, 3, n_levels=3, n_iter=10, seed=1)
    b = fit_mixture(x, 3, n_levels=3, n_iter=10, seed=1)
    torch.testing.assert_close(a.log_theta, b.log_theta, rtol=0, atol=0)
    import models.density_baselines as db
    old = db.ROWS_PER_BLOCK
    db.ROWS_PER_BLOCK = 37                                   # many blocks, an uneven last one
    try:
        c = fit_mixture(x, 3, n_levels=3, n_iter=10, seed=1)
    finally:
        db.ROWS_PER_BLOCK = old
    torch.testing.assert_close(a.log_theta, c.log_theta, rtol=0, atol=1e-10)
    assert isinstance(a, Mixture) and a.log_prob(x).shape == (500,)
